"""AdamW with global-norm clipping, learning-rate and weight-decay schedules (optax).

Schedules (`optim.schedule`):
  cosine        linear warmup to `peak_lr`, cosine decay to `min_lr_ratio * peak_lr` at the last step.
  cosine_halve  the MatMul-free LM's recipe: the same cosine, with the learning rate halved from the midpoint on.
Weight decay (`optim.wd_schedule`): `constant`, or `two_stage` (`weight_decay` in the first half, 0 after: the
BitNet b1.58 recipe). Decoupled (AdamW): the update is `-lr * (adam + wd * param)`.
Which parameters decay: matrices only (every projection kernel, the LM head and the embedding table); norm
scales and the MLGRU lower bounds do not (decaying them would pull norms to 0 and bounds to uniform).
"""

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  peak = float(optim_cfg.peak_lr)
  warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
  floor = peak * float(optim_cfg.min_lr_ratio)
  if warmup > 0:
    base = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1), end_value=floor)
  else:
    base = optax.cosine_decay_schedule(peak, max(total_steps, 1), alpha=float(optim_cfg.min_lr_ratio))
  if optim_cfg.schedule == "cosine":
    return base
  if optim_cfg.schedule == "cosine_halve":
    half = total_steps // 2
    return lambda step: base(step) * jnp.where(step >= half, 0.5, 1.0)
  raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: expected cosine or cosine_halve")


def weight_decay_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  wd = float(optim_cfg.weight_decay)
  if optim_cfg.wd_schedule == "constant":
    return optax.constant_schedule(wd)
  if optim_cfg.wd_schedule == "two_stage":
    return lambda step: jnp.where(step < total_steps // 2, wd, 0.0)
  raise ValueError(f"optim.wd_schedule={optim_cfg.wd_schedule!r}: expected constant or two_stage")


def decay_mask(params):
  """True for matrices (ndim >= 2 per layer; scanned layers add a leading axis), False for vectors."""
  def is_matrix(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    per_layer = leaf.ndim - (1 if "layers" in names else 0)
    return per_layer >= 2 and "lower_bounds" not in names
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  lr = learning_rate_schedule(optim_cfg, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(float(optim_cfg.clip_norm)),
      optax.scale_by_adam(b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps)),
      optax.inject_hyperparams(optax.add_decayed_weights, static_args=("mask",))(
          weight_decay=weight_decay_schedule(optim_cfg, total_steps), mask=decay_mask),
      optax.scale_by_learning_rate(lr),
  )
  return tx, lr
