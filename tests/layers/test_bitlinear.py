"""BitLinear: quantizers on hand-built cases, STE gradients, fused == vanilla, int8 accumulators, residuals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import print_saved_residuals
import numpy as np
import pytest

from mmfree_jax.layers import bitlinear as bl
from mmfree_jax.layers.norm import rms_normalize


@pytest.fixture(params=["one_pass", "two_pass"])
def backward_walk(request, monkeypatch):
  """The kernel's backward as one pass over whole rows, or (every row treated as wide) two over column chunks."""
  if request.param == "two_pass":
    from mmfree_jax.layers import bitlinear_kernel as bk  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(bk, "TWO_PASS_WIDTH", 0)
  return request.param


def np_reference(x, g, w, eps=1e-6):
  """The spec's BitLinear in float64 NumPy: returns (out, y, y_q, W_q, q_x int, q_w int)."""
  x, g, w = (np.asarray(a, np.float64) for a in (x, g, w))
  y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g
  s_x = 127.0 / np.maximum(np.abs(y).max(-1, keepdims=True), 1e-5)
  v = y * s_x
  q_x = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -128, 127)
  s_w = 1.0 / max(np.abs(w).mean(), 1e-5)
  q_w = np.clip(np.round(w * s_w), -1, 1)
  y_q, w_q = q_x / s_x, q_w / s_w
  return y_q @ w_q, y, y_q, w_q, q_x.astype(np.int64), q_w.astype(np.int64)


def test_activation_rounding_ties_away_from_zero():
  # max |y| = 127 -> s_x = 1, so the values are rounded as given.
  y = jnp.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.0, 0.49]])
  q, inv = bl.quantize_activations(y)
  np.testing.assert_array_equal(q, [[1, 2, 3, -1, -2, -3, 127, 0]])
  assert inv[0, 0] == 1.0


def test_weight_rounding_ties_to_even_and_clip():
  # mean |w| = 1 -> s_w = 1: ties 0.5 -> 0, 1.5 -> 2 (then clipped to 1), -0.5 -> 0, -1.5 -> -2 -> -1.
  q, inv = bl.quantize_weight(jnp.array([[0.5, 1.5, -0.5, -1.5, 0.0, 2.0]]))
  np.testing.assert_array_equal(q, [[0, 1, 0, -1, 0, 1]])
  assert float(inv) == 1.0


def test_zero_inputs_use_the_floors():
  q, inv = bl.quantize_activations(jnp.zeros((2, 4)))
  np.testing.assert_array_equal(q, 0)
  np.testing.assert_allclose(inv, 1e-5 / 127, rtol=1e-6)
  qw, inv_w = bl.quantize_weight(jnp.zeros((3, 4)))
  np.testing.assert_array_equal(qw, 0)
  np.testing.assert_allclose(inv_w, 1e-5, rtol=1e-6)
  out = bl.bitlinear(jnp.zeros((2, 4)), jnp.ones(4), jnp.zeros((4, 3)))
  np.testing.assert_array_equal(out, 0)


def test_scales_per_token_and_per_matrix():
  y = jnp.array([[1.0, -2.0], [10.0, 5.0]])
  _, inv = bl.quantize_activations(y)
  np.testing.assert_allclose(inv[:, 0], [2.0 / 127, 10.0 / 127], rtol=1e-6)
  _, inv_w = bl.quantize_weight(jnp.array([[1.0, -3.0], [0.0, 4.0]]))
  np.testing.assert_allclose(inv_w, 2.0, rtol=1e-6)


