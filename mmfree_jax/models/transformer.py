"""Transformer++ (Llama-style): RoPE, SwiGLU, RMSNorm, causal attention masked across documents."""

import flax.linen as nn
import jax.numpy as jnp

from mmfree_jax.layers.attention import Attention
from mmfree_jax.layers.dense import Dense
from mmfree_jax.layers.embed import Embed
from mmfree_jax.layers.glu import SwiGLU
from mmfree_jax.layers.norm import RMSNorm
from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models.head_loss import LOGITS, head_loss
from mmfree_jax.models.stack import scanned

ACT = ("act_batch", "act_length", "act_embed")


class TransformerBlock(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name=name)
    r = x_BTD + Attention(cfg, name="attn")(norm("attn_norm")(x_BTD), positions_BT, segment_ids_BT)
    r = nn.with_logical_constraint(r, ACT)
    out = nn.with_logical_constraint(r + SwiGLU(cfg, name="mlp")(norm("mlp_norm")(r)), ACT)
    return out, None


class TransformerLM(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, state=None, return_state=False,
               targets_BT=None, weights_BT=None):
    """Logits [B, T, V] in the compute dtype. Positions default to 0..T-1 (RoPE).

    With `targets` (and `weights`), the sum of the weighted token cross-entropies instead of the logits
    (`models.head_loss`: over `cfg.loss_chunk` positions at a time).
    """
    cfg = self.cfg
    if state is not None or return_state:
      raise NotImplementedError("Transformer++ decoding uses the KV cache of mmfree_jax.inference")
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embeddings")
    x = nn.with_logical_constraint(embed(tokens_BT), ACT)
    layers = scanned(TransformerBlock, cfg, in_axes=(nn.broadcast, nn.broadcast), name="layers")
    x, _ = layers(x, positions_BT, segment_ids_BT)
    x = RMSNorm(cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, name="norm")(x)
    if cfg.tie_embeddings:
      head, apply = embed, lambda m, v: m.attend(v)
    else:
      head = Dense((cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                   name="lm_head")
      apply = lambda m, v: m(v)
    if targets_BT is not None:
      return head_loss(head, apply, x, targets_BT, weights_BT, cfg.loss_chunk)
    return nn.with_logical_constraint(apply(head, x), LOGITS)
