"""The MatMul-free LM: float64 parity with the NumPy reference, causality, state carry, int8 mode, resets."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.models import build_model, model_config
from tests.models import compiled, numpy_reference

TINY = dict(arch="hgrn_bit", vocab_size=97, d_model=32, n_layers=3, d_ff=64, remat="none")


def _perturbed_params(cfg, seed=0):
  """Init (one compiled init per model, `compiled.init`), then perturb every norm scale and the lower bounds so that
  nothing sits at its init value."""
  params = nn.unbox(compiled.init(cfg, jax.random.key(seed)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [v + 0.3 * jax.random.normal(k, v.shape, v.dtype) if v.ndim <= 2 and v.shape[-1] <= 64 and v.ndim
            and v.shape != (97, 32) else v for v, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


@functools.cache
def _loss_and_grads(cfg):
  """value_and_grad of the summed log-probability of token 0, jitted once per model config (shared by the tests
  below: the vanilla model's is compiled once), with the tokens an argument."""
  model = build_model(cfg)
  return jax.jit(jax.value_and_grad(lambda p, tokens: jnp.sum(jax.nn.log_softmax(model.apply(p, tokens))[..., 0])))


@pytest.mark.parametrize("bitlinear", ["fused", "vanilla", "pallas_fused"])
def test_forward_matches_numpy_reference_float64(x64, bitlinear):
  cfg = dict(TINY, dtype="float64", param_dtype="float64", bitlinear=bitlinear)
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 11), 0, 97)
  params = _perturbed_params(cfg)
  logits = np.asarray(model.apply(params, tokens))
  ref_params = numpy_reference.from_flax(params, TINY["n_layers"])
  for row in range(tokens.shape[0]):
    ref = numpy_reference.forward(ref_params, np.asarray(tokens[row]), TINY["n_layers"])
    np.testing.assert_allclose(logits[row], ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())


def test_kernel_paths_gradients_equal_vanilla_float64(x64):
  """The whole model's loss gradient with the BitLinear kernels (interpret mode; f/i/g as one group launch, the
  recomputing VJP, swiglu inside the down projection's kernel, `model.down_bitlinear` and the others, the blocks'
  norms inside the kernels) equals autodiff of the vanilla layers, in float64."""
  tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 11), 0, 97)
  cfg = dict(TINY, dtype="float64", param_dtype="float64")
  params = _perturbed_params(dict(cfg, bitlinear="vanilla"))

  def grads(bitlinear, down_bitlinear="", fuse_block_norms=False, keep=""):
    return _loss_and_grads(model_config(dict(cfg, bitlinear=bitlinear, down_bitlinear=down_bitlinear,
                                             fuse_block_norms=fuse_block_norms, o_bitlinear=keep,
                                             gate_bitlinear=keep)))(params, tokens)

  ref_loss, ref = grads("vanilla")
  # pallas_fused everywhere, and pallas_fused with the GLU's down projection on pallas (its own impl); with the
  # blocks' norms inside the kernels (`fuse_block_norms`, the same parameter tree: `compiled.init` checks it), and
  # with o_proj and gate_proj on pallas as well (`model.o_bitlinear`, `model.gate_bitlinear`).
  for impl in (("pallas_fused",), ("pallas_fused", "pallas"), ("pallas_fused", "pallas", True),
               ("pallas_fused", "pallas", True, "pallas"), ("pallas", "", True)):
    loss, got = grads(*impl)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-11)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11 * max(1.0, float(np.abs(b).max())), err_msg=str(impl))


def test_weights_quantized_once_same_loss_and_gradients_float64(x64):
  """`quantize_weights_once` (every layer's weights quantized before the layer loop, `bitlinear.quantize_stacked`):
  the same parameter tree at init, and the same loss and gradients as quantizing per use, in float64, with the
  vanilla layers and with the recomputing kernel path (interpret mode; it equals vanilla per use, test above)."""
  tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 11), 0, 97)
  cfg = dict(TINY, dtype="float64", param_dtype="float64", bitlinear="vanilla")
  per_use, once = build_model(cfg), build_model(dict(cfg, quantize_weights_once=True))
  init_once, init_per_use = (nn.unbox(jax.jit(m.init)(jax.random.key(0), tokens)) for m in (once, per_use))
  assert jax.tree.structure(init_once) == jax.tree.structure(init_per_use)
  for a, b in zip(jax.tree.leaves(init_once), jax.tree.leaves(init_per_use)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  params = _perturbed_params(cfg)

  def grads(model_cfg):
    return _loss_and_grads(model_config(model_cfg))(params, tokens)

  ref_loss, ref = grads(cfg)
  for other in (dict(cfg, quantize_weights_once=True), dict(cfg, bitlinear="pallas_fused", quantize_weights_once=True)):
    loss, got = grads(other)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
      assert a.dtype == b.dtype
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13 * max(1.0, float(np.abs(b).max())))


