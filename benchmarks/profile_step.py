"""Where the training step's device time goes: trace a few steps and sum kernel time by kind.

  python -m benchmarks.profile_step --config=experiments/configs/370m.py --batch=16 [--top=25]

Traces with `jax.profiler` (Perfetto JSON), then groups the device-side events by kernel name with digits
stripped (gemm kernels, XLA loop / reduction fusions, cuDNN, copies) and prints the largest groups and the
matmul vs non-matmul split.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from absl import app
from absl import flags

from benchmarks import train_step  # defines --config, --batch, --seq_len, --steps (traced steps here)

flags.DEFINE_integer("top", 25, "Groups to print.")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  trace_dir = tempfile.mkdtemp()
  train_step.run(f.config, f.batch, f.seq_len, steps=2, warmup=1)  # compile + warm caches
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  train_step.run(f.config, f.batch, f.seq_len, steps=f.steps, warmup=0)
  jax.profiler.stop_trace()
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  events = json.load(gzip.open(path))["traceEvents"]
  pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {p for p, n in pids.items() if "/device:GPU" in n or "TPU:" in n}
  groups = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids:
      groups[re.sub(r"[\d_.]+$", "", re.sub(r"\.\d+", "", e["name"]))[:80]] += e.get("dur", 0)
  total = sum(groups.values())
  if not total:
    print(f"PROFILE no device events; trace processes: {sorted(pids.values())}")
    return
  gemm = sum(v for k, v in groups.items() if re.search(r"gemm|xmma|cutlass|cublas|nvjet|matmul|dot", k, re.I))
  print(f"PROFILE total device time {total/1e3:.1f} ms over {f.steps} steps; matmul kernels {gemm/total:.1%}")
  for name, dur in groups.most_common(f.top):
    print(f"PROFILE {dur/1e3/f.steps:9.2f} ms/step  {dur/total:6.1%}  {name}")


if __name__ == "__main__":
  app.run(main)
