"""Median wall time of a jitted call, synchronized, after two warm-up calls (the first compiles)."""

import statistics
import time


def median_time(fn, *args, repeats: int) -> float:
  """Seconds per `fn(*args)`: the median of `repeats` synchronized calls."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)