@pytest.mark.parametrize("impl", bl.IMPLS)
def test_forward_matches_numpy_reference_float64(x64, impl):
  rng = np.random.default_rng()
  x, g, w = rng.normal(size=(3, 5, 48)), rng.uniform(0.5, 1.5, 48), rng.normal(size=(48, 24)) * 0.02
  ref = np_reference(x, g, w)[0]
  x, g, w = (jnp.asarray(a) for a in (x, g, w))
  out = bl.bitlinear(x, g, w, impl=impl)
  np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_ste_gradients_match_spec_formulas(x64):
  rng = np.random.default_rng()
  x, g, w, dout = rng.normal(size=(7, 32)), rng.uniform(0.5, 1.5, 32), rng.normal(size=(32, 16)), rng.normal(size=(7, 16))
  _, y, y_q, w_q, _, _ = np_reference(x, g, w)
  # Spec: dL/dy = dout @ W_q^T; dL/dW = y_q^T @ dout; dL/dx through the exact RMSNorm backward.
  dy = dout @ w_q.T
  eps = 1e-6
  r = 1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
  xhat = x * r
  dg = np.sum(dy * xhat, 0)
  dxhat = dy * g
  dx = r * dxhat - x * r ** 3 * np.mean(dxhat * x, -1, keepdims=True)
  dw = y_q.T @ dout
  for impl in bl.IMPLS:
    f = lambda x_, g_, w_: jnp.sum(bl.bitlinear(x_, g_, w_, impl=impl) * dout)
    gx, gg, gw = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(jnp.asarray(x), jnp.asarray(g), jnp.asarray(w))
    np.testing.assert_allclose(gx, dx, rtol=1e-9, atol=1e-12, err_msg=impl)
    np.testing.assert_allclose(gg, dg, rtol=1e-9, atol=1e-12, err_msg=impl)
    np.testing.assert_allclose(gw, dw, rtol=1e-9, atol=1e-12, err_msg=impl)
  del y


def test_int8_accumulators_exact_and_outputs_match_fake_quant():
  rng = np.random.default_rng()
  x, g, w = rng.normal(size=(4, 9, 64)), rng.uniform(0.5, 1.5, 64), rng.normal(size=(64, 40))
  acc, inv_sx, inv_sw = bl.int_accumulators(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32),
                                            jnp.asarray(w, jnp.float32))
  assert acc.dtype == jnp.int32
  # The int64 NumPy reference on the same integer operands (quantized by the float32 path).
  qx, _ = bl.quantize_activations(bl._normalize(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32), 1e-6)[1])
  qw, _ = bl.quantize_weight(jnp.asarray(w, jnp.float32))
  ref = np.asarray(qx, np.int64) @ np.asarray(qw, np.int64)
  np.testing.assert_array_equal(np.asarray(acc, np.int64), ref)
  args = [jnp.asarray(a, jnp.float32) for a in (x, g, w)]
  fused = bl.bitlinear(*args, impl="fused")
  int8 = bl.bitlinear(*args, impl="int8")
  xs = np.asarray(qx, np.float32) * np.asarray(inv_sx)
  ws = np.asarray(qw, np.float32) * np.asarray(inv_sw)
  fake = xs @ ws
  # Fake quantization scales every product before a float32 sum of K terms, so it may differ from the exact
  # integer sum by up to ~K * eps32 * sum|terms| (cancellation makes the relative error unbounded).
  k, eps = x.shape[-1], np.finfo(np.float32).eps
  bound = 2 * k * eps * (np.abs(xs) @ np.abs(ws))
  assert np.all(np.abs(np.asarray(int8) - fake) <= bound), np.max(np.abs(np.asarray(int8) - fake) / bound)
  np.testing.assert_allclose(int8, fused, rtol=1e-6, atol=1e-7)


