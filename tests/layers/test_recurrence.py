"""The recurrence backends (the GPU kernel in interpret mode) against a float64 Python loop: forward, gradients,
resets, h0, ragged chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.layers.recurrence import IMPLS, linear_scan, resets_from_segments


def loop_reference(a, b, h0, resets):
  """h_t = a_t h_{t-1} + b_t, with h zeroed before each reset token; a plain loop in float64."""
  h = np.zeros((b.shape[0], b.shape[2])) if h0 is None else np.array(h0, np.float64)
  out = np.zeros(b.shape)
  for t in range(b.shape[1]):
    keep = 1.0 if resets is None else (~resets[:, t])[:, None].astype(np.float64)
    h = a[:, t] * (h * keep) + b[:, t]
    out[:, t] = h
  return out, h


def _inputs(rng, bsz=3, t=37, d=5, with_h0=True, with_resets=True):
  a = rng.uniform(0.5, 1.0, size=(bsz, t, d))
  b = rng.normal(size=(bsz, t, d))
  h0 = rng.normal(size=(bsz, d)) if with_h0 else None
  resets = None
  if with_resets:
    seg = np.cumsum(rng.uniform(size=(bsz, t)) < 0.1, axis=1)
    resets = np.asarray(resets_from_segments(jnp.asarray(seg)))
  return a, b, h0, resets


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_h0,with_resets", [(False, False), (True, False), (False, True), (True, True)])
def test_forward_matches_loop(x64, impl, with_h0, with_resets):
  a, b, h0, resets = _inputs(np.random.default_rng(), with_h0=with_h0, with_resets=with_resets)
  ref_h, ref_last = loop_reference(a, b, h0, resets)
  h, last = linear_scan(jnp.asarray(a), jnp.asarray(b), None if h0 is None else jnp.asarray(h0),
                        None if resets is None else jnp.asarray(resets), impl=impl, chunk=8)  # 37 = 4*8 + 5
  np.testing.assert_allclose(h, ref_h, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(last, ref_last, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["associative", "chunked", "pallas"])
def test_gradients_match_sequential(x64, impl):
  a, b, h0, resets = (jnp.asarray(v) for v in _inputs(np.random.default_rng()))
  w = jnp.asarray(np.random.default_rng().normal(size=b.shape))

  def loss(impl_, a_, b_, h0_):
    h, last = linear_scan(a_, b_, h0_, resets, impl=impl_, chunk=8)
    return jnp.sum(h * w) + jnp.sum(last ** 2)

  ref = jax.grad(loss, argnums=(1, 2, 3))("sequential", a, b, h0)
  got = jax.grad(loss, argnums=(1, 2, 3))(impl, a, b, h0)
  for r, g in zip(ref, got):
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_sequential_gradient_matches_finite_differences(x64):
  a, b, h0, _ = (None if v is None else jnp.asarray(v) for v in _inputs(np.random.default_rng(), t=6, with_resets=False))
  f = lambda a_: jnp.sum(linear_scan(a_, b, h0, impl="sequential")[0] ** 2)
  g = jax.grad(f)(a)
  e = jnp.zeros_like(a).at[1, 3, 2].set(1e-6)
  np.testing.assert_allclose((f(a + e) - f(a - e)) / 2e-6, g[1, 3, 2], rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_inputs_keep_a_float32_state(impl):
  rng = np.random.default_rng()
  a, b = rng.uniform(0.9, 1.0, size=(2, 300, 4)), rng.normal(size=(2, 300, 4))
  h, last = linear_scan(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), impl=impl, chunk=64)
  assert h.dtype == jnp.bfloat16 and last.dtype == jnp.float32
  ref, _ = loop_reference(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64),
                          np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64), None, None)
  # Only the final cast rounds: bf16 has 8 significant bits (relative error <= 2^-8 of |h|).
  np.testing.assert_allclose(np.asarray(h, np.float64), ref, rtol=2 ** -8, atol=1e-6)


def test_resets_from_segments():
  seg = jnp.array([[1, 1, 2, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(resets_from_segments(seg), [[0, 0, 1, 0, 0, 1, 1, 0]])


@pytest.mark.parametrize("batch", [4, 3])
def test_kernel_under_a_mesh_matches_sequential(batch):
  """Under a (data, fsdp, tensor) mesh the kernel runs per device on its rows and channels (`shard_map`); rows
  that the 4 data-parallel devices do not divide (3, or `model.init`'s one row) stay whole on each device."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)  # as make_mesh
  rng = np.random.default_rng()
  a = jnp.asarray(rng.uniform(0.5, 1.0, size=(batch, 32, 16)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(batch, 32, 16)), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(batch, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=b.shape), jnp.float32)

  def loss(impl, a_, b_, h0_):
    h, last = linear_scan(a_, b_, h0_, impl=impl)
    return jnp.sum(h * w) + jnp.sum(last ** 2), (h, last)

  grad = lambda impl: jax.jit(jax.grad(lambda *v: loss(impl, *v), argnums=(0, 1, 2), has_aux=True))
  ref = grad("sequential")(a, b, h0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    seq = NamedSharding(mesh, P(sharding.BATCH if batch % 4 == 0 else None, None, "tensor"))
    args = (jax.device_put(a, seq), jax.device_put(b, seq), h0)
    lowered = grad("pallas").lower(*args)
    got = lowered.compile()(*args)
  assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)  # float32; the two sum in different orders


@pytest.mark.parametrize("prefetch", [False, True])
def test_kernel_walks_blocks_with_and_without_prefetch(x64, monkeypatch, prefetch):
  """Both ways of walking time in the GPU kernel (interpret mode here), blocks of 4 steps (T = 12)."""
  from mmfree_jax.layers import recurrence_kernel  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(recurrence_kernel, "PREFETCH", prefetch)
  monkeypatch.setattr(recurrence_kernel, "UNROLL", 4)
  a, b, h0, resets = (jnp.asarray(v) for v in _inputs(np.random.default_rng(), t=12, d=8))
  w = jnp.asarray(np.random.default_rng().normal(size=b.shape))

  def loss(impl_, a_, b_, h0_):
    h, last = linear_scan(a_, b_, h0_, resets, impl=impl_)
    return jnp.sum(h * w) + jnp.sum(last ** 2)

  ref = jax.value_and_grad(loss, argnums=(1, 2, 3))("sequential", a, b, h0)
  got = jax.value_and_grad(loss, argnums=(1, 2, 3))("pallas", a, b, h0)
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_small_grids_take_narrower_channel_blocks():
  """B x D / BLOCK_D programs under SMALL_GRID: blocks of SMALL_GRID_BLOCK_D channels (the 1.3B step's micro-batch
  of 4 rows x 2048 channels: 512 programs of 16 instead of 128 of 64); larger grids keep BLOCK_D."""
  from mmfree_jax.layers import recurrence_kernel as rk  # pylint: disable=g-import-not-at-top
  assert (rk.BLOCK_D, rk.SMALL_GRID, rk.SMALL_GRID_BLOCK_D) == (64, 256, 16)
  assert rk.block_d(4, 2048) == 16 and rk.block_d(8, 1024) == 16
  assert rk.block_d(8, 2048) == 64 and rk.block_d(16, 1024) == 64
  assert rk.block_d(1, 24) == 8  # powers of two dividing D


@pytest.mark.parametrize("small_grid", [0, 256])
def test_kernel_values_with_either_channel_block(x64, monkeypatch, small_grid):
  """The kernel's values and gradients against the loop with 32 channels in one block (SMALL_GRID 0: BLOCK_D) or
  in two (the small-grid rule's 16)."""
  from mmfree_jax.layers import recurrence_kernel as rk  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(rk, "SMALL_GRID", small_grid)
  rng = np.random.default_rng()
  a, b, h0, _ = (jnp.asarray(v) for v in _inputs(rng, t=8, d=32))
  w = jnp.asarray(rng.normal(size=b.shape))
  assert rk.block_d(a.shape[0], 32) == (16 if small_grid else 32)

  def loss(impl_, a_, b_, h0_):
    h, last = linear_scan(a_, b_, h0_, impl=impl_)
    return jnp.sum(h * w) + jnp.sum(last ** 2)

  ref = jax.value_and_grad(loss, argnums=(1, 2, 3))("sequential", a, b, h0)
  got = jax.value_and_grad(loss, argnums=(1, 2, 3))("pallas", a, b, h0)
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
