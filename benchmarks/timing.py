"""Median time of a jitted call after two warm-up calls (the first compiles), two ways.

  synchronized   each call waited for on its own: the latency a caller sees, host dispatch included.
  back to back   `back_to_back` calls issued at once, one wait, time / calls: the device time per call (the
                 dispatch of the next call overlaps this one's execution), as an event timer or a replayed
                 graph measures a kernel.
"""

import statistics
import time


def median_time(fn, *args, repeats: int, back_to_back: int = 1) -> float:
  """Seconds per `fn(*args)`: the median over `repeats` samples of `back_to_back` calls and one synchronization."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    outs = [fn(*args) for _ in range(back_to_back)]
    jax.block_until_ready(outs)
    ts.append((time.perf_counter() - t) / back_to_back)
  return statistics.median(ts)
