"""Batched generation with the whole decode loop compiled: prefill once, then `lax.while_loop` over tokens.

Prompts of different lengths are left-padded to a common (bucketed) length P. The MatMul-free LM treats pads
as identity steps of its recurrence (the state is untouched); Transformer++ never writes pads as valid cache
slots and numbers each row's real tokens from RoPE position 0. All rows then decode in lockstep.

MatMul-free: the prompt goes through the parallel scan in one call, decoding updates the constant-size
state [L, B, d]. Transformer++: the prompt fills a KV cache of P + max_new_tokens slots, decoding appends.
The loop stops when every row has produced `eos_id` (or after `max_new_tokens`); nothing returns to the host
between tokens.
"""

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmfree_jax.inference import kv_cache, recurrent
from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models import model_config

FAMILIES = {"hgrn_bit": recurrent, "transformer": kv_cache}


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_k 0 and top_p 1 = off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def family(cfg: ModelConfig):
  return FAMILIES[cfg.arch]


def unwrap(params: Any) -> dict:
  """The `params` collection whether given as `{'params': ...}` (Flax variables) or bare."""
  return params["params"] if isinstance(params, dict) and set(params) == {"params"} else params


def bucket(n: int, minimum: int = 16) -> int:
  """The next power of two >= n (>= minimum): few distinct shapes, few compilations."""
  b = minimum
  while b < n:
    b *= 2
  return b


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """([B, length] int32 tokens, [B, length] bool valid), each prompt right-aligned."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for r, p in enumerate(prompts):
    if not 0 < len(p) <= length:
      raise ValueError(f"prompt {r} has {len(p)} tokens; expected 1..{length}")
    tokens[r, length - len(p):] = p
    valid[r, length - len(p):] = True
  return tokens, valid


def sample_logits(logits_BV, key, s: Sampling):
  """One token per row: greedy, or temperature sampling restricted to top-k and the top-p nucleus."""
  if s.temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  x = logits_BV.astype(jnp.float32) / s.temperature
  neg = jnp.finfo(jnp.float32).min
  if s.top_k > 0:
    kth = lax.top_k(x, min(s.top_k, x.shape[-1]))[0][..., -1:]
    x = jnp.where(x < kth, neg, x)
  if s.top_p < 1.0:
    order = jnp.argsort(-x, axis=-1)
    sorted_x = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token: keep while < top_p
    keep_sorted = before < s.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
    x = jnp.where(keep, x, neg)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def prefill(cfg: ModelConfig, w, tokens_BP, valid_BP, max_len: int):
  """(logits of the last prompt position [B, V], cache) from prepared weights `w`."""
  fam = family(cfg)
  cache = fam.init_cache(cfg, tokens_BP.shape[0], max_len)
  x, cache = fam.hidden(cfg, w, tokens_BP, valid_BP, cache)
  return fam.logits(cfg, w, x[:, -1:])[:, 0], cache


def decode_loop(cfg: ModelConfig, w, logits_BV, cache, key, eos_id, pad_id, max_new: int, s: Sampling,
                unroll_layers: bool = False):
  """Tokens [B, max_new] (pad after a row's EOS) and the number of loop steps run. `unroll_layers` writes
  the layer loop of each token's step out in full (no per-layer slicing of the stacked weights)."""
  fam = family(cfg)
  bsz = logits_BV.shape[0]
  tok = sample_logits(logits_BV, jax.random.fold_in(key, 0), s)
  out = jnp.full((bsz, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
  done = tok == eos_id

  def cond(c):
    i, _, _, _, done = c
    return (i < max_new) & ~jnp.all(done)

  def body(c):
    i, tok, cache, out, done = c
    x, cache = fam.hidden(cfg, w, tok[:, None], None, cache, unroll=cfg.n_layers if unroll_layers else 1)
    nxt = sample_logits(fam.logits(cfg, w, x)[:, 0], jax.random.fold_in(key, i), s)
    nxt = jnp.where(done, pad_id, nxt)
    out = lax.dynamic_update_slice(out, nxt[:, None], (jnp.int32(0), i))
    return i + 1, nxt, cache, out, done | (nxt == eos_id)

  i, _, _, out, _ = lax.while_loop(cond, body, (jnp.int32(1), tok, cache, out, done))
  return out, i


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "sampling"))
def _generate(params, tokens_BP, valid_BP, key, eos_id, pad_id, *, cfg, max_new, sampling):
  w = family(cfg).prepare(cfg, params)
  logits, cache = prefill(cfg, w, tokens_BP, valid_BP, tokens_BP.shape[1] + max_new)
  # On GPUs the layer loop is written out (as benchmarks.inference measures); elsewhere a loop (compile time).
  return decode_loop(cfg, w, logits, cache, key, eos_id, pad_id, max_new, sampling,
                     unroll_layers=jax.default_backend() == "gpu")


def generate(model_cfg, params, prompts_tokens: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             eos_id: int | None = None, pad_id: int = 0, batch_size: int | None = None) -> list[list[int]]:
  """New tokens for each prompt (without the prompt; cut before the first `eos_id`, which is not included).

  `params`: a latent parameter tree (training checkpoint, `{'params': ...}` or bare) or a packed one
  (`inference.packed`). Prompts are left-padded to a power-of-two length; `batch_size` rows per compiled call
  (default: all at once; the last batch is filled up with copies so that shapes stay fixed).
  """
  cfg = model_config(model_cfg)
  params = unwrap(params)
  if not prompts_tokens:
    return []
  prompts = [list(p) for p in prompts_tokens]
  bs = batch_size or len(prompts)
  s = Sampling(float(temperature), int(top_k), float(top_p))
  eos = -1 if eos_id is None else int(eos_id)
  results: list[list[int]] = []
  for start in range(0, len(prompts), bs):
    chunk = prompts[start:start + bs]
    rows = chunk + [chunk[-1]] * (bs - len(chunk))
    tokens, valid = left_pad(rows, bucket(max(len(p) for p in rows)), pad_id)
    key = jax.random.fold_in(jax.random.key(seed), start)
    out, _ = _generate(params, tokens, valid, key, eos, pad_id, cfg=cfg, max_new=int(max_new_tokens),
                       sampling=s)
    for row in np.asarray(out)[:len(chunk)].tolist():
      results.append(row[:row.index(eos)] if eos in row else row)
  return results


def sample_text(config, model, params, prompt: str, n_tokens: int, *, temperature: float = 0.0,
                seed: int = 0) -> str:
  """A greedy (by default) continuation of `prompt` with the run's tokenizer (the trainer's end-of-run sample).

  The prompt is framed as the data pipeline frames documents: `[bos] + tokens`; generation stops at eos.
  """
  del model
  from mmfree_jax.inference.loading import tokenizer_for  # pylint: disable=g-import-not-at-top
  tok = tokenizer_for(config)
  ids = [tok.bos_id] + tok.encode(prompt)
  params = jax.tree.map(lambda a: jax.device_put(a, jax.local_devices()[0]) if hasattr(a, "sharding") else a,
                        unwrap(params))
  out = generate(config.model, params, [ids], max_new_tokens=int(n_tokens), temperature=temperature,
                 seed=seed, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
  return tok.decode(out)
