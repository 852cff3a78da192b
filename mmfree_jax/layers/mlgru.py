"""The MLGRU token mixer (`HGRNBitAttention` of the official code), input x = the block's normalized state.

  f = sigmoid(BL_f(x));  f = lb + (1 - lb) * f          (lb = this layer's lower bound; 0 for layer 0)
  i = silu(BL_i(x)) * (1 - f)
  h_t = f_t * h_{t-1} + i_t                              (float32 state; reset at document starts)
  out = BL_o(RMSNorm_g(BL_g(x)) * silu(h))
"""

import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax.layers.bitlinear import BitLinear, BitLinearParams, bitlinear_group, prenormed_group
from mmfree_jax.layers.mlgru_gates import input_gates, output_gate
from mmfree_jax.layers.norm import PreNorm, RMSNormScale
from mmfree_jax.layers import recurrence
from mmfree_jax.layers.recurrence import linear_scan
from mmfree_jax.model_config import ModelConfig

# xavier-uniform with gain 2^-2.5: bound = gain * sqrt(6 / (fan_in + fan_out)).
PROJ_INIT = nn.initializers.variance_scaling(2.0 ** -5, "fan_avg", "uniform")


class MLGRU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, lower_bound_D, h0_BD=None, resets_BT=None):
    """Returns (out [B, T, D] in the compute dtype, final state [B, D] float32). Given a `norm.PreNorm` (the block's
    norm, applied in f/i/g's activation kernel where they run one), returns (stream, out, final state)."""
    cfg = self.cfg
    # f/i/g read the same input: one group (one normalization, or one kernel launch per direction for all three).
    d_in = (x_BTD.x if isinstance(x_BTD, PreNorm) else x_BTD).shape[-1]
    params = [BitLinearParams(cfg.d_model, axes=("embed", "heads"), kernel_init=PROJ_INIT,
                              param_dtype=cfg.weight_dtype, name=name)(d_in)
              for name in ("f_proj", "i_proj", "g_proj")]
    kw = dict(eps=cfg.norm_eps, impl=cfg.bitlinear, prequantized=cfg.quantize_weights_once)
    if isinstance(x_BTD, PreNorm):
      stream, fig = prenormed_group(x_BTD, *zip(*params), dtype=cfg.compute_dtype, **kw)
    else:
      stream, fig = None, bitlinear_group(x_BTD.astype(cfg.compute_dtype), *zip(*params), **kw)
    f, i, g = (checkpoint_name(v, "proj") for v in fig)
    # The gates' backward passes run as kernels where the recurrence does (GPUs, by default).
    kernel = recurrence.resolve_impl(cfg.scan_impl) == "pallas"
    f, i = input_gates(f, i, lower_bound_D, resets_BT, kernel)  # f zeroed at resets: the state's reset
    f = nn.with_logical_constraint(f, ("act_batch", "act_length", "act_heads"))
    i = nn.with_logical_constraint(i, ("act_batch", "act_length", "act_heads"))
    h, h_last = linear_scan(f, i, h0_BD, None, impl=cfg.scan_impl, chunk=cfg.scan_chunk)
    g_scale = RMSNormScale(cfg.weight_dtype, axis_name="heads", name="g_norm")(g.shape[-1])
    o = output_gate(g, h, g_scale, cfg.norm_eps, kernel).astype(cfg.compute_dtype)
    o_proj = BitLinear(cfg.d_model, axes=("heads", "embed"), kernel_init=PROJ_INIT, eps=cfg.norm_eps,
                       impl=cfg.projection_impl("o"), dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                       prequantized=cfg.quantize_weights_once, name="o_proj")
    return (o_proj(o), h_last) if stream is None else (stream, o_proj(o), h_last)
