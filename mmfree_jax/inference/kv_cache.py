"""Transformer++ for inference: the arithmetic of `models.transformer` with a key/value cache.

Cache (per layer stacked on a leading L axis):
  k, v   [L, B, S, N, H] in the compute dtype (S = the longest context the cache holds)
  valid  [B, S] bool: slot holds a real token (padding never becomes a key)
  index  [] int32: the next slot to write (the same for every row)
  pos    [B] int32: the next RoPE position of each row (its number of real tokens so far)

All rows write the same slots, so prompts of different lengths are left-padded: pads are invalid slots, and
each row's real tokens get RoPE positions 0, 1, ... whatever its padding. A query attends to valid slots at
or before its own, and always to itself (a padding query then has a finite, unused output).
"""

import jax
import jax.numpy as jnp
from jax import lax

from mmfree_jax.layers import dtypes
from mmfree_jax.layers.attention import rope
from mmfree_jax.layers.norm import rms_normalize
from mmfree_jax.model_config import ModelConfig


def prepare(cfg: ModelConfig, params: dict) -> dict:
  """Casts every weight to the compute dtype once (as the Flax modules do at every call)."""
  return jax.tree.map(lambda a: a.astype(cfg.compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                      params)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
  shape = (cfg.n_layers, batch, max_len, cfg.n_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype),
          "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32),
          "pos": jnp.zeros((batch,), jnp.int32)}


def _norm(x, scale, eps, dtype):
  return (rms_normalize(x, eps) * scale.astype(dtypes.accum(x.dtype))).astype(dtype)


def _dense(x, kernel, n_contract: int = 1):
  """`x[..., *in] @ kernel[*in, *out]` as Flax's DenseGeneral computes it (both in the compute dtype)."""
  kernel = kernel.astype(x.dtype)
  xa = tuple(range(x.ndim - n_contract, x.ndim))
  return lax.dot_general(x, kernel, ((xa, tuple(range(n_contract))), ((), ())))


def _attend(q_BTNH, k_BSNH, v_BSNH, mask_BTS):
  """Softmax attention as `jax.nn.dot_product_attention(implementation='xla')` computes it."""
  acc = dtypes.accum(q_BTNH.dtype)
  precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if q_BTNH.dtype == jnp.bfloat16 else None
  s = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, precision=precision, preferred_element_type=acc)
  s = s * jnp.array(q_BTNH.shape[-1] ** -0.5, acc)
  s = jnp.where(mask_BTS[:, None], s, jnp.finfo(acc).min)
  p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v_BSNH.dtype)  # float32, as the model does
  return jnp.einsum("BNTS,BSNH->BTNH", p, v_BSNH)


def hidden(cfg: ModelConfig, w: dict, tokens_BT, valid_BT, cache: dict, unroll: int = 1):
  """(final-normed hidden states [B, T, d], new cache); writes slots index .. index+T-1. `unroll`: layers
  per iteration of the layer loop (`lax.scan`'s unroll)."""
  cdt, eps = cfg.compute_dtype, cfg.norm_eps
  bsz, t = tokens_BT.shape
  valid_BT = jnp.ones((bsz, t), bool) if valid_BT is None else valid_BT
  index = cache["index"]
  positions = jnp.maximum(cache["pos"][:, None] + jnp.cumsum(valid_BT, axis=1) - 1, 0)
  zero = jnp.zeros((), jnp.int32)
  kv_valid = lax.dynamic_update_slice(cache["valid"], valid_BT, (zero, index))
  slots = jnp.arange(kv_valid.shape[1])
  q_slots = index + jnp.arange(t)
  mask = (kv_valid[:, None, :] & (slots[None, None, :] <= q_slots[None, :, None])) | \
      (slots[None, None, :] == q_slots[None, :, None])
  x = jnp.take(w["embeddings"]["embedding"].astype(cdt), tokens_BT, axis=0)

  def layer(carry, xs):
    x, k_all, v_all = carry
    p, l = xs
    a = p["attn"]
    u = _norm(x, p["attn_norm"]["scale"], eps, cdt)
    q = rope(_dense(u, a["q_proj"]["kernel"]), positions, cfg.rope_base)
    k = rope(_dense(u, a["k_proj"]["kernel"]), positions, cfg.rope_base)
    v = _dense(u, a["v_proj"]["kernel"])
    k_all = lax.dynamic_update_slice(k_all, k[None], (l, zero, index, zero, zero))
    v_all = lax.dynamic_update_slice(v_all, v[None], (l, zero, index, zero, zero))
    k_l = lax.dynamic_index_in_dim(k_all, l, keepdims=False)
    v_l = lax.dynamic_index_in_dim(v_all, l, keepdims=False)
    r = x + _dense(_attend(q, k_l, v_l, mask), a["o_proj"]["kernel"], 2)
    m = p["mlp"]
    gu = _dense(_norm(r, p["mlp_norm"]["scale"], eps, cdt), m["gate_proj"]["kernel"])
    hid = (jax.nn.silu(gu[..., 0, :].astype(dtypes.accum(cdt))) * gu[..., 1, :]).astype(cdt)
    return (r + _dense(hid, m["down_proj"]["kernel"]), k_all, v_all), None

  (x, k_all, v_all), _ = lax.scan(layer, (x, cache["k"], cache["v"]),
                                  (w["layers"], jnp.arange(cfg.n_layers, dtype=jnp.int32)), unroll=unroll)
  new_cache = {"k": k_all, "v": v_all, "valid": kv_valid, "index": index + jnp.int32(t),
               "pos": cache["pos"] + jnp.sum(valid_BT, axis=1, dtype=jnp.int32)}
  return _norm(x, w["norm"]["scale"], eps, cdt), new_cache


def logits(cfg: ModelConfig, w: dict, x_BTD):
  if cfg.tie_embeddings:
    emb = w["embeddings"]["embedding"].astype(x_BTD.dtype)
    return jnp.dot(x_BTD, emb.T)
  return _dense(x_BTD, w["lm_head"]["kernel"])


def state_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes of the KV cache for `max_len` tokens: grows linearly with the context."""
  return 2 * cfg.n_layers * batch * max_len * cfg.d_model * jnp.dtype(cfg.compute_dtype).itemsize
