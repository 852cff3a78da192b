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
import jax
import jax.numpy as jnp
import optax

LOGITS = ("act_batch", "act_length", "act_vocab")


def token_loss_sum_reference(logits_BTV, targets_BT, weights_BT):
  """Sum of the weighted token cross-entropies (optax's, on float32 logits), differentiated by autodiff."""
  acc = jnp.promote_types(logits_BTV.dtype, jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(acc), targets_BT)
  return jnp.sum(losses * weights_BT.astype(acc))


@jax.custom_vjp
def token_loss_sum(logits_BTV, targets_BT, weights_BT):
  """Sum of the weighted token cross-entropies, in float32 (float64 for float64 models).

  The same values as `token_loss_sum_reference`; its VJP keeps the logits (their dtype) and each row's
  log-sum-exp, and forms the logits' cotangent `w * (softmax - onehot(target))` in one element-wise pass (the
  one-hot as a comparison with the vocabulary index): autodiff of the reference writes a float32 cotangent,
  scatters the targets' -1 into it and converts it to the logits' dtype in a third pass. The targets and
  weights get no cotangent (integers; the weights are data).
  """
  return _token_loss_fwd(logits_BTV, targets_BT, weights_BT)[0]


def _token_loss_fwd(logits, targets, weights):
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  lse = jax.nn.logsumexp(x, axis=-1)
  picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  w = weights.astype(x.dtype)
  return jnp.sum((lse - picked) * w), (logits, lse, targets, w)


def _token_loss_bwd(res, g):
  logits, lse, targets, w = res
  x = logits.astype(lse.dtype)
  onehot = jnp.arange(x.shape[-1], dtype=targets.dtype) == targets[..., None]
  d = (jnp.exp(x - lse[..., None]) - onehot.astype(x.dtype)) * (w * g)[..., None]
  return d.astype(logits.dtype), None, None


token_loss_sum.defvjp(_token_loss_fwd, _token_loss_bwd)


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
