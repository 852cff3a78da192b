"""The MLGRU gates' custom VJPs against autodiff of the plain formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax.layers import mlgru_gates as mg

EPS = 1e-6


def _inputs(rng, shape, dtype):
  """Raw projections well into both tails of the sigmoids, a lower bound in [0, 1), cotangent weights."""
  raw = [jnp.asarray(rng.normal(size=shape) * 3, dtype) for _ in range(3)]
  lb = jnp.asarray(rng.uniform(0, 1, size=shape[-1:]), jnp.float64 if dtype == jnp.float64 else jnp.float32)
  scale = jnp.asarray(rng.normal(size=shape[-1:]) + 1, lb.dtype)
  w = [jnp.asarray(rng.normal(size=shape), lb.dtype) for _ in range(3)]
  return raw, lb, scale, w


def _input_loss(fn, w):
  return lambda fr, ir, lb: sum(jnp.sum(v.astype(wi.dtype) * wi) for v, wi in zip(fn(fr, ir, lb), w))


def _output_loss(fn, w):
  return lambda g, h, scale: jnp.sum(fn(g, h, scale, EPS).astype(w.dtype) * w)


def _plain_inputs(fr, ir, lb):
  return tuple(v.astype(fr.dtype) for v in mg.input_gates_reference(fr, ir, lb))


def test_gradients_match_autodiff_float64(x64):
  rng = np.random.default_rng()
  (fr, ir, g), lb, scale, w = _inputs(rng, (3, 5, 24), jnp.float64)
  got = jax.value_and_grad(_input_loss(mg.input_gates, w[:2]), argnums=(0, 1, 2))(fr, ir, lb)
  want = jax.value_and_grad(_input_loss(_plain_inputs, w[:2]), argnums=(0, 1, 2))(fr, ir, lb)
  got_o = jax.value_and_grad(_output_loss(mg.output_gate, w[2]), argnums=(0, 1, 2))(g, fr, scale)
  want_o = jax.value_and_grad(_output_loss(mg.output_gate_reference, w[2]), argnums=(0, 1, 2))(g, fr, scale)
  for (v, grads), (v_ref, grads_ref) in ((got, want), (got_o, want_o)):
    np.testing.assert_allclose(v, v_ref, rtol=1e-13)
    for a, b in zip(grads, grads_ref):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_bfloat16_forward_bits_and_gradients():
  """Forward: the same float32 formulas, so the same bits. Backward: both compute in float32 and round the raw
  projections' cotangents once to bf16 (8 significant bits: one ulp is up to 2^-7 of the value). Where the
  norm's backward cancels (`dghat - ghat * mean(...)`) the float32 values before rounding may differ by float32
  summation order relative to the row's largest terms: atol 1e-5 of the largest cotangent. The float32 parameter
  cotangents (sums over 448 rows) agree to float32 summation order."""
  rng = np.random.default_rng()
  (fr, ir, g), lb, scale, w = _inputs(rng, (4, 7, 64), jnp.bfloat16)
  fwd = jax.jit(mg.input_gates)
  for a, b in zip(fwd(fr, ir, lb), jax.jit(_plain_inputs)(fr, ir, lb)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.jit(mg.output_gate, static_argnums=3)(g, fr, scale, EPS),
                                jax.jit(mg.output_gate_reference, static_argnums=3)(g, fr, scale, EPS))
  cases = ((_input_loss(mg.input_gates, w[:2]), _input_loss(_plain_inputs, w[:2]), (fr, ir, lb)),
           (_output_loss(mg.output_gate, w[2]), _output_loss(mg.output_gate_reference, w[2]), (g, fr, scale)))
  for loss, loss_ref, args in cases:
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    grads_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(*args)
    for a, b in zip(grads[:2], grads_ref[:2]):
      assert a.dtype == jnp.bfloat16
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, rtol=2.0 ** -7, atol=1e-5 * np.abs(b).max())
    np.testing.assert_allclose(grads[2], grads_ref[2], rtol=1e-4, atol=1e-5)


def _gated_loss(impl, w, w_last, h0, resets):
  def loss(fr, ir, lb):
    h, last = mg.gated_scan(fr, ir, lb, h0, resets, impl=impl)
    return jnp.sum(h.astype(w.dtype) * w) + jnp.sum(last * w_last), h
  return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def _gated_inputs(rng, dtype, shape=(3, 24, 16)):
  """Raw projections, lower bound, cotangent weights, an initial state and resets (documents of ~8 tokens)."""
  (fr, ir, _), lb, _, _ = _inputs(rng, shape, dtype)
  state = jnp.float64 if dtype == jnp.float64 else jnp.float32
  w = jnp.asarray(rng.normal(size=shape), state)
  w_last = jnp.asarray(rng.normal(size=shape[::2]), state)
  h0 = jnp.asarray(rng.normal(size=shape[::2]), state)
  resets = jnp.asarray(rng.uniform(size=shape[:2]) < 0.12).at[:, 0].set(False)
  return fr, ir, lb, w, w_last, h0, resets


def test_gated_scan_kernel_matches_gates_then_scan_float64(x64):
  """The recurrence kernel with the gates inside (interpret mode here) against `input_gates` then the sequential
  recurrence, differentiated by autodiff: the same function, so float64 agrees to summation order."""
  fr, ir, lb, w, w_last, h0, resets = _gated_inputs(np.random.default_rng(), jnp.float64)
  (v, h), grads = _gated_loss("pallas", w, w_last, h0, resets)(fr, ir, lb)
  (v_ref, h_ref), grads_ref = _gated_loss("sequential", w, w_last, h0, resets)(fr, ir, lb)
  np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(v, v_ref, rtol=1e-12)
  for a, b in zip(grads, grads_ref):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_gated_scan_kernel_bfloat16():
  """bf16 raw projections, float32 state: the kernel rounds f and i to bf16 where `input_gates` returns them and
  its backward rounds the recurrence's cotangents where `linear_scan`'s VJP writes them, so it computes what the
  two-step path computes, in float32: h to one bf16 ulp (its rounding of a float32 state that differs by
  summation order), the raw projections' cotangents to one bf16 ulp of the largest (atol 2^-7 of the largest
  magnitude), lb's (float32 sums over 72 steps) to float32 summation order relative to the largest term."""
  fr, ir, lb, w, w_last, h0, resets = _gated_inputs(np.random.default_rng(), jnp.bfloat16)
  (v, h), grads = jax.jit(_gated_loss("pallas", w, w_last, h0, resets))(fr, ir, lb)
  (v_ref, h_ref), grads_ref = jax.jit(_gated_loss("associative", w, w_last, h0, resets))(fr, ir, lb)
  assert h.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(h), np.float32(h_ref), rtol=2 ** -7, atol=1e-6)
  np.testing.assert_allclose(v, v_ref, rtol=1e-4)
  for a, b in zip(grads, grads_ref):
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = np.float32(a), np.float32(b)
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=2 ** -7 * np.abs(b).max())


def test_gated_scan_kernel_under_a_mesh():
  """Under a (data, fsdp, tensor) mesh the kernel runs per device on its rows and channels (`shard_map`); lb's
  cotangent, summed per device over its rows, is summed over the data-parallel devices by shard_map's transpose."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  fr, ir, lb, w, w_last, h0, resets = _gated_inputs(np.random.default_rng(), jnp.float32, shape=(4, 32, 16))
  ref = jax.jit(_gated_loss("sequential", w, w_last, h0, resets))(fr, ir, lb)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    seq = NamedSharding(mesh, P(sharding.BATCH, None, "tensor"))
    args = (jax.device_put(fr, seq), jax.device_put(ir, seq), lb)
    lowered = jax.jit(_gated_loss("pallas", w, w_last, h0, resets)).lower(*args)
    got = lowered.compile()(*args)
  assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
  for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)  # float32; the two sum in different orders
