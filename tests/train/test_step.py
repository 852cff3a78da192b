"""The train step's accumulation variants: the weight view once per step and per-layer accumulation give the
same bits as the plain step (same sums in the same order), and the program turns them on where they pay."""

import jax
import numpy as np
import pytest

from experiments.configs import tiny
from mmfree_jax.models import weight_view
from mmfree_jax.train import sharding
from mmfree_jax.train import step as step_lib
from mmfree_jax.train.program import build_program, resolve_batch

ACCUM, ROWS, T = 2, 2, 32


def _program(**model):
  c = tiny.get_config()
  c.model.update(d_model=32, n_layers=2, remat="none", bitlinear="vanilla", **model)
  c.train.update(global_batch=ACCUM * ROWS, grad_accum=ACCUM)
  c.data.seq_len = T
  c.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  resolve_batch(c, mesh, 1)
  return build_program(c, mesh)


def _batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 259, size=(ACCUM, ROWS, T + 1), dtype=np.int32)
  shape = (ACCUM, ROWS, T)
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(T, dtype=np.int32), shape).copy(),
          "weights": rng.uniform(0.5, 1.0, size=shape).astype(np.float32)}


def _run(prog, **variant):
  fn = jax.jit(step_lib.make_train_step(prog.model, prog.tx, prog.lr_schedule, **variant))
  state = prog.init_state()
  for seed in range(2):
    state, metrics = fn(state, _batch(seed))
  return jax.tree.leaves(state), metrics


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_view_and_per_layer_accumulation_are_bit_identical(dtype):
  """float32: every layer gradient is added to an accumulator; bfloat16: the per-layer ones of the 2 micro-batches
  are kept and summed after the loop (`make_train_step`'s `kept`)."""
  prog = _program(unroll_layers=2, quantize_weights_once=True, dtype=dtype)
  with prog.context:
    want, want_metrics = _run(prog)
    got, got_metrics = _run(prog, weight_view=weight_view(prog.model_cfg), per_layer=True)
  assert float(got_metrics["loss"]) == float(want_metrics["loss"])
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_split_and_stack_layers_round_trip():
  prog = _program()
  params = jax.eval_shape(prog.init_state).params
  split = jax.eval_shape(step_lib.split_layers, params)
  kernel = split["params"]["layers"]["attn"]["o_proj"]["kernel"]
  assert isinstance(kernel, tuple) and len(kernel) == 2 and kernel[0].shape == (32, 32)
  assert not isinstance(split["params"]["layers"]["attn"]["o_proj"]["norm_scale"], tuple)  # vectors stay stacked
  restacked = jax.eval_shape(step_lib.stack_layers, split)
  assert jax.tree.structure(restacked) == jax.tree.structure(params)
  assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(restacked), jax.tree.leaves(params)))


@pytest.mark.parametrize("model, on", [(dict(unroll_layers=2, quantize_weights_once=True), True),
                                       (dict(unroll_layers=1, quantize_weights_once=True), False),
                                       (dict(unroll_layers=2, quantize_weights_once=False), False)])
def test_program_turns_per_layer_on_with_the_view_and_unrolled_layers(model, on, monkeypatch):
  seen = {}
  real = step_lib.make_train_step

  def spy(*args, **kw):
    seen.update(kw)
    return real(*args, **kw)

  monkeypatch.setattr("mmfree_jax.train.program.make_train_step", spy)
  _program(**model)
  assert seen["per_layer"] is on
  assert (seen["weight_view"] is not None) == model["quantize_weights_once"]
