"""The embedding's custom gradient equals the plain `jnp.take` gradient (both branches, repeated ids)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.layers import embed


def _ids(rng, vocab, shape):
  # Skewed like text: a few ids take most positions, so rows receive many contributions.
  p = 1.0 / np.arange(1, vocab + 1) ** 1.2
  return jnp.asarray(rng.choice(vocab, size=shape, p=p / p.sum()), jnp.int32)


@pytest.mark.parametrize("vocab,one_hot_max", [(37, 1024), (37, 8)])  # one-hot branch, scatter branch
def test_value_and_gradient_match_take_float64(x64, vocab, one_hot_max):
  del x64
  rng = np.random.default_rng()
  table = jnp.asarray(rng.normal(size=(vocab, 6)))
  ids = _ids(rng, vocab, (3, 50))
  w = jnp.asarray(rng.normal(size=(3, 50, 6)))
  ours = lambda t: jnp.sum(embed.lookup(t, ids, jnp.dtype(jnp.float64), one_hot_max) * w)
  ref = lambda t: jnp.sum(jnp.take(t, ids, axis=0) * w)
  np.testing.assert_array_equal(embed.lookup(table, ids, jnp.dtype(jnp.float64), one_hot_max),
                                jnp.take(table, ids, axis=0))
  # Sums of up to 150 float64 terms in different orders: rounding only.
  np.testing.assert_allclose(jax.grad(ours)(table), jax.grad(ref)(table), rtol=1e-12, atol=1e-12)


def test_bf16_gradient_accumulates_in_float32():
  """A bf16 scatter into a bf16 table rounds every addition; the float32 accumulation does not."""
  rng = np.random.default_rng()
  vocab, d = 16, 8
  table = jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32)
  ids = jnp.zeros((4096,), jnp.int32).at[::7].set(3)  # thousands of contributions to row 0
  g = jnp.asarray(rng.normal(size=(4096, d)), jnp.bfloat16)
  exact = np.zeros((vocab, d))
  np.add.at(exact, np.asarray(ids), np.asarray(g, np.float64))
  for one_hot_max in (1024, 1):
    _, vjp = jax.vjp(lambda t: embed.lookup(t, ids, jnp.dtype(jnp.bfloat16), one_hot_max), table)
    (grad,) = vjp(g)
    assert grad.dtype == jnp.float32
    # float32 accumulation of bf16 values: error ~ n * eps32 * sum|g|, far below one bf16 ulp of the sums.
    bound = 4096 * np.finfo(np.float32).eps * np.abs(np.asarray(g, np.float64)).sum(0).max()
    np.testing.assert_allclose(grad, exact, rtol=0, atol=bound)


def test_module_is_flax_embed_with_the_same_parameter():
  rng = np.random.default_rng()
  ids = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  ours, ref = embed.Embed(11, 4, dtype=jnp.float32), nn.Embed(11, 4, dtype=jnp.float32)
  params = ref.init(jax.random.key(0), ids)
  assert jax.tree.structure(ours.init(jax.random.key(0), ids)) == jax.tree.structure(params)
  np.testing.assert_array_equal(ours.apply(params, ids), ref.apply(params, ids))
  x = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  np.testing.assert_array_equal(ours.apply(params, x, method="attend"), ref.apply(params, x, method="attend"))
  with pytest.raises(ValueError, match="integers"):
    ours.apply(params, ids.astype(jnp.float32))
