"""One device against FSDP over N devices: throughput per device, and the training losses on the same data.

  python -m benchmarks.fsdp --config=experiments/configs/1p3b.py --devices=2 --batch_per_device=8 \
      --loss_steps=50 --loss_batch=8

Stages, each run in its own subprocess so that it owns exactly the devices it is given (CUDA_VISIBLE_DEVICES on
GPUs, `--xla_force_host_platform_device_count` on the CPU):
  1. throughput  `benchmarks.train_step` on 1 device at `--batch_per_device` rows and on N devices (mesh data=1,
                 fsdp=N) at N times that; the ratio of tokens/s per device (the bar: at least 0.9).
  2. losses      `experiments.train` on the embedded corpus (real text, byte tokens), same seed, data and global
                 batch (`--loss_batch`): on one device; on N devices with FSDP; and on one device with 2
                 micro-batches. The last is the same computation summed in another order, so its distance from
                 the first is the yardstick of the run's rounding noise. The final held-out loss (2 batches) is
                 compared for the first two (the micro-batched run evaluates on smaller batches).
  3. compare     the largest per-step |loss difference| of FSDP and of the yardstick from the one-device run;
                 FSDP counts as within noise when its difference is at most twice the yardstick's.
Appends one JSON line to benchmarks/results/fsdp.jsonl (and two to train_step.jsonl) and prints a summary.
"""

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

flags.DEFINE_string("config", None, "Config file (path[:arg]), as for experiments.train.")
flags.DEFINE_integer("devices", 2, "Devices of the FSDP runs.")
flags.DEFINE_integer("batch_per_device", 8, "Throughput stage: rows per device per step.")
flags.DEFINE_integer("throughput_steps", 10, "Throughput stage: timed steps of each run.")
flags.DEFINE_integer("loss_steps", 50, "Loss stage: training steps of each run.")
flags.DEFINE_integer("loss_batch", 8, "Loss stage: global batch (rows) of every run.")
flags.DEFINE_integer("loss_warmup", 10, "Loss stage: learning-rate warmup steps (the config's are for long runs).")
flags.DEFINE_string("scratch", "", "Loss stage: folder for the runs' workdirs, each deleted after it is read "
                    "(a final checkpoint takes ~16 bytes per parameter); default: the system's temporary folder.")
