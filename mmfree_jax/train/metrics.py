"""Metrics: one JSON object per line in `WORKDIR/metrics.jsonl`, TensorBoard event files, a console line.

Only process 0 writes. JSONL is the source of truth (the notebook reads it); TensorBoard is for watching.
"""

import json
import os
import sys
import time

import jax

# Peak dense bf16 FLOP/s per chip, for MFU. Unknown devices (CPU) report no MFU.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, (int, float)) and v is not None:
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def truncate_after(workdir: str, step: int) -> None:
  """On resume, drop metrics lines beyond the restored step so the file describes one continuous run."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
  with open(path, "w") as f:
    f.writelines(lines)


class Progress:
  """A console line per log step: step, loss, throughput, ETA."""

  def __init__(self, total_steps: int, enabled: bool):
    self.total, self.enabled, self.start = total_steps, enabled, time.time()

  def log(self, step: int, loss: float, tokens_per_s: float, step_time: float, extra: str = "") -> None:
    if not self.enabled:
      return
    eta = (self.total - step) * step_time
    print(f"step {step:>6}/{self.total}  loss {loss:.4f}  {tokens_per_s/1e3:8.1f}k tok/s  "
          f"{step_time*1e3:7.1f} ms/step  eta {eta/60:5.1f} min{extra}", file=sys.stdout, flush=True)
