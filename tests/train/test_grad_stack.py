"""The layers' gradients summed over micro-batches and stacked: the kernel (interpreted on the CPU) against XLA's
stack of in-order sums, bit for bit, and the train step with the kernel against the plain step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.train import grad_stack
from tests.train import test_step


@pytest.mark.parametrize("n_parts, shape, dtype", [(2, (16, 128), jnp.bfloat16), (1, (8, 2, 64), jnp.bfloat16),
                                                    (3, (32, 96), jnp.float32)])
def test_kernel_matches_the_in_order_sums(n_parts, shape, dtype):
  keys = jax.random.split(jax.random.key(np.random.randint(2**31)), 3)
  per_layer = [(jax.random.normal(k, (n_parts,) + shape) * 3).astype(dtype) for k in keys]
  got = grad_stack.sum_and_stack(per_layer, jnp.float32, kernel=True)
  want = jnp.stack([sum((p[a].astype(jnp.float32) for a in range(1, n_parts)), p[0].astype(jnp.float32))
                    for p in per_layer])
  assert got.shape == (3,) + shape and got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(grad_stack.sum_and_stack(per_layer, jnp.float32, kernel=False), want)


def test_the_kernel_runs_only_on_one_device(monkeypatch):
  """The kernels are not partitioned: with several devices (8 host devices here) and no mesh of one, XLA's path."""
  monkeypatch.setattr(grad_stack.pallas_util, "interpret", lambda: False)  # as on a GPU
  assert jax.device_count() > 1 and not grad_stack._one_gpu()
  with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
    assert grad_stack._one_gpu()
  with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
    assert not grad_stack._one_gpu()


def test_bad_inputs_say_what_is_wrong():
  with pytest.raises(ValueError, match="one shape"):
    grad_stack.sum_and_stack([jnp.zeros((2, 1024)), jnp.zeros((2, 2048))], jnp.float32)
  with pytest.raises(ValueError, match="multiple of WIDTH"):
    grad_stack.sum_and_stack([jnp.zeros((2, 100))], jnp.float32, kernel=True)


def test_train_step_with_the_kernel_is_bit_identical(monkeypatch):
  """bf16 layers, 2 micro-batches: the kept per-layer gradients are written into buffers that `uninitialized`
  allocates, then summed and stacked by the kernel."""
  prog = test_step._program(unroll_layers=2, quantize_weights_once=True, dtype="bfloat16")
  calls = []
  real = grad_stack._write_layer
  monkeypatch.setattr(grad_stack, "_one_gpu", lambda: True)  # the kernel, and `uninitialized`'s allocation
  monkeypatch.setattr(grad_stack, "_write_layer", lambda *a: calls.append(a[2]) or real(*a))
  with prog.context:
    want, want_metrics = test_step._run(prog)
    got, got_metrics = test_step._run(prog, weight_view=test_step.weight_view(prog.model_cfg), per_layer=True)
  assert calls and set(calls) == {0, 1}  # each layer matrix's two layers written by the kernel
  assert float(got_metrics["loss"]) == float(want_metrics["loss"])
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
