"""The chunked LM-head loss (`model.loss_chunk`) is the same function as the whole one, in less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.models import build_model, head_loss
from mmfree_jax.train import step
from tests.models import compiled

CASES = [("hgrn_bit", {}), ("transformer", {}), ("transformer", {"tie_embeddings": True})]


def _cfg(arch, extra, **kw):
  return dict(arch=arch, vocab_size=97, d_model=32, n_layers=2, n_heads=4, remat="none", **extra, **kw)


def _batch(rng, b=3, t=16, vocab=97):
  return dict(inputs=jnp.asarray(rng.integers(0, vocab, (b, t))), targets=jnp.asarray(rng.integers(0, vocab, (b, t))),
              weights=jnp.asarray(rng.uniform(size=(b, t))), segment_ids=jnp.ones((b, t), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(t), (b, t)))


@pytest.mark.parametrize("arch,extra", CASES)
def test_chunked_loss_and_gradients_equal_the_whole_float64(x64, arch, extra):
  rng = np.random.default_rng()
  batch = _batch(rng)
  whole_cfg = _cfg(arch, extra, dtype="float64", param_dtype="float64")
  chunked_cfg = dict(whole_cfg, loss_chunk=4)
  whole, chunked = build_model(whole_cfg), build_model(chunked_cfg)
  params = compiled.init(whole_cfg, jax.random.key(int(rng.integers(1 << 30))))
  # Same parameter tree: checkpoints move freely between the two settings.
  shapes = jax.eval_shape(chunked.init, jax.random.key(0), batch["inputs"])
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  (l0, g0), (l1, g1) = (compiled.loss_and_grads(c, params, batch) for c in (whole_cfg, chunked_cfg))
  # Only the order of the float64 additions differs.
  np.testing.assert_allclose(l1, l0, rtol=1e-12)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
  # And the unchunked loss is the cross-entropy of the logits.
  logits = jax.jit(whole.apply)(params, batch["inputs"])
  ref = -np.sum(np.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
                * batch["weights"])
  np.testing.assert_allclose(l0, ref, rtol=1e-12)


def test_chunk_must_divide_the_sequence():
  model = build_model(_cfg("hgrn_bit", {}, dtype="float32", loss_chunk=5))
  batch = _batch(np.random.default_rng(0))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch["inputs"]))
  with pytest.raises(ValueError, match="loss_chunk=5 must divide the sequence length 16"):
    jax.eval_shape(lambda p: step.loss_sums(model, p, batch), params)


def test_negative_chunk_is_refused():
  with pytest.raises(ValueError, match="loss_chunk"):
    build_model(_cfg("hgrn_bit", {}, loss_chunk=-1))


@pytest.mark.parametrize("arch", ["hgrn_bit", "transformer"])
def test_chunking_shrinks_the_compiled_temporaries(arch):
  """On the CPU compiler too: the [B, T, V] float32 logits and their gradient are gone from the temporaries."""
  batch = _batch(np.random.default_rng(0), b=4, t=256, vocab=2048)

  def temp_bytes(chunk):
    model = build_model(dict(arch=arch, vocab_size=2048, d_model=32, n_layers=1, n_heads=4, remat="none",
                             dtype="float32", loss_chunk=chunk))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch["inputs"]))
    fn = jax.jit(jax.grad(lambda p: step.loss_sums(model, p, batch)[0]))
    return fn.lower(params).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 4 * 256 * 2048 * 4
  whole, chunked = temp_bytes(0), temp_bytes(32)
  assert whole > logits_bytes, whole
  assert chunked < whole - logits_bytes, (whole, chunked)


def _loss_inputs(rng, dtype, b=3, t=8, vocab=50):
  logits = jnp.asarray(rng.normal(size=(b, t, vocab)) * 4, dtype)
  return logits, jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32), jnp.asarray(rng.uniform(size=(b, t)))


def test_cross_entropy_vjp_matches_autodiff_float64(x64):
  rng = np.random.default_rng()
  logits, targets, weights = _loss_inputs(rng, jnp.float64)
  v, g = jax.value_and_grad(head_loss.token_loss_sum)(logits, targets, weights)
  v_ref, g_ref = jax.value_and_grad(head_loss.token_loss_sum_reference)(logits, targets, weights)
  np.testing.assert_allclose(v, v_ref, rtol=1e-13)
  np.testing.assert_allclose(g, g_ref, rtol=1e-11, atol=1e-15)


def test_cross_entropy_vjp_matches_autodiff_bfloat16():
  """bf16 logits: both compute in float32 and round the logits' cotangent once to bf16 (one ulp: 2^-7 of the
  value); the float32 loss agrees to summation order."""
  rng = np.random.default_rng()
  logits, targets, weights = _loss_inputs(rng, jnp.bfloat16)
  v, g = jax.jit(jax.value_and_grad(head_loss.token_loss_sum))(logits, targets, weights)
  v_ref, g_ref = jax.jit(jax.value_and_grad(head_loss.token_loss_sum_reference))(logits, targets, weights)
  assert v.dtype == jnp.float32 and g.dtype == jnp.bfloat16
  np.testing.assert_allclose(v, v_ref, rtol=1e-6)
  g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
  np.testing.assert_allclose(g, g_ref, rtol=2.0 ** -7, atol=1e-6 * np.abs(g_ref).max())