flags.DEFINE_multi_string("override", [], "Extra `--config.x=y` flags passed to every run.")
flags.DEFINE_enum("stages", "all", ["all", "throughput", "losses"], "Which stages to run.")
flags.DEFINE_string("out", "benchmarks/results/fsdp.jsonl", "Where to append the result line.")
flags.mark_flags_as_required(["config"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_MESH = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1")


def device_env(n: int) -> dict:
  """The environment of a subprocess that sees `n` devices: the first n GPUs, or n host CPU devices."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
  gpus = shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0")
  if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not gpus:
    flags_ = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags_ + [f"--xla_force_host_platform_device_count={n}"]))
  else:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
  return env


def _run(args: list[str], n: int) -> str:
  print(f"[{n} device(s)] {' '.join(args)}", flush=True)
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=device_env(n), capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc.stdout


def throughput(config: str, n: int, per_device: int, steps: int, overrides: list[str]) -> dict:
  """tokens/s per device on 1 and on n devices (FSDP), and their ratio."""
  rows = {}
  for k, mesh in ((1, ()), (n, FSDP_MESH)):
    out = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    try:
      _run(["-m", "benchmarks.train_step", f"--config={config}", f"--batch={per_device * k}", f"--steps={steps}",
            f"--label=fsdp {k} device(s)", f"--out={out}", *mesh, *overrides], k)
      with open(out) as f:
        line = f.read().strip().splitlines()[-1]
    finally:
      os.remove(out)
    with open(os.path.join(REPO, "benchmarks", "results", "train_step.jsonl"), "a") as f:
      f.write(line + "\n")
    rows[k] = json.loads(line)
  one, many = rows[1], rows[n]
  return {"one": _pick(one), "fsdp": _pick(many),
          "per_device_ratio": round(many["tokens_per_s_per_device"] / one["tokens_per_s_per_device"], 4)}


def _pick(row: dict) -> dict:
  return {k: row.get(k) for k in ("device", "batch", "mesh", "tokens_per_s", "tokens_per_s_per_device", "step_ms",
                                  "peak_memory_gib", "compile_s")}


def read_losses(workdir: str) -> tuple[dict[int, float], float | None]:
  """Per-step training losses and the final held-out loss from a run's metrics.jsonl."""
  losses, eval_loss = {}, None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        losses[int(row["step"])] = float(row["loss"])
      if "eval_loss" in row:
        eval_loss = float(row["eval_loss"])
  return losses, eval_loss


def compare(reference: dict[int, float], other: dict[int, float]) -> dict:
  """Largest and mean |difference| over the steps both runs logged, and where the largest one is."""
  steps = sorted(set(reference) & set(other))
  if not steps:
    raise ValueError("the two runs share no logged step")
  diffs = [abs(reference[s] - other[s]) for s in steps]
  worst = max(range(len(steps)), key=diffs.__getitem__)
  return {"steps": len(steps), "max_abs": max(diffs), "mean_abs": sum(diffs) / len(diffs),
          "max_at_step": steps[worst], "max_rel": diffs[worst] / abs(reference[steps[worst]])}


def verdict(fsdp: dict, yardstick: dict) -> bool:
  return fsdp["max_abs"] <= 2 * yardstick["max_abs"]


def losses(config: str, n: int, steps: int, batch: int, warmup: int, overrides: list[str],
           scratch: str = "") -> dict:
  root = tempfile.mkdtemp(prefix="fsdp_losses_", dir=scratch or None)
  common = [f"--config={config}", "--config.data.source=embedded", "--config.data.path=",
            f"--config.train.steps={steps}", f"--config.train.global_batch={batch}", "--config.train.log_every=1",
            f"--config.optim.warmup_steps={warmup}", "--config.eval.every_steps=0", "--config.eval.batches=2",
            "--config.checkpoint.every_steps=0", "--config.train.sample_tokens=0"]
  runs = {"one": (1, ()), "fsdp": (n, FSDP_MESH), "one_accum2": (1, ("--config.train.grad_accum=2",))}
  got = {}
  try:
    for name, (k, extra) in runs.items():
      workdir = os.path.join(root, name)
      _run(["-m", "experiments.train", f"--workdir={workdir}", *common, *extra, *overrides], k)
      got[name] = read_losses(workdir)
      shutil.rmtree(workdir)  # a large model's final checkpoint
  finally:
    shutil.rmtree(root, ignore_errors=True)
  ref = got["one"][0]
  fsdp, yard = compare(ref, got["fsdp"][0]), compare(ref, got["one_accum2"][0])
  return {"steps": steps, "batch": batch, "first_loss": ref[min(ref)], "last_loss": ref[max(ref)],
          "eval_loss": {k: got[k][1] for k in ("one", "fsdp")}, "fsdp_vs_one": fsdp, "accum2_vs_one": yard,
          "within_noise": verdict(fsdp, yard),
          "losses": {k: [round(v[0][s], 5) for s in sorted(v[0])] for k, v in got.items()}}


def main(argv):
  del argv
  f = flags.FLAGS
  if f.devices < 2:
    raise app.UsageError("--devices must be at least 2 (FSDP over one device is the one-device run)")
  result = {"date": datetime.date.today().isoformat(), "config": f.config, "devices": f.devices,
            "overrides": f.override,
            "command": "python -m benchmarks.fsdp " + " ".join(sys.argv[1:])}
  if f.stages in ("all", "throughput"):
    result["throughput"] = t = throughput(f.config, f.devices, f.batch_per_device, f.throughput_steps, f.override)
    print(f"throughput: 1 device {t['one']['tokens_per_s_per_device']:.0f} tokens/s, {f.devices} devices (FSDP) "
          f"{t['fsdp']['tokens_per_s_per_device']:.0f} per device: ratio {t['per_device_ratio']:.3f}; peak "
          f"{t['one']['peak_memory_gib']} / {t['fsdp']['peak_memory_gib']} GiB", flush=True)
  if f.stages in ("all", "losses"):
    result["losses"] = r = losses(f.config, f.devices, f.loss_steps, f.loss_batch, f.loss_warmup, f.override,
                                  f.scratch)
    print(f"losses over {r['steps']} steps ({r['first_loss']:.3f} -> {r['last_loss']:.3f}): FSDP vs one device "
          f"max |diff| {r['fsdp_vs_one']['max_abs']:.4f} (mean {r['fsdp_vs_one']['mean_abs']:.4f}); one device "
          f"with 2 micro-batches vs one device {r['accum2_vs_one']['max_abs']:.4f} (mean "
          f"{r['accum2_vs_one']['mean_abs']:.4f}); within noise: {r['within_noise']}; eval {r['eval_loss']}",
          flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  with open(f.out, "a") as fh:
    fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  app.run(main)
