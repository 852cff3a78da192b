"""Running the real trainer (`python -m experiments.train`) in subprocesses, and reading what it wrote."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A tiny model and short run: the point is the machinery, not the model.
SMALL = {
    "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "data.seq_len": 32, "train.global_batch": 8,
    "train.steps": 8, "train.log_every": 1, "eval.every_steps": 4, "eval.batches": 1,
    "checkpoint.every_steps": 2, "train.sample_tokens": 0, "optim.warmup_steps": 2,
}
FLOAT64 = {"model.dtype": "float64", "model.param_dtype": "float64"}

# One persistent XLA compilation cache shared by the trainer subprocesses of a test session: a run that repeats or
# resumes an earlier run's config loads the executables that run compiled instead of compiling them again (most of a
# tiny run's time; programs that compile in under half a second are not stored). It only ever returns the executable
# compiled from the same program, so what the runs compute, bit for bit, is unchanged; a program that differs
# (another config, mesh or device count) misses and is compiled.
XLA_CACHE = tempfile.mkdtemp(prefix="mmfree_jax_test_xla_cache_")
atexit.register(shutil.rmtree, XLA_CACHE, ignore_errors=True)


def command(workdir: str, overrides: dict, config: str = "experiments/configs/tiny.py") -> list[str]:
  args = [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={workdir}"]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def env(devices: int = 1, x64: bool = False, cache: bool = True) -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
           PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
  if cache:
    e.update(JAX_COMPILATION_CACHE_DIR=XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  if x64:
    e["JAX_ENABLE_X64"] = "1"
  return e


def run(workdir: str, overrides: dict | None = None, devices: int = 1, x64: bool = False, check: bool = True,
        **kw) -> subprocess.CompletedProcess:
  proc = subprocess.run(command(workdir, {**SMALL, **(overrides or {})}, **kw), cwd=REPO, env=env(devices, x64),
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


def job(workdir: str, overrides: dict | None = None, devices: int = 1, x64: bool = False) -> tuple[list[str], dict]:
  """A run's command and environment for `run_together`: without the compilation cache, as runs at once would compile
  and store the same programs at the same time."""
  return command(workdir, {**SMALL, **(overrides or {})}), env(devices, x64, cache=False)


def run_together(*jobs: tuple[list[str], dict]) -> list[str]:
  """Independent processes (command, environment) at once; their outputs (stdout and stderr). A tiny run alone leaves
  part of a multi-core CPU idle (its time is mostly XLA compiling). Raises, as `run` does, if one fails."""
  procs = []
  with tempfile.TemporaryDirectory() as logs:
    try:
      for i, (cmd, e) in enumerate(jobs):
        with open(os.path.join(logs, f"{i}.txt"), "w") as out:  # a file, not a pipe: nothing blocks on a full one
          procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=out, stderr=subprocess.STDOUT, text=True))
      for p in procs:
        p.wait(timeout=600)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    outs = []
    for i, p in enumerate(procs):
      with open(os.path.join(logs, f"{i}.txt")) as f:
        outs.append(f.read())
      if p.returncode != 0:
        raise AssertionError(f"failed ({p.returncode}): {' '.join(jobs[i][0][1:])}\n{outs[-1][-5000:]}")
  return outs


def start(workdir: str, overrides: dict | None = None, devices: int = 1, x64: bool = False) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, {**SMALL, **(overrides or {})}), cwd=REPO, env=env(devices, x64),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(workdir: str, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
  """Block until metrics.jsonl records `step` (the run is then at step + 1 or later)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
    if any(r["step"] >= step for r in metrics(workdir)):
      return
    time.sleep(0.01)
  raise AssertionError(f"step {step} not reached in {timeout} s")


def metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip().endswith("}")]


def losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}


def eval_losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["eval_loss"] for r in metrics(workdir) if "eval_loss" in r}


def final_params(workdir: str) -> dict[str, np.ndarray]:
  """The newest checkpoint's parameters as flat {path: array}."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(root) if d.isdigit())
  path = os.path.join(root, str(step), "state")
  ckptr = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ckptr.metadata(path).item_metadata.tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
  tree = ckptr.restore(path, target)
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}/{k}", v)
    else:
      flat[prefix] = np.asarray(node)
  walk("", tree["params"])
  return flat
