"""GLU channel mixers: ternary (`HGRNBitMLP`) and the Transformer++ SwiGLU, both with a fused gate/up matrix.

The fused kernel is `[d, 2, I]` (gate = [:, 0], up = [:, 1]): one matrix, so for BitLinear one RMSNorm, one
activation scale and one absmean weight scale, as the reference's `[2I, d]`; the explicit axis of 2 keeps the
`I` axis shardable over `tensor` without splitting gate from up across devices.

`swiglu(gu) = silu(gate) * up` carries its own VJP: autodiff would transpose the two slices into zero-padded
`[..., 2, I]` cotangents and add them; here the backward writes gate's and up's cotangents side by side in one
pass (the same formulas: d_up = dh * silu(gate), d_gate = dh * up * s * (1 + gate * (1 - s)), s = sigmoid(gate)).
When the down projection's BitLinear impl (`model.down_bitlinear`, by default `model.bitlinear`) is a kernel impl
(`pallas`, `pallas_fused`), swiglu and its backward run inside its activation kernel instead
(`BitLinear(glu_input=True)`): h and its cotangent are never written.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfree_jax.layers import dtypes
from mmfree_jax.layers.bitlinear import KERNEL_IMPLS, BitLinear, resolve
from mmfree_jax.layers.dense import Dense
from mmfree_jax.layers.norm import PreNorm
from mmfree_jax.model_config import ModelConfig


@jax.custom_vjp
def swiglu(gu):
  """`silu(gu[..., 0, :]) * gu[..., 1, :]` in float32 (float64 for float64 input), returned in gu's dtype."""
  acc = dtypes.accum(gu.dtype)
  return (jax.nn.silu(gu[..., 0, :].astype(acc)) * gu[..., 1, :].astype(acc)).astype(gu.dtype)


def _swiglu_fwd(gu):
  return swiglu(gu), gu


def _swiglu_bwd(gu, dh):
  acc = dtypes.accum(gu.dtype)
  gate, up, dh = gu[..., 0, :].astype(acc), gu[..., 1, :].astype(acc), dh.astype(acc)
  s = jax.nn.sigmoid(gate)
  d_gate = dh * up * (s * (1.0 + gate * (1.0 - s)))
  return (jnp.stack([d_gate, dh * (gate * s)], axis=-2).astype(gu.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class BitGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    """The GLU of `x [B, T, D]`; of a `norm.PreNorm` (the block's norm, applied in gate_proj's activation kernel
    where it runs one), `(stream, output)`."""
    cfg = self.cfg
    kw = dict(eps=cfg.norm_eps, impl=cfg.bitlinear, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
              prequantized=cfg.quantize_weights_once)
    gu = BitLinear((2, cfg.ff), axes=("embed", None, "mlp"), kernel_init=nn.initializers.normal(0.02),
                   name="gate_proj", **dict(kw, impl=cfg.projection_impl("gate")))(x_BTD)
    stream = None
    if isinstance(x_BTD, PreNorm):
      stream, gu = gu
    kw["impl"] = cfg.projection_impl("down")
    down = functools.partial(BitLinear, cfg.d_model, axes=("mlp", "embed"), name="down_proj", **kw,
                             kernel_init=nn.initializers.normal(0.02 / (2 * cfg.n_layers) ** 0.5))
    if resolve(kw["impl"]) in KERNEL_IMPLS:  # swiglu inside down_proj's activation kernel: h never written
      out = down(glu_input=True)(gu)
    else:
      out = down()(nn.with_logical_constraint(swiglu(gu), ("act_batch", "act_length", "act_mlp")))
    return out if stream is None else (stream, out)


class SwiGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    gu = Dense((2, cfg.ff), ("embed", None, "mlp"), name="gate_proj", **kw)(x_BTD)
    h = nn.with_logical_constraint(swiglu(gu), ("act_batch", "act_length", "act_mlp"))
    down_init = nn.initializers.normal(0.02 / (2 * cfg.n_layers) ** 0.5)
    return Dense((cfg.d_model,), ("mlp", "embed"), kernel_init=down_init, name="down_proj", **kw)(h)
