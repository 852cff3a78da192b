"""Model registry: `build_model(model_cfg)` for a config's `model` field (ConfigDict, dict or ModelConfig)."""

import functools

import flax.linen as nn

from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models.hgrn_bit import HGRNBitLM, quantized_view
from mmfree_jax.models.transformer import TransformerLM

REGISTRY: dict[str, type[nn.Module]] = {"hgrn_bit": HGRNBitLM, "transformer": TransformerLM}


def model_config(cfg) -> ModelConfig:
  return cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_config(cfg)


def build_model(cfg) -> nn.Module:
  """The Flax module of `cfg.arch`. `module.apply(params, tokens_BT, segment_ids_BT=None, positions_BT=None)`."""
  cfg = model_config(cfg)
  return REGISTRY[cfg.arch](cfg)


def weight_view(cfg):
  """`(view, apply_kwargs)` for a model whose layers read a straight-through view of their weights (the MatMul-free
  LM with `quantize_weights_once`), so that a caller can compute `view(params)` once and apply the model to it
  with `apply_kwargs` (`train.step`: once per optimizer step, not once per micro-batch); None for the others."""
  cfg = model_config(cfg)
  if cfg.arch == "hgrn_bit" and cfg.quantize_weights_once:
    return functools.partial(quantized_view, cfg=cfg), {"weights_quantized": True}
  return None