def test_bfloat16_matmul_on_integer_operands_is_exact():
  """The fused path's bf16 forward equals the int8 path: |q_x| <= 128 and ternary weights are exact in bf16."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(16, 256)), jnp.bfloat16)
  g, w = jnp.ones(256), jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
  np.testing.assert_array_equal(bl.bitlinear(x, g, w, impl="fused"), bl.bitlinear(x, g, w, impl="int8"))


def _saved_residuals(impl, capsys):
  """The lines of `jax.ad_checkpoint.print_saved_residuals` that name an activation-sized tensor."""
  x = jnp.ones((8, 128, 64), jnp.bfloat16)
  g, w = jnp.ones(64), jnp.ones((64, 32))
  capsys.readouterr()
  print_saved_residuals(lambda x_, g_, w_: jnp.sum(bl.bitlinear(x_, g_, w_, impl=impl)), x, g, w)
  return [line for line in capsys.readouterr().out.splitlines() if "[8,128,64]" in line]


def test_fused_saves_only_its_inputs(capsys):
  fused = _saved_residuals("fused", capsys)
  vanilla = _saved_residuals("vanilla", capsys)
  # Fused keeps the layer input and no other activation-sized tensor; vanilla also keeps the normalized and
  # quantized activations.
  assert len(fused) == 1 and "argument" in fused[0], fused
  assert len(vanilla) >= 2, vanilla
  assert sum("argument" not in line for line in vanilla) >= 1, vanilla


def test_kernel_recompute_saves_only_its_inputs(capsys):
  # pallas_fused keeps the layer input alone, as fused does; pallas (vanilla's residuals) keeps y_q too.
  recompute = _saved_residuals("pallas_fused", capsys)
  pallas = _saved_residuals("pallas", capsys)
  assert len(recompute) == 1 and "argument" in recompute[0], recompute
  assert sum("argument" not in line for line in pallas) >= 1, pallas


def test_multi_axis_kernel_is_one_matrix(x64):
  rng = np.random.default_rng()
  x, g, w = rng.normal(size=(5, 16)), np.ones(16), rng.normal(size=(16, 2, 8))
  out = bl.bitlinear(jnp.asarray(x), jnp.asarray(g), jnp.asarray(w))
  ref = np_reference(x, g, w.reshape(16, 16))[0].reshape(5, 2, 8)
  np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_shared_normalization_same_values_and_gradients(x64):
  # f/i/g of the MLGRU pass one `xhat`: the loss and every gradient (x, scales, kernels) equal separate layers'.
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(2, 7, 32)))
  gs = [jnp.asarray(rng.uniform(0.5, 1.5, 32)) for _ in range(3)]
  ws = [jnp.asarray(rng.normal(size=(32, 16)) * 0.02) for _ in range(3)]
  cot = [jnp.asarray(rng.normal(size=(2, 7, 16))) for _ in range(3)]

  def loss(x, gs, ws, shared):
    xhat = rms_normalize(x, 1e-6) if shared else None
    return sum(jnp.sum(c * bl.bitlinear(x, g, w, impl="vanilla", xhat=xhat)) for g, w, c in zip(gs, ws, cot))

  ref_val, ref_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, gs, ws, False)
  val, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, gs, ws, True)
  np.testing.assert_allclose(val, ref_val, rtol=1e-13)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match="unknown BitLinear impl"):
    bl.bitlinear(jnp.ones((1, 4)), jnp.ones(4), jnp.ones((4, 2)), impl="fp8")


def test_group_needs_one_norm_scale_per_kernel():
  with pytest.raises(ValueError, match="one norm scale per kernel"):
    bl.bitlinear_group(jnp.ones((1, 4)), [jnp.ones(4)] * 2, [jnp.ones((4, 2))] * 3, impl="pallas")


def test_kernel_bfloat16_rows_and_widths_match_vanilla(backward_walk):
  """The GPU kernel (interpret mode here) on bf16 inputs: odd rows, a width of three power-of-two pieces."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(3, 7, 352)), jnp.bfloat16)  # 21 rows; 352 = 256 + 64 + 32
  g = jnp.asarray(rng.uniform(0.5, 1.5, 352), jnp.float32)
  w = jnp.asarray(rng.normal(size=(352, 40)) * 0.02, jnp.float32)
  dout = jnp.asarray(rng.normal(size=(3, 7, 40)), jnp.bfloat16)
  f = lambda impl, *a: jnp.sum((bl.bitlinear(*a, impl=impl) * dout).astype(jnp.float32))
  grads = lambda impl: jax.jit(jax.value_and_grad(lambda *a: f(impl, *a), argnums=(0, 1, 2)))(x, g, w)
  ref, got = grads("vanilla"), grads("pallas")
  # Both round y_q and the products to bf16 (8 significant bits); float32 sums in different orders can move a
  # quantization code by one or a bf16 rounding by one ulp: a few bf16 ulps of each result's scale.
  for r, k in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    r, k = np.asarray(r, np.float32), np.asarray(k, np.float32)
    np.testing.assert_allclose(k, r, rtol=0, atol=4 * 2 ** -8 * np.abs(r).max())
  # pallas_fused runs the same kernels and GEMMs, the forward kernel once more in the backward pass: the same
  # bits as pallas.
  for r, k in zip(jax.tree.leaves(got), jax.tree.leaves(grads("pallas_fused"))):
    np.testing.assert_array_equal(np.asarray(k, np.float32), np.asarray(r, np.float32))


