"""Causal self-attention with RoPE for Transformer++ (Llama-style, no biases)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfree_jax.layers import dtypes
from mmfree_jax.layers.dense import Dense
from mmfree_jax.model_config import ModelConfig


def rope(x_BTNH, positions_BT, base: float):
  """Rotary position embedding, rotate-half convention, computed in (at least) float32."""
  acc = dtypes.accum(x_BTNH.dtype)
  half = x_BTNH.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=acc) / half)
  angles = positions_BT[..., None].astype(acc) * freqs  # [B, T, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(acc), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def segment_mask(segment_ids_BT):
  """[B, 1, T, T]: query and key in the same document (padding, id 0, attends to itself only)."""
  same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return same[:, None]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT=None):
    cfg = self.cfg
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    proj = lambda name: Dense((cfg.n_heads, cfg.head_dim), ("embed", "heads", "kv"), name=name, **kw)
    q = rope(proj("q_proj")(x_BTD), positions_BT, cfg.rope_base)
    k = rope(proj("k_proj")(x_BTD), positions_BT, cfg.rope_base)
    v = proj("v_proj")(x_BTD)
    names = ("act_batch", "act_length", "act_heads", None)
    q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))
    mask = None if segment_ids_BT is None else segment_mask(segment_ids_BT)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=cfg.attention_impl)
    out_init = nn.initializers.normal(0.02 / (2 * cfg.n_layers) ** 0.5)
    return Dense((cfg.d_model,), ("heads", "kv", "embed"), n_in=2, kernel_init=out_init, name="o_proj", **kw)(out)
