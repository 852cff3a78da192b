"""The GLU activation's custom VJP against autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax.layers.glu import swiglu


def _plain(gu):
  acc = jnp.promote_types(gu.dtype, jnp.float32)
  return (jax.nn.silu(gu[..., 0, :].astype(acc)) * gu[..., 1, :].astype(acc)).astype(gu.dtype)


def _value_and_grad(fn, gu, w):
  return jax.value_and_grad(lambda v: jnp.sum(fn(v) * w))(gu)


def test_matches_autodiff_float64(x64):
  rng = np.random.default_rng()
  gu = jnp.asarray(rng.normal(size=(3, 5, 2, 24)) * 3)  # gates well into both tails of the sigmoid
  w = jnp.asarray(rng.normal(size=(3, 5, 24)))
  (v, g), (v_ref, g_ref) = _value_and_grad(swiglu, gu, w), _value_and_grad(_plain, gu, w)
  np.testing.assert_allclose(v, v_ref, rtol=1e-13)
  np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14)


def test_matches_autodiff_bfloat16():
  """In bf16 both compute in float32 and round once to bf16 (8 significant bits): within one bf16 ulp."""
  rng = np.random.default_rng()
  gu = jnp.asarray(rng.normal(size=(4, 7, 2, 64)) * 3, jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(4, 7, 64)), jnp.float32)
  fwd = jax.jit(lambda v: swiglu(v))
  assert fwd(gu).dtype == jnp.bfloat16 and fwd(gu).shape == (4, 7, 64)
  np.testing.assert_array_equal(fwd(gu), _plain(gu))
  g = jax.jit(jax.grad(lambda v: jnp.sum(swiglu(v).astype(jnp.float32) * w)))(gu)
  g_ref = jax.jit(jax.grad(lambda v: jnp.sum(_plain(v).astype(jnp.float32) * w)))(gu)
  assert g.dtype == jnp.bfloat16
  g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
  np.testing.assert_allclose(g, g_ref, rtol=2.0 ** -7, atol=1e-30)