@pytest.mark.parametrize("rows", [(8, 4), (3, 5)])
def test_kernel_under_a_mesh_matches_vanilla(rows, backward_walk):
  """Under a (data, fsdp, tensor) mesh the kernel runs per device on its rows; dg sums over devices. Rows that
  the 4 data-parallel devices do not divide (15) stay whole on each device, and dg is counted once."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(*rows, 64)), jnp.float32)
  g = jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 32)) * 0.02, jnp.float32)
  dout = jnp.asarray(rng.normal(size=(*rows, 32)), jnp.float32)
  f = lambda impl: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(bl.bitlinear(*a, impl=impl) * dout), (0, 1, 2)))
  ref = f("vanilla")(x, g, w)
  for impl in ("pallas", "pallas_fused"):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      spec = P(sharding.BATCH) if rows[0] % 4 == 0 else P()
      got = f(impl)(jax.device_put(x, NamedSharding(mesh, spec)), g, w)
    for r, k in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      # float32 sums in another order (per device, per tile): ~1e-7 relative to the largest terms of each sum, so
      # the tolerance scales with the result's magnitude (entries near zero carry their neighbours' error).
      np.testing.assert_allclose(k, r, rtol=2e-5, atol=2e-6 * max(1.0, float(np.abs(r).max())), err_msg=impl)


def test_kernel_warps_grow_with_rows_wider_than_a_tile():
  from mmfree_jax.layers import bitlinear_kernel as bk  # pylint: disable=g-import-not-at-top
  base = bk.NUM_WARPS
  assert bk._num_warps(bk.TILE_ELEMS) == base  # pylint: disable=protected-access
  assert bk._num_warps(bk.TILE_ELEMS // 4 + 1) == base  # pylint: disable=protected-access
  assert bk._num_warps(bk.TILE_ELEMS + 1) == 2 * base  # pylint: disable=protected-access
  assert bk._num_warps(4 * bk.TILE_ELEMS) == 4 * base  # pylint: disable=protected-access


@pytest.mark.parametrize("impl", ["vanilla", "pallas", "pallas_fused"])  # the others loop over `bitlinear`
def test_group_equals_separate_layers_float64(x64, impl):
  """BitLinears reading one input as a group (one kernel launch per direction for the pallas impls): the values
  and every gradient of separate layers, in float64."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(2, 5, 48)))
  gs = [jnp.asarray(rng.uniform(0.5, 1.5, 48)) for _ in range(3)]
  ws = [jnp.asarray(rng.normal(size=(48, 16)) * 0.02), jnp.asarray(rng.normal(size=(48, 2, 8)) * 0.02),
        jnp.asarray(rng.normal(size=(48, 24)) * 0.02)]
  cot = [jnp.asarray(rng.normal(size=(2, 5, *w.shape[1:]))) for w in ws]

  def loss(x, gs, ws, group):
    outs = (bl.bitlinear_group(x, gs, ws, impl=impl) if group else
            [bl.bitlinear(x, g, w, impl=impl) for g, w in zip(gs, ws)])
    return sum(jnp.sum(c * o) for c, o in zip(cot, outs))

  value_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  ref_val, ref_grads = value_and_grads(x, gs, ws, False)
  val, grads = value_and_grads(x, gs, ws, True)
  np.testing.assert_allclose(val, ref_val, rtol=1e-12)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_kernel_group_bfloat16_matches_separate_kernels():
  """The three-scale kernel on bf16 rows: the same quantized inputs bit for bit (the same per-scale math); the
  input's gradient sums the three cotangents in float32 inside the kernel instead of adding three bf16 results."""
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(2, 8, 352)), jnp.bfloat16)  # 352 = 256 + 64 + 32
  gs = [jnp.asarray(rng.uniform(0.5, 1.5, 352), jnp.float32) for _ in range(3)]
  ws = [jnp.asarray(rng.normal(size=(352, 40)) * 0.02, jnp.float32) for _ in range(3)]
  cot = [jnp.asarray(rng.normal(size=(2, 8, 40)), jnp.bfloat16) for _ in range(3)]

  # pallas_fused runs both kernels (the forward one twice) through the recomputing VJP; the pallas group is in
  # the float64 test above.
  def loss(x, gs, ws, group):
    outs = (bl.bitlinear_group(x, gs, ws, impl="pallas_fused") if group else
            [bl.bitlinear(x, g, w, impl="pallas_fused") for g, w in zip(gs, ws)])
    return sum(jnp.sum((c * o).astype(jnp.float32)) for c, o in zip(cot, outs)), outs

  grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (_, ref_outs), ref = grads(x, gs, ws, False)
  (_, outs), got = grads(x, gs, ws, True)
  for r, k in zip(ref_outs, outs):
    np.testing.assert_array_equal(np.asarray(k, np.float32), np.asarray(r, np.float32))
  # Gradients: a few bf16 ulps of each result's scale (the summation order of the input's cotangent).
  for r, k in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    r, k = np.asarray(r, np.float32), np.asarray(k, np.float32)
    np.testing.assert_allclose(k, r, rtol=0, atol=4 * 2 ** -8 * np.abs(r).max())


