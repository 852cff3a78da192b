"""Cloud TPU launcher of a sweep: one TPU VM (slice), every point trained on all its workers in turn.

Steps, in order (all through `gcloud`; `dry_run` prints them instead):
  1. Pre-flight: for each point not finished yet,
     `python -m experiments.compile_tpu --config=<config file>:<name> --topology=<topology> --json`
     (compiles the training step for the target topology without the hardware). A non-zero exit or a JSON
     answer with `"fits": false` stops the sweep before anything is created. Skipped with
     `skip_compile_check`, and (with a warning) when the module `experiments.compile_tpu` does not exist.
     `compile_cmd` / $MMFREE_SWEEP_COMPILE_CMD replace the command.
  2. Create: `gcloud compute tpus queued-resources create` (then `describe` until ACTIVE) or, with
     `queued=False`, `gcloud compute tpus tpu-vm create`.
  3. Code: the local source tree (`code_dir`, without .git and caches) as a tarball, `tpu-vm scp` to every
     worker, unpacked in `remote_code_dir`, then `pip install -e .[tpu]` (`--worker=all`).
  4. Each point: `tpu-vm ssh --worker=all --command="... python -m experiments.train --config=... --workdir=..."`,
     every worker's output kept in `<remote sweep dir>/logs/<name>.<hostname>.log` and streamed here into
     `SWEEP_DIR/logs/<name>.log`.
  5. Results: `done.json` and `metrics.jsonl` copied back from worker 0 (or from gs:// when
     `remote_sweep_dir` is a bucket path) to `SWEEP_DIR/runs/<name>/`, the workers' logs to
     `SWEEP_DIR/logs/`; the point is recorded in results.jsonl.
  6. Delete the resources (also when a step fails), unless `keep`.
With `remote_sweep_dir` on gs://, checkpoints outlive the VM and an interrupted point resumes on the next run.
"""

import dataclasses
import importlib.util
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time
from typing import Any, Sequence, TextIO

from mmfree_jax.scaling import sweep

COMPILE_CMD_ENV = "MMFREE_SWEEP_COMPILE_CMD"
COMPILE_MODULE = "experiments.compile_tpu"


class PreflightError(RuntimeError):
  """A point does not fit the target TPU topology."""


@dataclasses.dataclass
class TpuOptions:
  name: str = "mmfree-sweep"
  zone: str = "us-central2-b"
  project: str = ""
  accelerator_type: str = "v4-8"
  runtime_version: str = "tpu-ubuntu2204-base"
  topology: str = ""  # for the compile check; '' = accelerator_type
  queued: bool = True
  spot: bool = False
  keep: bool = False
  remote_code_dir: str = "mmfree_jax"  # relative to the workers' home directory
  remote_sweep_dir: str = "sweep"  # relative to home, or gs://bucket/path
  code_dir: str = ""  # local source tree to copy ('' = current directory)
  skip_compile_check: bool = False
  compile_cmd: Sequence[str] = ()
  train_cmd: Sequence[str] = ()  # replaces `python -m experiments.train` on the workers
  poll_s: float = 30.0
  create_timeout_s: float = 3 * 3600.0


def _loc(o: TpuOptions) -> list[str]:
  return [f"--zone={o.zone}"] + ([f"--project={o.project}"] if o.project else [])


def compile_check_cmd(o: TpuOptions, config_path: str, name: str) -> list[str] | None:
  """The pre-flight command of one point, or None when the check is skipped or unavailable."""
  if o.skip_compile_check:
    return None
  if o.compile_cmd:
    prefix = list(o.compile_cmd)
  elif os.environ.get(COMPILE_CMD_ENV):
    prefix = shlex.split(os.environ[COMPILE_CMD_ENV])
  elif importlib.util.find_spec(COMPILE_MODULE) is not None:
    prefix = [sys.executable, "-m", COMPILE_MODULE]
  else:
    return None
  return prefix + [f"--config={config_path}:{name}", f"--topology={o.topology or o.accelerator_type}", "--json"]


