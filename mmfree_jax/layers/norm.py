"""RMSNorm: `x / sqrt(mean(x^2) + eps) * scale`, computed in float32 (pure RMS, no mean subtraction)."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfree_jax.layers import dtypes


def rms_normalize(x, eps: float):
  """`x / sqrt(mean(x^2) + eps)` over the last axis, in at least float32."""
  x = x.astype(dtypes.accum(x.dtype))
  return x * jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps))


class PreNorm(NamedTuple):
  """An input not yet normalized: `RMSNorm(x + residual)` with scale `scale` (residual None: of x), to be applied
  by the BitLinears that read it (`bitlinear.prenormed_group`): inside their activation kernel where they run one,
  otherwise first, as `RMSNorm`. A layer given one also returns the stream `x + residual`, the value the block's
  residual connection reads, so that the stream's gradient passes through the fused backward as well."""
  x: jax.Array
  scale: jax.Array
  eps: float
  residual: jax.Array | None = None

  def unfused(self, dtype):
    """(stream, RMSNorm(stream) in `dtype`): the block's add and norm as `RMSNorm` computes them."""
    h = self.x if self.residual is None else self.x + self.residual
    return h, rms_norm(h, self.scale, self.eps, dtype)


def rms_norm(x, scale, eps: float, dtype):
  """`RMSNorm`'s output: `rms_normalize(x) * scale` in `dtype`."""
  return (rms_normalize(x, eps) * scale.astype(dtypes.accum(x.dtype))).astype(dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a learned per-channel scale (init 1). Output in `dtype`."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    return rms_norm(x, _scale_param(self, x.shape[-1]), self.eps, self.dtype)


class RMSNormScale(nn.Module):
  """An `RMSNorm`'s parameter alone (the same name, shape, axes and init), for a caller that applies the norm
  itself (`layers.mlgru_gates.output_gate`): `RMSNormScale(..., name="g_norm")(d)` returns `scale [d]`, and the
  parameter tree is the one `RMSNorm(..., name="g_norm")` makes."""
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, d: int):
    return _scale_param(self, d)


def _scale_param(module: nn.Module, d: int):
  """The norm's `scale [d]` (init 1, axis `module.axis_name`, dtype `module.param_dtype`) in `module`'s scope."""
  return module.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (module.axis_name,)), (d,),
                      module.param_dtype)
