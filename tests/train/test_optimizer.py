"""Learning-rate and weight-decay schedules, the decay mask."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmfree_jax.train import optimizer


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(peak_lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, b1=0.9,
                                     b2=0.95, eps=1e-8, weight_decay=0.1, wd_schedule="constant", clip_norm=1.0))
  c.update(kw)
  return c


def test_cosine_warmup_peak_and_floor():
  lr = optimizer.learning_rate_schedule(_cfg(), 100)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(lr(100), 1e-4, rtol=1e-5)
  assert all(float(lr(s)) >= float(lr(s + 1)) for s in range(10, 100))


def test_cosine_halve_halves_at_the_midpoint():
  base = optimizer.learning_rate_schedule(_cfg(), 100)
  halve = optimizer.learning_rate_schedule(_cfg(schedule="cosine_halve"), 100)
  np.testing.assert_allclose(halve(49), base(49), rtol=1e-6)
  np.testing.assert_allclose(halve(50), 0.5 * base(50), rtol=1e-6)
  np.testing.assert_allclose(halve(80), 0.5 * base(80), rtol=1e-6)


def test_two_stage_weight_decay():
  wd = optimizer.weight_decay_schedule(_cfg(wd_schedule="two_stage"), 100)
  assert float(wd(49)) == pytest.approx(0.1) and float(wd(50)) == 0.0


def test_unknown_schedule_is_an_error():
  with pytest.raises(ValueError, match="optim.schedule"):
    optimizer.learning_rate_schedule(_cfg(schedule="linear"), 10)


def test_decay_mask_matrices_only():
  params = {"embeddings": {"embedding": jnp.ones((8, 4))}, "lower_bounds": jnp.ones((2, 4)),
            "layers": {"attn": {"f_proj": {"kernel": jnp.ones((2, 4, 4)), "norm_scale": jnp.ones((2, 4))}}},
            "norm": {"scale": jnp.ones(4)}}
  mask = optimizer.decay_mask(params)
  assert mask["embeddings"]["embedding"] and mask["layers"]["attn"]["f_proj"]["kernel"]
  assert not mask["lower_bounds"] and not mask["norm"]["scale"]
  assert not mask["layers"]["attn"]["f_proj"]["norm_scale"]


def test_decoupled_decay_applies_to_masked_leaves():
  tx, _ = optimizer.make_optimizer(_cfg(warmup_steps=0, schedule="cosine"), 10)
  params = {"w": jnp.ones((2, 2)), "s": jnp.ones(2)}
  zero = {"w": jnp.zeros((2, 2)), "s": jnp.zeros(2)}
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -1e-3 * 0.1, rtol=1e-6)  # -lr * wd * param
  np.testing.assert_array_equal(updates["s"], 0)
