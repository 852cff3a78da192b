"""The block's norm inside the BitLinear kernels (`prenorm_kernel`, `bitlinear.prenormed_group`) against the unfused
composition: XLA's add and `RMSNorm`, then the BitLinear layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.layers import bitlinear as bl
from mmfree_jax.layers import prenorm_kernel as pk
from mmfree_jax.layers.norm import PreNorm


@pytest.fixture(params=["whole_rows", "row_tiles", "row_tiles_other_prefetch"])
def backward_walk(request, monkeypatch):
  """The kernels' walks: as configured (the test rows in one tile per program), one row per tile (several tiles per
  program, loaded ahead as configured), or one row per tile loaded ahead the other way in each direction."""
  if request.param != "whole_rows":
    monkeypatch.setattr(pk, "TILE_ELEMS", 64)  # the test rows are 48 wide
  if request.param == "row_tiles_other_prefetch":
    monkeypatch.setattr(pk, "FORWARD_PREFETCH", not pk.FORWARD_PREFETCH)
    monkeypatch.setattr(pk, "BACKWARD_PREFETCH_SCALES", 1 if pk.BACKWARD_PREFETCH_SCALES is None else None)
  return request.param


def _inputs(rng, shape, n, dtype, residual=True):
  k = shape[-1]
  x = jnp.asarray(rng.normal(size=shape), dtype)
  r = jnp.asarray(rng.normal(size=shape) * 2.0, dtype) if residual else None
  w = jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.float64 if dtype == jnp.float64 else jnp.float32)
  gs = [jnp.asarray(rng.uniform(0.5, 1.5, k), w.dtype) for _ in range(n)]
  kernels = [jnp.asarray(rng.normal(size=(k, 24)) * 0.02, w.dtype) for _ in range(n)]
  return x, r, w, gs, kernels


def _loss(impl, fused, dtype):
  """(loss, outputs) of the stream and the BitLinears' outputs against fixed random cotangents, jitted; `fused`:
  `prenormed_group`, else the unfused composition (`PreNorm.unfused`, then `bitlinear_group`)."""
  def loss(x, r, w, gs, kernels, cots):
    p = PreNorm(x, w, 1e-6, r)
    if fused:
      h, outs = bl.prenormed_group(p, gs, kernels, impl=impl, dtype=dtype)
    else:
      h, n = p.unfused(dtype)
      outs = bl.bitlinear_group(n, gs, kernels, impl=impl)
    total = jnp.sum((cots[0] * h).astype(jnp.float32 if dtype == jnp.bfloat16 else dtype))
    total += sum(jnp.sum((c * o).astype(total.dtype)) for c, o in zip(cots[1:], outs))
    return total, (h, outs)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


@pytest.mark.parametrize("n, residual", [(3, False), (1, True)])  # the MLGRU's site, the GLU's
@pytest.mark.parametrize("impl", ["pallas", "pallas_fused"])
def test_values_and_gradients_equal_unfused_float64(x64, impl, n, residual, backward_walk):
  """Values and the gradients of x, residual, the block's scale, the BitLinear scales and kernels, with the stream's
  own cotangent (the residual connection's) added inside the backward kernel: to float64 rounding."""
  rng = np.random.default_rng()
  # 10 rows of 48 = 32 + 16: programs of 2 rows (one or two tiles).
  x, r, w, gs, kernels = _inputs(rng, (2, 5, 48), n, jnp.float64, residual)
  cots = [jnp.asarray(rng.normal(size=(2, 5, 48)))] + [jnp.asarray(rng.normal(size=(2, 5, 24))) for _ in range(n)]
  (ref, (ref_h, ref_outs)), ref_grads = _loss("vanilla", False, jnp.float64)(x, r, w, gs, kernels, cots)
  (val, (h, outs)), grads = _loss(impl, True, jnp.float64)(x, r, w, gs, kernels, cots)
  np.testing.assert_array_equal(h, ref_h)
  np.testing.assert_allclose(val, ref, rtol=1e-12)
  for a, b in zip(outs, ref_outs):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  assert (grads[1] is None) == (not residual)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * max(1.0, float(np.abs(b).max())))