def test_kernel_group_under_a_mesh_matches_vanilla():
  """The three-scale kernel per device under a (data, fsdp, tensor) mesh: dg of every scale summed over devices."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(8, 4, 64)), jnp.float32)
  gs = [jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32) for _ in range(3)]
  ws = [jnp.asarray(rng.normal(size=(64, 32)) * 0.02, jnp.float32) for _ in range(3)]
  cot = [jnp.asarray(rng.normal(size=(8, 4, 32)), jnp.float32) for _ in range(3)]
  loss = lambda impl: jax.jit(jax.value_and_grad(
      lambda x, gs, ws: sum(jnp.sum(c * o) for c, o in zip(cot, bl.bitlinear_group(x, gs, ws, impl=impl))),
      argnums=(0, 1, 2)))
  ref = loss("vanilla")(x, gs, ws)
  for impl in ("pallas", "pallas_fused"):
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      got = loss(impl)(jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH))), gs, ws)
    for r, k in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      # float32 sums in another order (per device, per tile): ~1e-7 relative to the largest terms of each sum, so
      # the tolerance scales with the result's magnitude (entries near zero carry their neighbours' error).
      np.testing.assert_allclose(k, r, rtol=2e-5, atol=2e-6 * max(1.0, float(np.abs(r).max())), err_msg=impl)


def test_params_module_makes_the_layers_tree():
  """`BitLinearParams` declares what `BitLinear` does: the same names, shapes, axes and initial values."""
  x = jnp.ones((2, 16))
  kw = dict(features=(2, 8), axes=("embed", None, "mlp"))
  layer = bl.BitLinear(**kw, impl="vanilla").init(jax.random.key(3), x)
  params = bl.BitLinearParams(**kw).init(jax.random.key(3), 16)
  assert jax.tree.structure(layer) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_quantize_stacked_one_scale_per_layer_matrix():
  """`quantize_stacked`: each BitLinear kernel of a layer stack (a `kernel` beside a `norm_scale`) becomes the
  per-layer `ternary_weight`, with the layer's own absmean scale; other leaves pass through, boxes stay boxed."""
  rng = np.random.default_rng()
  w = jnp.asarray(rng.normal(size=(3, 8, 2, 5)) * np.array([0.1, 1.0, 10.0])[:, None, None, None], jnp.float32)
  tree = {"params": {"mlp": {"gate_proj": {"kernel": nn.Partitioned(w, ("layers", "embed", None, "mlp")),
                                           "norm_scale": jnp.ones((3, 8))}},
                     "norm": {"scale": jnp.ones((3, 8))}, "other": {"kernel": w}}}
  out = bl.quantize_stacked(tree, jnp.bfloat16)
  got = out["params"]["mlp"]["gate_proj"]["kernel"]
  assert isinstance(got, nn.Partitioned) and got.names == ("layers", "embed", None, "mlp")
  assert got.value.dtype == jnp.bfloat16
  for layer in range(3):
    np.testing.assert_array_equal(got.value[layer], bl.ternary_weight(w[layer], jnp.bfloat16))
    assert len(np.unique(np.abs(np.asarray(got.value[layer], np.float32)))) == 2  # {0, 1/s_w} for this layer
  assert out["params"]["other"]["kernel"] is w and out["params"]["norm"]["scale"] is tree["params"]["norm"]["scale"]


