"""benchmarks.accum_parity: one batch's gradient against its micro-batches' sums."""

import pytest

from benchmarks import accum_parity
from experiments.configs import tiny


def _config(dtype: str):
  c = tiny.get_config()
  c.model.update(d_model=32, n_layers=2, n_heads=2, dtype=dtype)
  return c


def test_float32_splits_agree_to_summation_order():
  d = accum_parity.distances(_config("float32"), batch=4, seq_len=16)
  assert set(d) == {"halves_vs_one", "even_odd_vs_one", "halves_vs_even_odd"}
  assert all(0 <= v < 1e-5 for v in d.values())  # float32 summation order on the CPU


def test_odd_batch_is_an_error():
  with pytest.raises(ValueError, match="--batch=3 must be even"):
    accum_parity.distances(_config("float32"), batch=3, seq_len=16)