def preflight(points: Sequence[dict[str, Any]], o: TpuOptions, config_path: str,
              commands: sweep.Commands) -> None:
  """Fails fast (PreflightError) if a point does not compile for, or fit, the topology."""
  for p in points:
    cmd = compile_check_cmd(o, config_path, p["name"])
    if cmd is None:
      why = "skipped" if o.skip_compile_check else f"{COMPILE_MODULE} not available"
      commands.say(f"compile check {why}")
      return
    if commands.dry_run:
      commands.run(cmd)
      continue
    try:
      text = commands.run(cmd, capture=True)
    except sweep.CommandError as e:
      raise PreflightError(f"{p['name']}: compile check failed: {e}") from e
    answer = last_json(text)
    if answer.get("fits", answer.get("fit", True)) is False:
      raise PreflightError(f"{p['name']} does not fit {o.topology or o.accelerator_type}: {json.dumps(answer)}")
    commands.say(f"[{p['name']}] compile check: fits")


def last_json(text: str) -> dict[str, Any]:
  """The last line of `text` that is a JSON object (the compile tool's `--json` answer), else {}."""
  for line in reversed(text.strip().splitlines()):
    try:
      value = json.loads(line)
    except ValueError:
      continue
    if isinstance(value, dict):
      return value
  try:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
  except ValueError:
    return {}


def create_cmds(o: TpuOptions) -> list[list[str]]:
  if o.queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", o.name, f"--node-id={o.name}"]
    cmd += _loc(o) + [f"--accelerator-type={o.accelerator_type}", f"--runtime-version={o.runtime_version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", o.name] + _loc(o)
    cmd += [f"--accelerator-type={o.accelerator_type}", f"--version={o.runtime_version}"]
  return [cmd + (["--spot"] if o.spot else [])]


def delete_cmd(o: TpuOptions) -> list[str]:
  if o.queued:
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", o.name] + _loc(o) + ["--force", "--quiet"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", o.name] + _loc(o) + ["--quiet"]


def wait_active(o: TpuOptions, commands: sweep.Commands) -> None:
  """Polls a queued resource until ACTIVE; raises on FAILED/SUSPENDED or after `create_timeout_s`."""
  if not o.queued:
    return
  cmd = ["gcloud", "compute", "tpus", "queued-resources", "describe", o.name] + _loc(o)
  cmd += ["--format=value(state.state)"]
  deadline = time.monotonic() + o.create_timeout_s
  while True:
    state = commands.run(cmd, capture=True, dry_value="ACTIVE").strip()
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
      raise sweep.CommandError(f"queued resource {o.name} is {state}")
    if time.monotonic() > deadline:
      raise sweep.CommandError(f"queued resource {o.name} not ACTIVE after {o.create_timeout_s:.0f} s ({state})")
    time.sleep(o.poll_s)


def ssh_cmd(o: TpuOptions, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", o.name] + _loc(o) + [f"--worker={worker}",
                                                                             f"--command={command}"]


def scp_cmd(o: TpuOptions, sources: Sequence[str], dest: str, worker: str = "0") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *sources, dest] + _loc(o) + [f"--worker={worker}"]


def _remote_path(path: str) -> str:
  """A remote path for a shell command: relative paths are under the workers' home directory."""
  return path if path.startswith(("/", "gs://")) else f'"$HOME"/{shlex.quote(path)}'


def train_remote_command(o: TpuOptions, config_path: str, name: str) -> str:
  """The shell command each worker runs for one point (from the code directory, output kept per worker)."""
  rdir = _remote_path(o.remote_sweep_dir)
  train = list(o.train_cmd) or ["python3", "-m", "experiments.train"]
  cmd = shlex.join(train + [f"--config={config_path}:{name}"]) + f" --workdir={rdir}/runs/{shlex.quote(name)}"
  logs = f"{_remote_path(o.remote_code_dir)}/logs" if o.remote_sweep_dir.startswith("gs://") else f"{rdir}/logs"
  return (f"set -o pipefail; cd {_remote_path(o.remote_code_dir)} && mkdir -p {logs} && "
          f"{cmd} 2>&1 | tee {logs}/{shlex.quote(name)}.$(hostname).log")