def test_glu_input_equals_swiglu_then_the_layer(backward_walk):
  """`glu_input=True` (swiglu and its backward inside the activation kernel; interpret mode here) against swiglu
  in XLA followed by the layer, for both kernel impls: value and gradients in gu, g and W, the same bits in bf16
  (the kernel rounds h and h's cotangent where `swiglu` rounds them). The float64 model-level test
  (`tests/models/test_hgrn_bit.py`, kernel paths against vanilla) runs this path too."""
  from mmfree_jax.layers.glu import swiglu  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng()
  gu = jnp.asarray(rng.normal(size=(3, 5, 2, 96)) * 2, jnp.bfloat16)  # 15 rows; 96 = 64 + 32
  g = jnp.asarray(rng.uniform(0.5, 1.5, 96), jnp.float32)
  w = jnp.asarray(rng.normal(size=(96, 24)) * 0.05, jnp.float32)
  dout = jnp.asarray(rng.normal(size=(3, 5, 24)), jnp.bfloat16)

  def grads(impl, fused):
    layer = lambda u, *a: bl.bitlinear(u, *a, impl=impl, glu_input=True) if fused else bl.bitlinear(
        swiglu(u), *a, impl=impl)
    loss = lambda *a: jnp.sum((layer(*a) * dout).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(gu, g, w)

  for impl in ("pallas", "pallas_fused"):
    for r, k in zip(jax.tree.leaves(grads(impl, False)), jax.tree.leaves(grads(impl, True))):
      assert r.dtype == k.dtype and r.shape == k.shape
      np.testing.assert_array_equal(np.asarray(k, np.float32), np.asarray(r, np.float32), err_msg=impl)


@pytest.mark.parametrize("glu, n", [(False, 1), (False, 3), (True, 1)])
def test_two_pass_backward_equals_one_pass_float64(x64, glu, n, monkeypatch):
  """The two-pass backward (wide rows) against the one-pass one in float64: the same formulas, the row sums in
  another order and mean(dxhat xhat) as rstd sum(dxhat h) / K. Rows of 160 = 128 + 32 (chunks of 32); 12 rows,
  programs of 4."""
  from mmfree_jax.layers import bitlinear_kernel as bk  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng()
  k = 160
  x = jnp.asarray(rng.normal(size=(12, 2, k) if glu else (12, k)) * 2, jnp.float64)
  gs = jnp.asarray(rng.uniform(0.5, 1.5, (n, k)), jnp.float64)
  dys = [jnp.asarray(rng.normal(size=(12, k)), jnp.float64) for _ in range(n)]
  loss = lambda x_, g_: sum(jnp.sum(y * d) for y, d in zip(bk.quantized_inputs(x_, g_, 1e-6, glu), dys))
  grads = lambda: jax.jit(jax.grad(loss, argnums=(0, 1)))(x, gs)
  want = grads()
  monkeypatch.setattr(bk, "TWO_PASS_WIDTH", 0)
  monkeypatch.setattr(bk, "TWO_PASS_ROWS", 4)
  monkeypatch.setattr(bk, "TWO_PASS_CHUNK", 32)
  got = grads()
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * float(np.abs(w).max()))


def test_glu_input_needs_a_kernel_impl():
  with pytest.raises(ValueError, match="glu_input needs a kernel impl"):
    bl.bitlinear(jnp.ones((4, 2, 8)), jnp.ones(8), jnp.ones((8, 3)), impl="vanilla", glu_input=True)
