"""The jitted train step: micro-batches as a loop or unrolled."""

import jax
import numpy as np

from experiments.configs import tiny
from mmfree_jax.models import build_model, model_config
from mmfree_jax.train.optimizer import make_optimizer
from mmfree_jax.train.step import init_state, make_train_step


def _two_steps(config, unroll: int):
  model = build_model(model_config(config.model))
  tx, lr = make_optimizer(config.optim, 10)
  step = jax.jit(make_train_step(model, tx, lr, unroll_micro_batches=unroll))
  state = jax.jit(lambda: init_state(model, tx, 0, 16))()
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(2):
    tokens = rng.integers(0, config.model.vocab_size, (2, 2, 17))
    batch = dict(inputs=tokens[..., :-1], targets=tokens[..., 1:], weights=np.ones((2, 2, 16), np.float32),
                 segment_ids=np.ones((2, 2, 16), np.int32), positions=np.broadcast_to(np.arange(16), (2, 2, 16)))
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_unrolled_micro_batches_match_the_loop_bit_for_bit():
  """`unroll_micro_batches` lets the compiler merge work across micro-batches (bf16, weights quantized once per
  pass, the configuration it is for); the parameters and losses stay the same bits."""
  config = tiny.get_config()
  config.model.update(d_model=32, n_layers=2, n_heads=2, dtype="bfloat16", quantize_weights_once=True)
  loop, loop_losses = _two_steps(config, unroll=1)
  unrolled, unrolled_losses = _two_steps(config, unroll=2)
  assert unrolled_losses == loop_losses
  jax.tree.map(np.testing.assert_array_equal, unrolled.params, loop.params)
  jax.tree.map(np.testing.assert_array_equal, unrolled.opt_state, loop.opt_state)
