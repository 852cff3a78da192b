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


def _plain_output(g, h, scale, eps):
  return mg.output_gate_reference(g, h, scale, eps).astype(g.dtype)


def test_gradients_match_autodiff_float64(x64):
  rng = np.random.default_rng()
  (fr, ir, g), lb, scale, w = _inputs(rng, (3, 5, 24), jnp.float64)
  got = jax.value_and_grad(_input_loss(mg.input_gates, w[:2]), argnums=(0, 1, 2))(fr, ir, lb)
  want = jax.value_and_grad(_input_loss(_plain_inputs, w[:2]), argnums=(0, 1, 2))(fr, ir, lb)
  got_o = jax.value_and_grad(_output_loss(mg.output_gate, w[2]), argnums=(0, 1, 2))(g, fr, scale)
  want_o = jax.value_and_grad(_output_loss(_plain_output, w[2]), argnums=(0, 1, 2))(g, fr, scale)
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
                                jax.jit(_plain_output, static_argnums=3)(g, fr, scale, EPS))
  cases = ((_input_loss(mg.input_gates, w[:2]), _input_loss(_plain_inputs, w[:2]), (fr, ir, lb)),
           (_output_loss(mg.output_gate, w[2]), _output_loss(_plain_output, w[2]), (g, fr, scale)))
  for loss, loss_ref, args in cases:
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    grads_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(*args)
    for a, b in zip(grads[:2], grads_ref[:2]):
      assert a.dtype == jnp.bfloat16
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, rtol=2.0 ** -7, atol=1e-5 * np.abs(b).max())
    np.testing.assert_allclose(grads[2], grads_ref[2], rtol=1e-4, atol=1e-5)


def _output_grads(kernel, g, h, scale, w):
  fn = lambda g_, h_, s_: jnp.sum(mg.output_gate(g_, h_, s_, EPS, kernel).astype(w.dtype) * w)
  return jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(g, h, scale)


def test_output_gate_kernel_backward_float64(x64):
  """The backward kernel (interpret mode here; rows of 40 = 32 + 8: two pieces) against the XLA backward."""
  (g, h, _), _, scale, w = _inputs(np.random.default_rng(), (3, 5, 40), jnp.float64)
  for a, b in zip(_output_grads(True, g, h, scale, w[0]), _output_grads(False, g, h, scale, w[0])):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_output_gate_kernel_backward_bfloat16():
  """bf16 inputs: both compute in float32 and round dg and dh once; where the norm's backward cancels the
  float32 values may differ by summation order relative to the row's largest terms (atol 1e-5 of the largest,
  as in `test_bfloat16_forward_bits_and_gradients`), and d_scale (float32 sums over 28 rows) to summation order."""
  (g, h, _), _, scale, w = _inputs(np.random.default_rng(), (4, 7, 64), jnp.bfloat16)
  got, want = _output_grads(True, g, h, scale, w[0]), _output_grads(False, g, h, scale, w[0])
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = np.float32(a), np.float32(b)
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-5 * np.abs(b).max())


def test_output_gate_kernel_under_a_mesh():
  """Under a (data, fsdp, tensor) mesh each device runs the kernel on its rows; d_scale's per-program sums are
  summed over every device's rows."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  (g, h, _), _, scale, w = _inputs(np.random.default_rng(), (8, 4, 32), jnp.float32)
  want = _output_grads(False, g, h, scale, w[0])
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    rows = NamedSharding(mesh, P(sharding.BATCH, None, None))
    got = _output_grads(True, jax.device_put(g, rows), jax.device_put(h, rows), scale, w[0])
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)  # float32; different summation orders


def _input_grads(kernel, fr, ir, lb, resets, w):
  def fn(fr_, ir_, lb_):
    f, i = mg.input_gates(fr_, ir_, lb_, resets, kernel)
    return jnp.sum(f.astype(w[0].dtype) * w[0]) + jnp.sum(i.astype(w[1].dtype) * w[1])
  return jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(fr, ir, lb)


def _resets(rng, shape):
  return jnp.asarray(rng.uniform(size=shape[:-1]) < 0.2)


def test_input_gates_resets_zero_f():
  rng = np.random.default_rng()
  (fr, ir, _), lb, _, _ = _inputs(rng, (3, 5, 8), jnp.float32)
  resets = _resets(rng, fr.shape)
  f, i = mg.input_gates(fr, ir, lb, resets)
  f_all, i_all = mg.input_gates(fr, ir, lb)
  np.testing.assert_array_equal(f, jnp.where(resets[..., None], 0.0, f_all))
  np.testing.assert_array_equal(i, i_all)


def test_input_gates_kernel_backward_float64(x64):
  """The backward kernel (interpret mode here; rows of 40 = 32 + 8: two pieces) against the XLA backward, with
  resets (f and its cotangent zeroed there) and without."""
  rng = np.random.default_rng()
  (fr, ir, _), lb, _, w = _inputs(rng, (3, 5, 40), jnp.float64)
  for resets in (None, _resets(rng, fr.shape)):
    for a, b in zip(_input_grads(True, fr, ir, lb, resets, w), _input_grads(False, fr, ir, lb, resets, w)):
      assert a.shape == b.shape and a.dtype == b.dtype
      np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_input_gates_kernel_backward_bfloat16():
  """bf16 inputs: the same float32 formulas per element, each output rounded once to bf16 (one ulp: the
  sigmoids' and products' float32 rounding may differ), lb's cotangent (float32 sums over 28 rows) to summation
  order relative to the largest term."""
  rng = np.random.default_rng()
  (fr, ir, _), lb, _, w = _inputs(rng, (4, 7, 64), jnp.bfloat16)
  resets = _resets(rng, fr.shape)
  for a, b in zip(_input_grads(True, fr, ir, lb, resets, w), _input_grads(False, fr, ir, lb, resets, w)):
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = np.float32(a), np.float32(b)
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-5 * np.abs(b).max())


def test_input_gates_kernel_under_a_mesh():
  """Per device on its rows; lb's per-program sums summed over every device's rows."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng()
  (fr, ir, _), lb, _, w = _inputs(rng, (8, 4, 32), jnp.float32)
  resets = _resets(rng, fr.shape)
  want = _input_grads(False, fr, ir, lb, resets, w)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    rows = NamedSharding(mesh, P(sharding.BATCH, None, None))
    got = _input_grads(True, jax.device_put(fr, rows), jax.device_put(ir, rows), lb, resets, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)  # float32; different summation orders