def test_bfloat16_matches_the_unfused_kernel_path(backward_walk):
  """bf16 rows (24 rows, a width of three power-of-two pieces): the stream bit for bit; the quantized inputs and
  outputs within a quantization step; gradients within a few bf16 ulps of each result's scale."""
  rng = np.random.default_rng()
  x, r, w, gs, kernels = _inputs(rng, (3, 8, 352), 3, jnp.bfloat16)  # 352 = 256 + 64 + 32
  cots = [jnp.asarray(rng.normal(size=(3, 8, 352)), jnp.bfloat16)]
  cots += [jnp.asarray(rng.normal(size=(3, 8, 24)), jnp.bfloat16) for _ in range(3)]
  (_, (ref_h, ref_outs)), ref = _loss("pallas_fused", False, jnp.bfloat16)(x, r, w, gs, kernels, cots)
  (_, (h, outs)), got = _loss("pallas_fused", True, jnp.bfloat16)(x, r, w, gs, kernels, cots)
  np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(ref_h, np.float32))
  # The block norm's inverse RMS is rsqrt here, 1 / sqrt in XLA's RMSNorm: an f32 ulp apart, which can move an
  # element of n by a bf16 ulp. If that element is its row's largest, the row's activation scale moves and every code
  # of the row is rounded anew: the output moves by a random walk of ~sqrt(352) half-codes, ~1.3% of the largest
  # output here. Allowed: 2.4 of those (8 bf16 ulps of the largest). Gradients: the same, plus float32 sum order.
  for r_, k_ in zip(jax.tree.leaves((ref_outs, ref)), jax.tree.leaves((outs, got))):
    r_, k_ = np.asarray(r_, np.float32), np.asarray(k_, np.float32)
    np.testing.assert_allclose(k_, r_, rtol=0, atol=8 * 2 ** -8 * np.abs(r_).max())


def test_under_a_mesh_matches_one_device(backward_walk):
  """Per device under a (data, fsdp, tensor) mesh against the same path on one device: each row's values the same,
  the scales' gradients summed over devices. (Against XLA's unfused layer, a quantization code of a row can round
  the other way: test_values_and_gradients_equal_unfused_float64 compares the formulas.)"""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng()
  x, r, w, gs, kernels = _inputs(rng, (8, 4, 64), 3, jnp.float32)
  cots = [jnp.asarray(rng.normal(size=(8, 4, 64)), jnp.float32)]
  cots += [jnp.asarray(rng.normal(size=(8, 4, 24)), jnp.float32) for _ in range(3)]
  ref = _loss("pallas_fused", True, jnp.float32)(x, r, w, gs, kernels, cots)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    rows = NamedSharding(mesh, P(sharding.BATCH))
    got = _loss("pallas_fused", True, jnp.float32)(jax.device_put(x, rows), jax.device_put(r, rows), w, gs, kernels,
                                                   cots)
  (total, (h, outs)), grads = got
  (ref_total, (ref_h, ref_outs)), ref_grads = ref
  # The loss sums ~4k float32 terms in another order (per device): its error scales with the terms, not the sum.
  terms = sum(float(np.abs(np.asarray(c) * np.asarray(v)).sum()) for c, v in zip(cots, (ref_h, *ref_outs)))
  np.testing.assert_allclose(total, ref_total, rtol=0, atol=1e-6 * terms)
  for a, b in zip(jax.tree.leaves((h, outs)), jax.tree.leaves((ref_h, ref_outs))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    # float32 sums in another order (per device, per tile), as in the BitLinear kernel's mesh test.
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * max(1.0, float(np.abs(b).max())))


def test_wide_rows_fall_back_to_the_unfused_path(monkeypatch):
  """Rows wider than the kernel walks whole: `prenormed_group` applies `RMSNorm` first (the same bits as the
  unfused composition); the kernel itself refuses them."""
  monkeypatch.setattr(pk, "MAX_WIDTH", 32)
  rng = np.random.default_rng()
  x, r, w, gs, kernels = _inputs(rng, (2, 4, 48), 1, jnp.float32)
  cots = [jnp.asarray(rng.normal(size=(2, 4, 48)), jnp.float32), jnp.asarray(rng.normal(size=(2, 4, 24)), jnp.float32)]
  ref = _loss("pallas_fused", False, jnp.float32)(x, r, w, gs, kernels, cots)
  got = _loss("pallas_fused", True, jnp.float32)(x, r, w, gs, kernels, cots)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="rows of width 48 > 32"):
    pk.prenormed_inputs(x, r, w, jnp.stack(gs), 1e-6, 1e-6)


def test_shape_errors():
  x = jnp.ones((2, 4, 16))
  with pytest.raises(ValueError, match="prenorm kernel: x, residual"):
    pk.prenormed_inputs(x, jnp.ones((2, 4, 8)), jnp.ones(16), jnp.ones((1, 16)), 1e-6, 1e-6)
  with pytest.raises(ValueError, match="prenorm kernel: x, residual"):
    pk.prenormed_inputs(x, None, jnp.ones(8), jnp.ones((1, 16)), 1e-6, 1e-6)
  with pytest.raises(ValueError, match="no block norm"):
    bl.BitLinear(8, glu_input=True, impl="pallas").init(jax.random.key(0), PreNorm(x, jnp.ones(16), 1e-6))
