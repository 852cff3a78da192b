"""Train state, loss, and the jitted train / eval steps (gradient accumulation, non-finite guard)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, seq_len: int) -> TrainState:
  """Fresh float32 master parameters and optimizer state (call under jit with out_shardings)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(seed), tokens))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def loss_sums(model: nn.Module, params, batch) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies in float32, number of weighted tokens) for one (micro-)batch."""
  loss = model.apply(params, batch["inputs"], batch["segment_ids"], batch["positions"],
                     targets_BT=batch["targets"], weights_BT=batch["weights"])
  return loss, jnp.sum(batch["weights"].astype(loss.dtype))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr_schedule: optax.Schedule):
  """`train_step(state, batch) -> (state, metrics)`; batch fields are [A, B/A, T] (A micro-batches).

  Gradients of the summed loss are accumulated over the micro-batches in float32 and divided by the total
  token weight, so any A gives the same update as one big batch. A non-finite loss or gradient leaves the
  state unchanged (`metrics["finite"] = 0`); the host decides whether to go on or stop.
  """
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(model, p, b), has_aux=True)

  def train_step(state: TrainState, batch):
    def micro(carry, mb):
      g_acc, l_acc, w_acc = carry
      (l, w), g = grad_fn(state.params, mb)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, w_acc + w), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), state.params)
    (grads, loss_sum, weight), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state))
    metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=optax.tree.norm(new_state.params),
                   learning_rate=lr_schedule(state.step), weighted_tokens=weight, finite=finite.astype(jnp.int32))
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module):
  def eval_step(params, batch):
    return loss_sums(model, params, batch)
  return eval_step
