"""Stacking blocks over depth with `nn.scan` (compile time independent of depth) and a remat policy."""

import flax.linen as nn
import jax

from mmfree_jax.layers import recurrence
from mmfree_jax.model_config import ModelConfig


def _cudnn_attention_forward():
  """The primitive of cuDNN's fused attention forward (private to JAX; None where it is absent)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return getattr(fused_attention_stablehlo, "_dot_product_attention_fwd_p_wrapper", None)


def save_proj_policy():
  """Saves every projection's output, the recurrence output and cuDNN attention's forward outputs (the output
  and its softmax statistics, which its backward reads), so that the backward pass recomputes only
  element-wise work: without the last, remat runs each layer's flash-attention forward a second time."""
  names = jax.checkpoint_policies.save_only_these_names("proj", recurrence.OUTPUT_NAME)
  attention = _cudnn_attention_forward()

  def policy(prim, *args, **params):
    return (attention is not None and prim is attention) or names(prim, *args, **params)

  return policy


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_proj": save_proj_policy(),
}


def scanned(block_cls: type[nn.Module], cfg: ModelConfig, in_axes, name: str, params_view=None) -> nn.Module:
  """`cfg.n_layers` copies of `block_cls(cfg)`, parameters stacked on a leading `layers` axis.

  The block is called as `block(carry, *xs)` and returns `(carry, ys)`; `in_axes` says which of `xs` are
  per-layer (0) and which are shared by all layers (`nn.broadcast`). `cfg.unroll_layers` blocks run per loop
  iteration (the parameters stay stacked either way, so checkpoints do not depend on it).
  `params_view`, optional: a function of the stack's variables (`{"params": {...}}`, stacked) applied once
  before the loop (`nn.map_variables`), so that the blocks see its result; differentiable. Pass None at init.
  """
  block = block_cls
  if cfg.remat != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                  length=cfg.n_layers, unroll=min(cfg.unroll_layers, cfg.n_layers),
                  metadata_params={nn.PARTITION_NAME: "layers"})
  if params_view is not None:
    stack = nn.map_variables(stack, "params", trans_in_fn=params_view)
  return stack(cfg, name=name)
