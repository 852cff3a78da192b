"""`--set` of the kernel benchmarks: layer constants set for a run and restored, malformed settings refused."""

import pytest
from absl import app

from benchmarks import tiling
from mmfree_jax.layers import bitlinear_kernel, prenorm_kernel
from mmfree_jax.train import grad_stack


def test_settings_apply_inside_the_block_and_are_restored():
  rows, prefetch = bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM, prenorm_kernel.BACKWARD_PREFETCH_SCALES
  setting = "bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM=8, prenorm_kernel.BACKWARD_PREFETCH_SCALES=None"
  with tiling.layer_constants(setting):
    assert bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM == 8
    assert prenorm_kernel.BACKWARD_PREFETCH_SCALES is None
  assert (bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM, prenorm_kernel.BACKWARD_PREFETCH_SCALES) == (rows, prefetch)


def test_train_modules_are_found_too():
  kernel = grad_stack.KERNEL
  with tiling.layer_constants("grad_stack.KERNEL=0"):
    assert grad_stack.KERNEL == 0
  assert grad_stack.KERNEL == kernel


def test_restored_after_an_error_and_empty_is_the_defaults():
  rows = bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM
  with pytest.raises(RuntimeError):
    with tiling.layer_constants("bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM=2"):
      raise RuntimeError
  assert bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM == rows
  assert not tiling.parse_settings("")


@pytest.mark.parametrize("setting, message", [
    ("bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM", "expected module.CONSTANT"),
    ("FORWARD_ROWS_PER_PROGRAM=2", "expected module.CONSTANT"),
    ("bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM=two", "expected module.CONSTANT"),
    ("no_such_module.X=1", "no module no_such_module in mmfree_jax.layers or mmfree_jax.train"),
    ("bitlinear_kernel.NO_SUCH_CONSTANT=1", "has no NO_SUCH_CONSTANT"),
])
def test_malformed_settings_are_usage_errors(setting, message):
  with pytest.raises(app.UsageError, match=message):
    with tiling.layer_constants(setting):
      pass
