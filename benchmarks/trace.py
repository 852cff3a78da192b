"""Device kernel time from a `jax.profiler` trace, grouped by kernel name (shared by the profiling benchmarks).

  with trace.Trace() as t:
    run_the_work()
  t.print_table(per=steps, unit="step")

Kernel names are grouped with their numeric suffixes stripped (`loop_multiply_fusion.12` and `..._fusion.3`
are one group), so the table reads as kinds of work: GEMMs, XLA loop / reduction fusions, copies, cuDNN.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

EVENT_CAP = 5_000_000  # events the profiler writes to the JSON trace at most
GEMM = re.compile(r"gemm|xmma|cutlass|cublas|nvjet|matmul|dot|imma|gemv", re.I)


def group_name(name: str) -> str:
  return re.sub(r"[\d_.]+$", "", re.sub(r"\.\d+", "", name))[:80]


def device_kernels(trace_dir: str, exact: bool = False) -> tuple[collections.Counter, collections.Counter, list[str]]:
  """(microseconds per group, launches per group, process names) of the device events of a trace.

  `exact`: one group per kernel name (to find a fusion in the compiled HLO) instead of per kind."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))["traceEvents"]
  if len(events) >= EVENT_CAP:
    print(f"WARNING: the trace holds {len(events)} events, its cap: later events (kernels too) were dropped")
  pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {p for p, n in pids.items() if "/device:GPU" in n or "TPU:" in n}
  time_us, launches = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids:
      g = e["name"] if exact else group_name(e["name"])
      time_us[g] += e.get("dur", 0)
      launches[g] += 1
  return time_us, launches, sorted(pids.values())


class Trace:
  """Context manager: traces what runs inside it; `print_table` summarizes the device kernels."""

  def __init__(self, exact: bool = False):
    self.exact = exact

  def __enter__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.dir = tempfile.mkdtemp()
    # Device kernels only: the trace file keeps at most EVENT_CAP events, and the host's (compilation included)
    # would fill it before the kernels' are written.
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = 0
    options.python_tracer_level = 0
    jax.profiler.start_trace(self.dir, create_perfetto_trace=True, profiler_options=options)
    return self

  def __exit__(self, *exc):
    import jax  # pylint: disable=g-import-not-at-top
    jax.profiler.stop_trace()
    self.time_us, self.launches, self.processes = device_kernels(self.dir, self.exact)
    return False

  def print_table(self, per: int, unit: str, top: int = 25, prefix: str = "PROFILE") -> None:
    total = sum(self.time_us.values())
    if not total:
      print(f"{prefix} no device events; trace processes: {self.processes}")
      return
    gemm = sum(v for k, v in self.time_us.items() if GEMM.search(k))
    n = sum(self.launches.values())
    print(f"{prefix} device time {total / 1e3 / per:.3f} ms/{unit} in {n / per:.0f} kernels/{unit} "
          f"(over {per} {unit}s); matmul kernels {gemm / total:.1%}")
    for name, dur in self.time_us.most_common(top):
      print(f"{prefix} {dur / 1e3 / per:9.3f} ms/{unit} {dur / total:6.1%} {self.launches[name] / per:7.1f}x  {name}")
