"""Model registry: `build_model(model_cfg)` for a config's `model` field (ConfigDict, dict or ModelConfig)."""

import flax.linen as nn

from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models.hgrn_bit import HGRNBitLM
from mmfree_jax.models.transformer import TransformerLM

REGISTRY: dict[str, type[nn.Module]] = {"hgrn_bit": HGRNBitLM, "transformer": TransformerLM}


def model_config(cfg) -> ModelConfig:
  return cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_config(cfg)


def build_model(cfg) -> nn.Module:
  """The Flax module of `cfg.arch`. `module.apply(params, tokens_BT, segment_ids_BT=None, positions_BT=None)`."""
  cfg = model_config(cfg)
  return REGISTRY[cfg.arch](cfg)