def test_weights_quantized_once_bfloat16_logits_equal():
  """In the training dtypes (float32 weights, bfloat16 compute) the logits equal per-use quantization's exactly."""
  tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 11), 0, 97)
  cfg = dict(TINY, dtype="bfloat16", bitlinear="vanilla")
  per_use, once = build_model(cfg), build_model(dict(cfg, quantize_weights_once=True))
  params = _perturbed_params(cfg, seed=np.random.randint(1 << 20))
  np.testing.assert_array_equal(jax.jit(once.apply)(params, tokens), jax.jit(per_use.apply)(params, tokens))


def test_weights_quantized_once_needs_an_impl_that_takes_them():
  with pytest.raises(ValueError, match="quantize_weights_once needs model.bitlinear"):
    build_model(dict(TINY, bitlinear="fused", quantize_weights_once=True))
  with pytest.raises(ValueError, match="quantize_weights_once needs model.bitlinear and model.down_bitlinear"):
    build_model(dict(TINY, bitlinear="pallas", down_bitlinear="int8", quantize_weights_once=True))
  with pytest.raises(ValueError, match="model.down_bitlinear='dense'"):
    build_model(dict(TINY, down_bitlinear="dense"))


@pytest.mark.parametrize("arch", ["hgrn_bit", "transformer"])
def test_causal(arch):
  cfg = dict(TINY, arch=arch, n_heads=4, dtype="float32")
  model = build_model(cfg)
  key = jax.random.key(np.random.randint(1 << 30))
  tokens = jax.random.randint(key, (2, 16), 0, 97)
  params = compiled.init(cfg, jax.random.key(1))
  t = 9
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % 97)
  apply = jax.jit(model.apply)
  a, b = apply(params, tokens), apply(params, changed)
  np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("impl", ["sequential", "associative", "chunked"])
def test_two_halves_with_carried_state_equal_whole(x64, impl):
  cfg = dict(TINY, dtype="float64", param_dtype="float64", scan_impl=impl, scan_chunk=4)
  model = build_model(cfg)
  tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 14), 0, 97)
  params = compiled.init(cfg, jax.random.key(0))
  apply = jax.jit(functools.partial(model.apply, return_state=True))  # compiled: op by op is slower here
  whole, state = apply(params, tokens)
  first, mid = apply(params, tokens[:, :6])
  second, end = apply(params, tokens[:, 6:], state=mid)
  np.testing.assert_allclose(np.concatenate([first, second], 1), whole, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(end, state, rtol=1e-12, atol=1e-12)
  assert state.shape == (TINY["n_layers"], 2, TINY["d_model"]) and state.dtype == jnp.float64


def test_int8_mode_matches_fake_quant():
  tokens = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), (2, 12), 0, 97)
  cfg = dict(TINY, dtype="float32", bitlinear="fused")
  fused = build_model(cfg)
  params = compiled.init(cfg, jax.random.key(0))
  a = jax.jit(fused.apply)(params, tokens)
  b = jax.jit(build_model(dict(TINY, dtype="float32", bitlinear="int8")).apply)(params, tokens)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_segments_reset_the_state(x64):
  """A packed row of two documents gives the same logits as each document alone."""
  cfg = dict(TINY, dtype="float64", param_dtype="float64")
  model = build_model(cfg)
  key = jax.random.key(np.random.randint(1 << 30))
  doc_a, doc_b = jax.random.randint(key, (1, 7), 0, 97), jax.random.randint(jax.random.fold_in(key, 1), (1, 5), 0, 97)
  params = compiled.init(cfg, jax.random.key(0))
  apply = jax.jit(model.apply)
  packed = jnp.concatenate([doc_a, doc_b], 1)
  seg = jnp.array([[1] * 7 + [2] * 5])
  out = apply(params, packed, seg)
  np.testing.assert_allclose(out[:, :7], apply(params, doc_a), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(out[:, 7:], apply(params, doc_b), rtol=1e-12, atol=1e-12)


def test_lower_bounds_at_init():
  from mmfree_jax.models.hgrn_bit import layer_lower_bounds
  lb = layer_lower_bounds(jnp.zeros((4, 3)))
  np.testing.assert_allclose(lb[:, 0], [0, 0.25, 0.5, 0.75], atol=1e-7)
  assert float(lb[0, 0]) == 0.0
