"""Train state, loss, and the jitted train / eval steps (gradient accumulation, non-finite guard)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmfree_jax.train import grad_stack


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


def loss_sums(model: nn.Module, params, batch, **apply_kwargs) -> tuple[jax.Array, jax.Array]:
  """(sum of token cross-entropies in float32, number of weighted tokens) for one (micro-)batch."""
  loss = model.apply(params, batch["inputs"], batch["segment_ids"], batch["positions"],
                     targets_BT=batch["targets"], weights_BT=batch["weights"], **apply_kwargs)
  return loss, jnp.sum(batch["weights"].astype(loss.dtype))


def _is_layer_matrix(path, leaf) -> bool:
  """A matrix of the layer stack: a leaf under `layers` with a leading layers axis and >= 2 axes per layer."""
  return any(getattr(k, "key", None) == "layers" for k in path) and leaf.ndim >= 3


def split_layers(tree):
  """`tree` with each layer matrix (`_is_layer_matrix`) replaced by the tuple of its layers' slices."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: tuple(x[i] for i in range(x.shape[0])) if _is_layer_matrix(path, x) else x, tree)


def stack_layers(tree):
  """The inverse of `split_layers`."""
  return jax.tree.map(lambda x: jnp.stack(x) if isinstance(x, tuple) else x, tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, *,
                    weight_view=None, per_layer: bool = False):
  """`train_step(state, batch) -> (state, metrics)`; batch fields are [A, B/A, T] (A micro-batches).

  Gradients of the summed loss are accumulated over the micro-batches in float32 and divided by the total
  token weight, so any A gives the same update as one big batch. A non-finite loss or gradient leaves the
  state unchanged (`metrics["finite"] = 0`); the host decides whether to go on or stop.

  `weight_view`: `(view, apply_kwargs)` of `models.weight_view`: `view(params)` is computed once per step, before
  the micro-batches, and the model applied to it; as the view is straight-through, the gradients with respect to
  it are the parameters' (accumulated in the parameters' float32).
  `per_layer`: the gradient is taken with respect to each layer matrix's per-layer slices (`split_layers`; the
  loss stacks them again, and XLA cancels the slicing of the stack), accumulated per layer and stacked once after
  the last micro-batch; where a layer's gradients of all the micro-batches take no more memory than their float32
  sum (bf16 gradients, 2 micro-batches), the micro-batch loop writes them into buffers that are not zero-filled
  first, and they are summed, in order, in the pass that stacks them (`grad_stack`), instead of added to a
  zero-filled accumulator (log items 48 and 54). With the weight view and the
  layers unrolled, the view's per-layer slices are then made once per step, before the micro-batch loop, which
  reads them in place (inside the loop, slices of the view are copies, once per micro-batch), and each layer's
  gradient is added (or kept) where it is produced (benchmarks/README.md, log items 41-43 and 48). The same sums,
  the same bits.
  """
  view, apply_kwargs = weight_view or ((lambda p: p), {})
  split = split_layers if per_layer else (lambda t: t)
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(model, stack_layers(p), b, **apply_kwargs), has_aux=True)

  def train_step(state: TrainState, batch):
    read = split(view(state.params))
    n_micro = jax.tree.leaves(batch)[0].shape[0]
    # The float32 sums (`accs`) and the gradients of one micro-batch, as shapes; the `kept` leaves' gradients of
    # all the micro-batches take no more memory than their sums: the micro-batch loop returns them.
    accs, tree = jax.tree.flatten(jax.eval_shape(
        lambda p: split(jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), p)), state.params))
    shapes = tree.flatten_up_to(jax.eval_shape(grad_fn, read, jax.tree.map(lambda x: x[0], batch))[1])
    kept = [per_layer and s.dtype.itemsize * n_micro <= a.dtype.itemsize for s, a in zip(shapes, accs)]

    def micro(carry, mb):
      g_acc, l_acc, w_acc, outs, i = carry
      (l, w), g = grad_fn(read, mb)
      g = tree.flatten_up_to(g)
      g_acc = [a + b.astype(a.dtype) for a, b in zip(g_acc, [b for b, k in zip(g, kept) if not k])]
      outs = [jax.lax.dynamic_update_index_in_dim(o, b, i, 0) for o, b in zip(outs, [b for b, k in zip(g, kept) if k])]
      return (g_acc, l_acc + l, w_acc + w, outs, i + 1), None

    zeros = [jnp.zeros(a.shape, a.dtype) for a, k in zip(accs, kept) if not k]
    # Each micro-batch writes its kept gradients into slot i of these: as a scan's outputs, they would be zero-filled.
    outs = [grad_stack.uninitialized((n_micro,) + s.shape, s.dtype) for s, k in zip(shapes, kept) if k]
    (carried, loss_sum, weight, outs, _), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, outs, 0), batch)
    carried, outs = iter(carried), iter(outs)
    grads = tree.unflatten([_Kept(next(outs), a.dtype) if k else next(carried) for a, k in zip(accs, kept)])
    if per_layer:  # stacked into memory first: fused into the optimizer's reductions, the stacking ran 3x slower
      grads = jax.lax.optimization_barrier(jax.tree.map(_sum_and_stack, grads, is_leaf=_is_tuple_or_kept))
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


class _Kept:
  """A leaf's gradients of every micro-batch, [A, ...], to be summed in order in `dtype`."""

  def __init__(self, parts, dtype):
    self.parts, self.dtype = parts, dtype


def _is_tuple_or_kept(x) -> bool:
  return isinstance(x, (tuple, _Kept))


def _sum_and_stack(x):
  """A layer matrix's gradient from its layers' (`split_layers`' tuple): stacked, and where the micro-batches'
  gradients were kept, summed (`grad_stack.sum_and_stack`); any other leaf as it is, or summed if kept."""
  if isinstance(x, _Kept):
    return grad_stack.sum_and_stack([x.parts], x.dtype)[0]
  if isinstance(x, tuple) and all(isinstance(p, _Kept) for p in x):
    return grad_stack.sum_and_stack([p.parts for p in x], x[0].dtype)
  return stack_layers(x) if isinstance(x, tuple) else x


def make_eval_step(model: nn.Module):
  def eval_step(params, batch):
    return loss_sums(model, params, batch)
  return eval_step