def collect_cmds(o: TpuOptions, name: str, local_run: pathlib.Path, local_logs: pathlib.Path) -> list[list[str]]:
  """Copies a point's done.json, metrics.jsonl and per-worker logs back."""
  rdir = o.remote_sweep_dir
  files = [f"{rdir}/runs/{name}/done.json", f"{rdir}/runs/{name}/metrics.jsonl"]
  if rdir.startswith("gs://"):
    logs = f"{o.remote_code_dir}/logs/{name}.*.log"
    return [["gcloud", "storage", "cp", *files, f"{local_run}/"],
            scp_cmd(o, [f"{o.name}:{logs}"], f"{local_logs}/", worker="all")]
  return [scp_cmd(o, [f"{o.name}:{f}" for f in files], f"{local_run}/"),
          scp_cmd(o, [f"{o.name}:{rdir}/logs/{name}.*.log"], f"{local_logs}/", worker="all")]


def _copy_code(o: TpuOptions, sweep_dir: pathlib.Path, commands: sweep.Commands) -> None:
  code = pathlib.Path(o.code_dir or os.getcwd()).absolute()
  excludes = [".git", "__pycache__", "*.pyc", ".venv", ".pytest_cache"]
  if sweep_dir.is_relative_to(code):
    excludes.append(f"./{sweep_dir.relative_to(code)}")
  remote_tar = f"{o.name}-code.tgz"  # in the workers' home directory
  with tempfile.TemporaryDirectory() as tmp:
    tarball = pathlib.Path(tmp) / remote_tar
    commands.run(["tar", "czf", str(tarball)] + [f"--exclude={e}" for e in excludes] + ["-C", str(code), "."])
    commands.run(scp_cmd(o, [str(tarball)], f"{o.name}:{remote_tar}", worker="all"))
  rc = _remote_path(o.remote_code_dir)
  commands.run(ssh_cmd(o, f"mkdir -p {rc} && tar xzf {remote_tar} -C {rc} && rm {remote_tar} && cd {rc} && "
                          "pip install -q -e '.[tpu]'"))


def run(points: Sequence[dict[str, Any]], *, config_path: str, sweep_dir: str | os.PathLike,
        options: TpuOptions = TpuOptions(), dry_run: bool = False, out: TextIO = sys.stdout) -> dict[str, str]:
  """Trains the unfinished points on one TPU VM; returns name -> 'skipped' | 'done' | 'failed' | 'dry_run'."""
  o = options
  sweep_dir = pathlib.Path(sweep_dir).absolute()
  commands = sweep.Commands(dry_run, out)
  pending = sweep.pending_points(points, sweep_dir, record=not dry_run)
  status = {p["name"]: "skipped" for p in points}
  if not pending:
    return status
  preflight(pending, o, config_path, commands)
  for cmd in create_cmds(o):
    commands.run(cmd)
  try:
    wait_active(o, commands)
    _copy_code(o, sweep_dir, commands)
    for p in pending:
      name = p["name"]
      local_run, local_logs = sweep.run_dir(sweep_dir, name), sweep_dir / "logs"
      cmd = ssh_cmd(o, train_remote_command(o, config_path, name))
      if dry_run:
        commands.run(cmd)
      else:
        local_run.mkdir(parents=True, exist_ok=True)
        commands.say(f"[{name}] training on {o.name} ({o.accelerator_type})")
        rc = sweep.run_streamed(cmd, name, local_logs / f"{name}.log", out)
        if rc != 0:
          commands.say(f"[{name}] FAILED (exit status {rc})")
      for c in collect_cmds(o, name, local_run, local_logs):
        commands.run(c, check=False)
      if dry_run:
        status[name] = "dry_run"
      elif sweep.read_done(local_run) is not None:
        sweep.record_result(sweep_dir, p, local_run)
        status[name] = "done"
      else:
        status[name] = "failed"
  finally:
    if not o.keep:
      commands.run(delete_cmd(o), check=False)
  return status
