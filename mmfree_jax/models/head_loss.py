"""The LM head and its cross-entropy, optionally over chunks of positions so all the logits never exist at once.

With a 32k vocabulary the logits are the largest activation of a training step: rows x T x V, and the float32
softmax and its gradient beside them (8.4 GB for 32 rows of 2048 tokens). `model.loss_chunk = C > 0` computes
the head and the loss for C positions at a time in a loop (`nn.scan`) whose body is rematerialized: the
backward pass recomputes one chunk's logits from the final hidden states, so at most one chunk's logits are
alive, for one more forward pass of the head. Every per-token quantity (the BitLinear head's activation
scale, the softmax) belongs to one position, so the chunked loss is the same function as the whole one.
"""

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import optax

LOGITS = ("act_batch", "act_length", "act_vocab")


def token_loss_sum(logits_BTV, targets_BT, weights_BT):
  """Sum of the weighted token cross-entropies, in float32 (float64 for float64 models)."""
  acc = jnp.promote_types(logits_BTV.dtype, jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(acc), targets_BT)
  return jnp.sum(losses * weights_BT.astype(acc))


def head_loss(head: nn.Module, apply: Callable, x_BTD, targets_BT, weights_BT, chunk: int):
  """`token_loss_sum(apply(head, x), targets, weights)`, over `chunk` positions at a time when chunk > 0.

  `head` is the (already named) module that owns the head's parameters, `apply(head, x)` its logits;
  `weights` None weighs every token 1.
  """
  if weights_BT is None:
    weights_BT = jnp.ones(targets_BT.shape, jnp.float32)
  t = x_BTD.shape[1]
  if chunk <= 0 or chunk >= t:
    logits = nn.with_logical_constraint(apply(head, x_BTD), LOGITS)
    return token_loss_sum(logits, targets_BT, weights_BT)
  if t % chunk:
    raise ValueError(f"model.loss_chunk={chunk} must divide the sequence length {t}")
  n, b = t // chunk, x_BTD.shape[0]
  split = lambda v: v.reshape(b, n, chunk, *v.shape[2:])

  def body(mdl, total, xs):
    x_c, t_c, w_c = xs
    logits = nn.with_logical_constraint(apply(mdl, x_c), LOGITS)
    return total + token_loss_sum(logits, t_c, w_c), None

  scan = nn.scan(nn.remat(body, prevent_cse=False), variable_broadcast="params", split_rngs={"params": False},
                 in_axes=1, length=n)
  acc = jnp.promote_types(x_BTD.dtype, jnp.float32)
  total, _ = scan(head, jnp.zeros((), acc), (split(x_BTD), split(targets_BT), split(weights_BT)))
  return total
