"""benchmarks.accum_parity: one batch's gradient against its micro-batches' sums."""

import pytest

from benchmarks import accum_parity
from experiments.configs import tiny


def _config(dtype: str):
  c = tiny.get_config()
  c.model.update(d_model=16, n_layers=1, n_heads=2, dtype=dtype, param_dtype=dtype)
  return c


def test_float64_splits_agree_to_summation_order(x64):
  """In float64 no last-bit difference moves an 8-bit quantization step, so the three gradients agree to
  summation order (in float32 the one-batch program's last bits can: see the module docstring)."""
  d = accum_parity.distances(_config("float64"), batch=4, seq_len=8)
  assert set(d) == {"halves_vs_one", "even_odd_vs_one", "halves_vs_even_odd"}
  assert all(0 <= v < 1e-12 for v in d.values())


def test_odd_batch_is_an_error():
  with pytest.raises(ValueError, match="--batch=3 must be even"):
    accum_parity.distances(_config("float64"), batch=3, seq_len=16)
