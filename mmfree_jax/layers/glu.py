"""GLU channel mixers: ternary (`HGRNBitMLP`) and the Transformer++ SwiGLU, both with a fused gate/up matrix.

The fused kernel is `[d, 2, I]` (gate = [:, 0], up = [:, 1]): one matrix, so for BitLinear one RMSNorm, one
activation scale and one absmean weight scale, as the reference's `[2I, d]`; the explicit axis of 2 keeps the
`I` axis shardable over `tensor` without splitting gate from up across devices.
"""

import flax.linen as nn
import jax

from mmfree_jax.layers import dtypes
from mmfree_jax.layers.bitlinear import BitLinear
from mmfree_jax.layers.dense import Dense
from mmfree_jax.model_config import ModelConfig


class BitGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    kw = dict(eps=cfg.norm_eps, impl=cfg.bitlinear, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    gu = BitLinear((2, cfg.ff), axes=("embed", None, "mlp"), kernel_init=nn.initializers.normal(0.02),
                   name="gate_proj", **kw)(x_BTD)
    h = (jax.nn.silu(gu[..., 0, :].astype(dtypes.accum(cfg.compute_dtype))) * gu[..., 1, :]).astype(cfg.compute_dtype)
    h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
    down_init = nn.initializers.normal(0.02 / (2 * cfg.n_layers) ** 0.5)
    return BitLinear(cfg.d_model, axes=("mlp", "embed"), kernel_init=down_init, name="down_proj", **kw)(h)


class SwiGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    gu = Dense((2, cfg.ff), ("embed", None, "mlp"), name="gate_proj", **kw)(x_BTD)
    h = (jax.nn.silu(gu[..., 0, :].astype(dtypes.accum(cfg.compute_dtype))) * gu[..., 1, :]).astype(cfg.compute_dtype)
    h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
    down_init = nn.initializers.normal(0.02 / (2 * cfg.n_layers) ** 0.5)
    return Dense((cfg.d_model,), ("mlp", "embed"), kernel_init=down_init, name="down_proj", **kw)(h)
