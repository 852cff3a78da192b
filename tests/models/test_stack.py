"""Remat policies and layer-loop unrolling change what runs, never the loss or the gradients."""

import jax
import numpy as np
import pytest
from jax._src import ad_checkpoint

from mmfree_jax.models import stack
from tests.models import compiled
from tests.models.test_head_loss import _batch, _cfg


@pytest.mark.parametrize("arch,change", [("hgrn_bit", "remat"), ("transformer", "remat"), ("hgrn_bit", "unroll")])
def test_save_proj_and_unrolling_keep_loss_and_gradients_float64(x64, arch, change):
  # save_proj: the preset policy (the others are jax.checkpoint_policies' own); unroll: the layer loop unrolled.
  # The plain model's init and gradient are the ones test_head_loss compiles (tests/models/compiled.py).
  rng = np.random.default_rng()
  batch = _batch(rng)
  plain = _cfg(arch, {}, dtype="float64", param_dtype="float64")
  changed = dict(plain, remat="save_proj", unroll_layers=1 if change == "remat" else 99)
  params = compiled.init(plain, jax.random.key(int(rng.integers(1 << 30))))
  (l0, g0), (l1, g1) = (compiled.loss_and_grads(c, params, batch) for c in (plain, changed))
  # Recomputation repeats the same float64 operations; only XLA's fusion choices may reorder a sum.
  np.testing.assert_allclose(l1, l0, rtol=1e-12)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)


def test_save_proj_saves_named_projections_scan_and_cudnn_attention():
  policy = stack.REMAT_POLICIES["save_proj"]
  assert policy(ad_checkpoint.name_p, name="proj") and policy(ad_checkpoint.name_p, name="scan")
  assert not policy(ad_checkpoint.name_p, name="logits")
  assert not policy(jax.lax.exp_p)
  attention = stack._cudnn_attention_forward()  # pylint: disable=protected-access
  assert attention is not None, "this JAX has no cuDNN attention primitive to save: update stack.py"
  assert policy(attention)
