"""Throughput and memory of the real training step (the one `experiments.train` runs) on random tokens.

  python -m benchmarks.train_step --config=experiments/configs/370m.py --batch=16 --seq_len=2048 [--steps=20]
      [--config.model.remat=save_dots ...] [--set=bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM=8,...] [--label=...]

Same model, optimizer, sharding and dtypes as training; random tokens instead of the data pipeline. Reports
tokens/s (median of the timed steps after warm-up, each synchronized), MFU under the 6·N convention and
under the exact FLOP count of `mmfree_jax.flops`, peak device memory (from the device's memory stats) and
compile time; appends one JSON line to benchmarks/results/train_step.jsonl. On several devices (the mesh from
`--config.mesh.*`, e.g. `--config.mesh.data=1 --config.mesh.fsdp=-1` for FSDP) it also reports tokens/s per
device, and the peak memory is the largest over the devices.
"""

import datetime
import json
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import tiling

config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_integer("batch", 8, "Sequences per step (global batch).")
flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
flags.DEFINE_integer("steps", 20, "Timed steps (after --warmup).")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_string("label", "", "Free-form label stored with the result (e.g. the lever being tried).")
flags.DEFINE_string("out", "benchmarks/results/train_step.jsonl", "Where to append the result line.")
flags.DEFINE_string("set", "", "Kernel constants for this run, module.CONSTANT=value,... on mmfree_jax.layers "
                    "(`benchmarks/tiling.py`; e.g. bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM=8): A/B of a tiling.")
flags.mark_flags_as_required(["config"])

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def run(config, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mmfree_jax import flops  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train.program import build_program, resolve_batch  # pylint: disable=g-import-not-at-top

  config.train.global_batch = batch
  config.data.seq_len = seq_len
  mesh = sharding.make_mesh(config.mesh)
  resolve_batch(config, mesh, jax.process_count())
  program = build_program(config, mesh)
  accum = int(config.train.grad_accum)
  rng = np.random.default_rng(0)
  shape = (accum, batch // accum, seq_len)
  tokens = rng.integers(0, config.model.vocab_size, size=(shape[0], shape[1], seq_len + 1), dtype=np.int32)
  host = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
          "weights": np.ones(shape, np.float32)}
  batch_arrays = {k: jax.device_put(v, program.train_batch_sharding) for k, v in host.items()}
  with program.context:
    t0 = time.perf_counter()
    compiled = program.train_step.lower(program.abstract_state, program.abstract_train_batch(
        batch, accum, seq_len)).compile()
    compile_s = time.perf_counter() - t0
    state = program.init_state()
    times, losses = [], []
    for i in range(warmup + steps):
      t = time.perf_counter()
      state, m = compiled(state, batch_arrays)
      losses.append(float(m["loss"]))  # synchronizes
      if i >= warmup:
        times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  tokens_per_s = batch * seq_len / step_s
  counts = flops.param_counts(config.model)
  exact = flops.flops_per_token(config.model, seq_len)["train"]
  peak_flops = metrics_lib.peak_flops_per_device()
  ndev = mesh.devices.size
  dev = jax.devices()[0]
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  result = {
      "device": f"{dev.device_kind} x{ndev}", "date": datetime.date.today().isoformat(),
      "arch": config.model.arch, "params": counts["params"], "batch": batch, "seq_len": seq_len,
      "grad_accum": accum, "remat": config.model.remat, "bitlinear": config.model.bitlinear,
      "scan_impl": config.model.scan_impl, "dtype": config.model.dtype,
      "unroll_layers": config.model.unroll_layers, "quantize_weights_once": config.model.quantize_weights_once,
      "mesh": dict(mesh.shape), "tokens_per_s": round(tokens_per_s, 1),
      "tokens_per_s_per_device": round(tokens_per_s / ndev, 1), "step_ms": round(step_s * 1e3, 2),
      "step_ms_min": round(min(times) * 1e3, 2), "step_ms_max": round(max(times) * 1e3, 2),
      "peak_memory_gib": round(max(peaks) / 2**30, 2) if peaks else None,
      "compile_s": round(compile_s, 1), "first_loss": losses[0], "last_loss": losses[-1],
      "tflops_6n": round(flops.six_n(config.model) * tokens_per_s / 1e12, 1),
      "tflops_exact": round(exact * tokens_per_s / 1e12, 1),
      "versions": _versions(), "python": platform.python_version(),
  }
  if peak_flops:
    result["mfu_6n"] = round(flops.six_n(config.model) * tokens_per_s / (peak_flops * ndev), 4)
    result["mfu_exact"] = round(exact * tokens_per_s / (peak_flops * ndev), 4)
  return result


def _versions() -> dict:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  return {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax") if _installed(p)}


def _installed(name: str) -> bool:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  try:
    md.version(name)
    return True
  except md.PackageNotFoundError:
    return False


def main(argv):
  del argv
  f = flags.FLAGS
  with tiling.layer_constants(f.set):
    result = run(f.config, f.batch, f.seq_len, f.steps, f.warmup)
  result["set"] = f.set
  result["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
  result["label"] = f.label
  result["command"] = "python -m benchmarks.train_step " + " ".join(sys.argv[1:])
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  with open(f.out, "a") as fh:
    fh.write(json.dumps(result) + "\n")
  keys = ("arch", "params", "batch", "seq_len", "remat", "mesh", "tokens_per_s", "tokens_per_s_per_device",
          "step_ms", "mfu_6n", "mfu_exact", "peak_memory_gib", "compile_s")
  print("RESULT " + " ".join(f"{k}={result.get(k)}" for k in keys), flush=True)


if __name__ == "__main__":
  app.run(main)
