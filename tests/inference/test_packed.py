"""Packed ternary weights: round trip, exact integer accumulators, parity with the latent model, no re-quantization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.inference import generation as gen
from mmfree_jax.inference import packed, recurrent
from mmfree_jax.layers import bitlinear
from mmfree_jax.models import model_config
from tests.inference.helpers import full_forward, tiny_cfg, tiny_params


@pytest.mark.parametrize("shape", [(13, 5), (32, 2, 7)])
def test_pack_unpack_round_trip(shape):
  q = jax.random.randint(jax.random.key(0), shape, -1, 2).astype(jnp.int8)
  p = packed.pack(q)
  assert p.dtype == jnp.uint8 and p.shape == (-(-shape[0] // 4), *shape[1:])
  np.testing.assert_array_equal(packed.unpack(p, shape[0]), q)


def test_packed_bitlinear_matches_int8_bitlinear_exactly():
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (3, 5, 64), jnp.float32)
  kernel = jax.random.normal(kw, (64, 2, 24), jnp.float32) * 0.02
  g = 1 + 0.3 * jax.random.normal(kg, (64,), jnp.float32)
  node = packed.to_packed({"kernel": kernel, "norm_scale": g})

  @jax.jit
  def both(node, kernel):
    ref_acc, _, _ = bitlinear.int_accumulators(x, g, kernel.reshape(64, -1))
    return (packed.int_accumulators(x, node).reshape(ref_acc.shape), ref_acc, packed.ternary_linear(x, node),
            bitlinear.bitlinear(x, g, kernel, impl="int8"), bitlinear.bitlinear(x, g, kernel, impl="fused"))

  acc, ref_acc, out, ref, fused = both(node, kernel)
  np.testing.assert_array_equal(acc, ref_acc)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * float(jnp.abs(ref).max()))
  np.testing.assert_allclose(out, fused, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_bf16_product_gives_the_int8_accumulators_bit_for_bit():
  """Codes |q_x| <= 127 and ternary weights are exact in bfloat16, float32 sums of them exact below 2^24."""
  kx, kw = jax.random.split(jax.random.key(4))
  n_in = 1000  # the largest |accumulator| here can reach 127 * 1000
  x = jax.random.normal(kx, (2, 7, n_in), jnp.bfloat16)
  node = packed.to_packed({"kernel": jax.random.normal(kw, (n_in, 96), jnp.float32), "norm_scale": jnp.ones(n_in)})
  a8 = packed.int_accumulators(x, node, product="int8")
  a16 = packed.int_accumulators(x, node, product="bf16")
  assert a8.dtype == jnp.int32 and a16.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a16), np.asarray(a8).astype(np.float32))
  np.testing.assert_array_equal(packed.ternary_linear(x, node, product="bf16"),
                                packed.ternary_linear(x, node, product="int8"))
  with pytest.raises(ValueError, match="product"):
    packed.ternary_linear(x, node, product="fp8")


def test_quantization_is_not_idempotent_so_packed_scales_are_kept():
  kernel = jax.random.normal(jax.random.key(2), (64, 48)) * 0.02
  q, inv_sw = packed.quantize_once(kernel)
  q2, inv_sw2 = packed.quantize_once(q.astype(jnp.float32) * inv_sw)
  np.testing.assert_array_equal(q, q2)  # signs survive ...
  assert not np.isclose(float(inv_sw), float(inv_sw2))  # ... the scale does not
  tree = packed.pack_params({"lm_head": {"kernel": kernel, "norm_scale": jnp.ones(64)}}, jnp.float32)
  assert float(tree["lm_head"]["inv_sw"]) == float(inv_sw)


def test_packed_model_equals_latent_model_and_generates_the_same_float64(x64):
  cfg_d = tiny_cfg("hgrn_bit", "float64")
  cfg = model_config(cfg_d)
  params = tiny_params(cfg_d, head_gain=20.0)
  tree = packed.pack_params(params, jnp.float64)
  assert packed.weight_bytes(tree) < packed.weight_bytes(params) / 4
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 13), 3, 97))
  full = full_forward(cfg_d, params, tokens)

  @jax.jit
  def run(w):
    x, _ = recurrent.hidden(cfg, w, tokens, None, recurrent.init_cache(cfg, 2, 13))
    return recurrent.logits(cfg, w, x)

  np.testing.assert_allclose(run(tree), full, rtol=1e-10, atol=1e-10 * np.abs(full).max())
  prompt = [list(np.random.default_rng(0).integers(3, 97, 3))]
  assert gen.generate(cfg, tree, prompt, max_new_tokens=12) == gen.generate(cfg, params, prompt, max_new_tokens=12)
