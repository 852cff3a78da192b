"""Prefill + cached decoding against one full forward pass (float64), padding, batching, EOS, bf16 greedy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.inference import generation as gen
from mmfree_jax.models import model_config
from tests.inference.helpers import full_forward, tiny_cfg, tiny_params

ARCHS = ["hgrn_bit", "transformer"]
# Transformer++'s attention softmax is float32 inside the model itself (jax.nn.dot_product_attention).
RTOL = {"hgrn_bit": 1e-10, "transformer": 2e-6}


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def _prefill_then_teacher_forced(params, prompt_BP, valid_BP, rest_BR, *, cfg, max_len):
  """Logits at the last prompt position and at every `rest` token, fed one at a time through the cache."""
  fam = gen.family(cfg)
  w = fam.prepare(cfg, params)
  first, cache = gen.prefill(cfg, w, prompt_BP, valid_BP, max_len)

  def step(cache, tok_B):
    x, cache = fam.hidden(cfg, w, tok_B[:, None], None, cache)
    return cache, fam.logits(cfg, w, x)[:, 0]

  _, later = jax.lax.scan(step, cache, rest_BR.T)
  return jnp.concatenate([first[:, None], jnp.swapaxes(later, 0, 1)], axis=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_equal_full_forward_float64(x64, arch):
  cfg_d = tiny_cfg(arch, "float64")
  cfg = model_config(cfg_d)
  params = tiny_params(cfg_d, head_gain=5.0)
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 13), 3, 97))
  full = full_forward(cfg_d, params, tokens)
  # Row 0: a 6-token prompt; row 1: a 4-token prompt, left-padded with two pad tokens to 6.
  prompt = tokens[:, :6].copy()
  valid = np.ones_like(prompt, bool)
  prompt[1] = np.concatenate([[0, 0], tokens[1, :4]])
  valid[1, :2] = False
  rest = np.stack([tokens[0, 6:], tokens[1, 4:11]])
  got = np.asarray(_prefill_then_teacher_forced(params, prompt, valid, rest, cfg=cfg, max_len=32))
  scale = np.abs(full).max()
  np.testing.assert_allclose(got[0], full[0, 5:], rtol=RTOL[arch], atol=RTOL[arch] * scale)
  np.testing.assert_allclose(got[1], full[1, 3:11], rtol=RTOL[arch], atol=RTOL[arch] * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_prompts_equal_one_by_one_and_stop_at_eos(x64, arch):
  cfg_d = tiny_cfg(arch, "float64")
  cfg = model_config(cfg_d)
  params = tiny_params(cfg_d, head_gain=20.0)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, 97, n)) for n in (3, 11, 7)]
  batched = gen.generate(cfg, params, prompts, max_new_tokens=12)
  alone = [gen.generate(cfg, params, [p], max_new_tokens=12)[0] for p in prompts]
  assert batched == alone
  assert all(len(r) == 12 for r in batched)
  assert len({tuple(r) for r in batched}) > 1
  # EOS: each row is cut before its first EOS; the loop ends once every row has emitted it.
  eos = batched[0][3]
  stopped = gen.generate(cfg, params, prompts, max_new_tokens=12, eos_id=eos)
  for f, s in zip(batched, stopped):
    assert s == (f[:f.index(eos)] if eos in f else f)
  tokens, valid = gen.left_pad(prompts[:1], 16, 0)
  out, steps = gen._generate(params, tokens, valid, jax.random.key(0), eos, 0, cfg=cfg, max_new=12,
                             sampling=gen.Sampling())
  assert int(steps) == batched[0].index(eos) + 1
  assert np.all(np.asarray(out)[0, int(steps):] == 0)


def test_bfloat16_greedy_tokens_equal_full_forward_recomputation():
  """The quantizers amplify last-bit differences, so tokens are compared where the full forward's top-2
  margin is clear of bfloat16 rounding (Transformer++'s cache is covered in float64 above). The full forward
  uses the `fused` BitLinear: like the decoder, it multiplies the integer codes exactly and rescales after;
  `vanilla` multiplies the bfloat16-rounded fake-quantized values (as the official GPU code)."""
  cfg_d = tiny_cfg("hgrn_bit", "bfloat16", bitlinear="fused")
  params = tiny_params(cfg_d, seed=4, head_gain=30.0)
  prompts = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55]]
  out = gen.generate(cfg_d, params, prompts, max_new_tokens=24)
  checked = 0
  for p, o in zip(prompts, out):
    seq = np.zeros((1, 32), np.int32)
    seq[0, :len(p) + len(o)] = p + o  # right padding: causal, so earlier logits are unaffected
    logits = full_forward(cfg_d, params, seq)[0].astype(np.float32)[len(p) - 1:len(p) + len(o) - 1]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    clear = margin > 0.01 * np.abs(logits).max()
    np.testing.assert_array_equal(np.argmax(logits, -1)[clear], np.asarray(o)[clear])
    checked += clear.sum()
  assert checked >= 0.6 * sum(len(o) for o in out)


def test_sampling_respects_top_k_and_is_seeded():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4096))
  s = gen.Sampling(temperature=1.0, top_k=2)
  sample = jax.jit(gen.sample_logits, static_argnums=2)
  toks = np.asarray(sample(logits, jax.random.key(0), s))
  assert set(toks.tolist()) == {0, 1}
  assert abs((toks == 0).mean() - 0.5 / 0.8) < 0.03
  nucleus = np.asarray(sample(logits, jax.random.key(1), gen.Sampling(1.0, 0, 0.7)))
  assert set(nucleus.tolist()) == {0, 1}
  again = np.asarray(sample(logits, jax.random.key(0), s))
  np.testing.assert_array_equal(toks, again)


@pytest.mark.parametrize("arch", ARCHS)
def test_unrolled_layer_loop_decodes_the_same_tokens(x64, arch):
  """`decode_loop(unroll_layers=True)` writes the layer loop out; the program's arithmetic is the same."""
  cfg_d = tiny_cfg(arch, "float64")
  cfg = model_config(cfg_d)
  params = tiny_params(cfg_d, head_gain=5.0)
  prompt = jax.random.randint(jax.random.key(int(np.random.default_rng().integers(1 << 30))), (2, 7), 3, 97)
  valid = jnp.ones(prompt.shape, bool)
  fam = gen.family(cfg)
  w = fam.prepare(cfg, params)
  logits, cache = gen.prefill(cfg, w, prompt, valid, 7 + 9)
  s = gen.Sampling()
  runs = [jax.jit(lambda lg, c, u=u: gen.decode_loop(cfg, w, lg, c, jax.random.key(0), -1, 0, 9, s,
                                                     unroll_layers=u))(logits, cache) for u in (False, True)]
  np.testing.assert_array_equal(runs[0][0], runs[1][0])
  assert int(runs[0][1]) == int(runs[1][1]) == 9
