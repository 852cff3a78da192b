"""The compiled training program: model, optimizer, shardings and jitted steps for a config on a mesh.

`experiments.train` runs it; `experiments.compile_tpu` lowers and compiles the very same program for a TPU
topology ahead of time. Nothing here touches data or the workdir.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models import build_model, weight_view
from mmfree_jax.train import sharding
from mmfree_jax.train.optimizer import make_optimizer
from mmfree_jax.train.step import TrainState, make_eval_step, make_train_step

BATCH_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
                "weights": jnp.float32}


@dataclasses.dataclass
class Program:
  mesh: Mesh
  model_cfg: ModelConfig
  model: nn.Module
  tx: optax.GradientTransformation
  lr_schedule: optax.Schedule
  state_shardings: Any
  abstract_state: Any  # TrainState of ShapeDtypeStructs carrying their shardings
  train_batch_sharding: NamedSharding  # [A, B/A, T]
  eval_batch_sharding: NamedSharding  # [B, T]
  init_state: Callable[[], TrainState]
  train_step: Callable  # jitted, donates the state
  eval_step: Callable  # jitted

  def abstract_train_batch(self, global_batch: int, grad_accum: int, seq_len: int) -> dict:
    shape = (grad_accum, global_batch // grad_accum, seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.train_batch_sharding) for k, dt in BATCH_FIELDS.items()}

  @property
  def context(self):
    """Enter around tracing and calls: the mesh and the logical-axis rules used by the models' constraints."""
    return _Context(self.mesh)


class _Context:
  def __init__(self, mesh):
    self.mesh = mesh
    self._stack = []

  def __enter__(self):
    for cm in (jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES)):
      cm.__enter__()
      self._stack.append(cm)
    return self

  def __exit__(self, *exc):
    while self._stack:
      self._stack.pop().__exit__(*exc)


def resolve_batch(config, mesh: Mesh, process_count: int) -> None:
  """Sets `train.grad_accum` from `train.micro_batch` where that is set (rows per device and micro-batch), then
  raises the batch arithmetic's errors, one line each, before any compilation."""
  gb, micro = int(config.train.global_batch), int(config.train.micro_batch)
  dp = sharding.data_parallel_size(mesh)
  if micro:
    if micro < 0 or gb % (dp * micro):
      raise ValueError(f"train.global_batch={gb} does not split into micro-batches of train.micro_batch={micro} "
                       f"rows on each of the {dp} data-parallel devices (mesh.data*mesh.fsdp)")
    if int(config.train.grad_accum) not in (1, gb // (dp * micro)):
      raise ValueError(f"train.grad_accum={config.train.grad_accum} and train.micro_batch={micro} disagree: set "
                       "one of them (micro_batch gives grad_accum=global_batch/(micro_batch*data-parallel devices))")
    config.train.grad_accum = gb // (dp * micro)
  accum = int(config.train.grad_accum)
  if accum < 1 or gb % accum:
    raise ValueError(f"train.global_batch={gb} is not divisible by train.grad_accum={accum}")
  if (gb // accum) % dp:
    raise ValueError(f"the micro-batch train.global_batch/train.grad_accum={gb // accum} is not divisible by the "
                     f"data-parallel size mesh.data*mesh.fsdp={dp}; change the batch or the mesh")
  if gb % process_count or (gb // process_count) % accum:
    raise ValueError(f"train.global_batch={gb} must split evenly into {process_count} processes x "
                     f"{accum} micro-batches")


def build_program(config, mesh: Mesh) -> Program:
  model_cfg = ModelConfig.from_config(config.model)
  model = build_model(model_cfg)
  tx, lr_schedule = make_optimizer(config.optim, int(config.train.steps))
  seq_len = int(config.data.seq_len)

  def init_boxed():
    params = model.init(jax.random.key(int(config.train.seed)), jnp.zeros((1, seq_len), jnp.int32))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with _Context(mesh):
    boxed = jax.eval_shape(init_boxed)
    state_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.LOGICAL_RULES)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nn.unbox(boxed), state_shardings)
  train_bs = sharding.batch_sharding(mesh, ndim=3, leading=1)
  eval_bs = sharding.batch_sharding(mesh, ndim=2)
  replicated = NamedSharding(mesh, P())
  init = jax.jit(lambda: nn.unbox(init_boxed()), out_shardings=state_shardings)
  view = weight_view(model_cfg)  # per-layer accumulation pays where the view's slices are made anyway
  step_fn = make_train_step(model, tx, lr_schedule, weight_view=view,
                            per_layer=view is not None and model_cfg.unroll_layers >= model_cfg.n_layers)
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, train_bs),
                       out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings.params, eval_bs),
                      out_shardings=replicated)
  return Program(mesh=mesh, model_cfg=model_cfg, model=model, tx=tx, lr_schedule=lr_schedule,
                 state_shardings=state_shardings, abstract_state=abstract_state, train_batch_sharding=train_bs,
                 eval_batch_sharding=eval_bs, init_state=init, train_step=train_step, eval_step=eval_step)


