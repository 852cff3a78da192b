"""The MatMul-free LM (`HGRNBitForCausalLM`): embeddings, L x (MLGRU + GLU) blocks, final RMSNorm, BitLinear head."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfree_jax.layers import dtypes
from mmfree_jax.layers.bitlinear import BitLinear, quantize_stacked
from mmfree_jax.layers.embed import Embed
from mmfree_jax.layers.glu import BitGLU
from mmfree_jax.layers.mlgru import MLGRU
from mmfree_jax.layers.norm import PreNorm, RMSNorm, RMSNormScale
from mmfree_jax.layers.recurrence import resets_from_segments
from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models.head_loss import LOGITS, head_loss
from mmfree_jax.models.stack import scanned

ACT = ("act_batch", "act_length", "act_embed")


def quantized_view(params, cfg: ModelConfig):
  """`params` with every layer's BitLinear weights as `quantize_weights_once` quantizes them before the layer loop
  (`quantize_stacked`): a straight-through view (its gradient with respect to the latent weights is the
  identity, up to the dtype). For a caller that quantizes once per optimizer step rather than once per forward
  pass (`train.step`), then applies the model with `weights_quantized=True`."""
  inner = dict(params["params"])
  inner["layers"] = quantize_stacked(inner["layers"], cfg.compute_dtype)
  return {**params, "params": inner}


def layer_lower_bounds(lower_bounds_LD):
  """softmax over layers, cumsum, minus the first: lb[0] = 0 exactly, lb[l] = l/L at init."""
  p = jax.nn.softmax(lower_bounds_LD.astype(dtypes.accum(lower_bounds_LD.dtype)), axis=0)
  return jnp.cumsum(p, axis=0) - p[0]


class HGRNBitBlock(nn.Module):
  """r = x + MLGRU(RMSNorm(x)); out = r + GLU(RMSNorm(r)).

  With `fuse_block_norms`, the two RMSNorms (and the adds before them) are handed to the BitLinears they feed as
  `PreNorm`s: computed inside f/i/g's and gate_proj's activation kernels where those run one. The block then
  takes and returns its stream as two terms (r, GLU(...)), added by the next block's first kernel."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, per_layer, resets_BT):
    cfg = self.cfg
    lower_bound_D, h0_BD = per_layer
    if cfg.fuse_block_norms:
      (x_BTD, delta_BTD), d = x_BTD, x_BTD[0].shape[-1]
      scale = lambda name: RMSNormScale(cfg.weight_dtype, name=name)(d)
      x, mixed, h_last = MLGRU(cfg, name="attn")(PreNorm(x_BTD, scale("attn_norm"), cfg.norm_eps, delta_BTD),
                                                 lower_bound_D, h0_BD, resets_BT)
      r, ffn = BitGLU(cfg, name="mlp")(PreNorm(mixed, scale("mlp_norm"), cfg.norm_eps, residual=x))
      return (nn.with_logical_constraint(r, ACT), nn.with_logical_constraint(ffn, ACT)), h_last
    norm = lambda name: RMSNorm(cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name)
    mixed, h_last = MLGRU(cfg, name="attn")(norm("attn_norm")(x_BTD), lower_bound_D, h0_BD, resets_BT)
    r = nn.with_logical_constraint(x_BTD + mixed, ACT)
    out = nn.with_logical_constraint(r + BitGLU(cfg, name="mlp")(norm("mlp_norm")(r)), ACT)
    return out, h_last


class HGRNBitLM(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, state=None, return_state=False,
               targets_BT=None, weights_BT=None, weights_quantized=False):
    """Logits [B, T, V] (compute dtype); with `return_state`, also the recurrent state [L, B, D] float32.

    `state` is the state before the first token (as returned by an earlier call); `segment_ids` reset the
    state at document starts inside a row. MatMul-free LM has no positional encoding: `positions` is unused.
    With `targets` (and `weights`), the sum of the weighted token cross-entropies instead of the logits
    (`models.head_loss`: over `cfg.loss_chunk` positions at a time).
    `weights_quantized`: with `quantize_weights_once`, the layers' weights in `params` are `quantized_view`'s.
    """
    del positions_BT
    cfg = self.cfg
    x = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                 name="embeddings")(tokens_BT)
    x = nn.with_logical_constraint(x, ACT)
    lower_bounds = self.param("lower_bounds", nn.with_logical_partitioning(nn.initializers.zeros, ("layers", "embed")),
                              (cfg.n_layers, cfg.d_model), cfg.weight_dtype)
    resets = None if segment_ids_BT is None else resets_from_segments(segment_ids_BT)
    view = None  # with quantize_weights_once, every layer's weights quantized here, before the layer loop
    if cfg.quantize_weights_once and not weights_quantized and not self.is_initializing():
      view = functools.partial(quantize_stacked, dtype=cfg.compute_dtype)
    layers = scanned(HGRNBitBlock, cfg, in_axes=(0, nn.broadcast), name="layers", params_view=view)
    if cfg.fuse_block_norms:  # the stream as two terms (`HGRNBitBlock`); the first block adds zeros
      x = (x, jnp.zeros_like(x))
    x, h_last = layers(x, (layer_lower_bounds(lower_bounds), state), resets)
    if cfg.fuse_block_norms:
      x = nn.with_logical_constraint(x[0] + x[1], ACT)
    x = RMSNorm(cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name="norm")(x)
    head = BitLinear(cfg.vocab_size, axes=("embed", "vocab"), kernel_init=nn.initializers.normal(0.02),
                     eps=cfg.norm_eps, impl=cfg.bitlinear, dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, name="lm_head")
    if targets_BT is not None:
      loss = head_loss(head, lambda m, v: m(v), x, targets_BT, weights_BT, cfg.loss_chunk)
      return (loss, h_last) if return_state else loss
    logits = nn.with_logical_constraint(head(x), LOGITS)
    return (logits, h_last) if return_state else logits
