"""Stacking blocks over depth with `nn.scan` (compile time independent of depth) and a remat policy."""

import flax.linen as nn
import jax

from mmfree_jax.model_config import ModelConfig

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep every projection's output and the recurrence output; recompute only element-wise work.
    "save_proj": jax.checkpoint_policies.save_only_these_names("proj", "scan"),
}


def scanned(block_cls: type[nn.Module], cfg: ModelConfig, in_axes, name: str) -> nn.Module:
  """`cfg.n_layers` copies of `block_cls(cfg)`, parameters stacked on a leading `layers` axis.

  The block is called as `block(carry, *xs)` and returns `(carry, ys)`; `in_axes` says which of `xs` are
  per-layer (0) and which are shared by all layers (`nn.broadcast`).
  """
  block = block_cls
  if cfg.remat != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                 length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name=name)
