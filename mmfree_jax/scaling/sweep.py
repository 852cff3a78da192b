"""Running a sweep of training points and collecting their results.

A sweep is a config file with `sweep(arg) -> list[point]` and `get_config(name)` (e.g.
`experiments/configs/scaling.py`); a point is a dict with at least `name`, `family`, `params`, `tokens` and
`flops`. Each point trains in its own workdir, `SWEEP_DIR/runs/<name>`, with

  python -m experiments.train --config=<config file>:<name> --workdir=SWEEP_DIR/runs/<name>

The trainer writes `WORKDIR/done.json` = {"step", "eval_loss", "tokens", "flops", "params"} when it finishes
and resumes from its own checkpoint when started again in the same workdir. So a point with a done.json is
finished (skipped), a point with a workdir but no done.json is resumed, and any other point starts fresh.
Each finished point adds one line to `SWEEP_DIR/results.jsonl` (`result_record`); a point already there is
never added twice, so re-running a sweep is idempotent.

The train command can be replaced (tests, wrappers) by the `train_cmd` argument or by the environment
variable `MMFREE_SWEEP_TRAIN_CMD` (a shell-quoted command line; `--config=... --workdir=...` are appended).
"""

import concurrent.futures
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
from typing import Any, Callable, Sequence, TextIO

TRAIN_CMD_ENV = "MMFREE_SWEEP_TRAIN_CMD"
RESULTS = "results.jsonl"
DONE = "done.json"

_write_lock = threading.Lock()


def split_config(config: str) -> tuple[str, str]:
  """'path/to/file.py:arg' -> ('path/to/file.py', 'arg') (arg may be '')."""
  path, _, arg = config.partition(".py:")
  return (path + ".py", arg) if _ else (config, "")


def load_module(path: str) -> Any:
  """Imports a config file by path."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem + "_sweep_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_points(config: str) -> tuple[str, list[dict[str, Any]]]:
  """The config file path and the points of `config` ('file.py' or 'file.py:arg', arg passed to `sweep`)."""
  path, arg = split_config(config)
  module = load_module(path)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{path} defines no sweep()")
  return path, list(module.sweep(arg))


def select(points: Sequence[dict[str, Any]], only: str | None) -> list[dict[str, Any]]:
  """The points whose name matches the regular expression `only` (all if empty)."""
  if not only:
    return list(points)
  pattern = re.compile(only)
  return [p for p in points if pattern.search(p["name"])]


def train_cmd_prefix(train_cmd: Sequence[str] | None = None) -> list[str]:
  """The trainer command without its flags: `train_cmd`, else $MMFREE_SWEEP_TRAIN_CMD, else the trainer."""
  if train_cmd:
    return list(train_cmd)
  if os.environ.get(TRAIN_CMD_ENV):
    return shlex.split(os.environ[TRAIN_CMD_ENV])
  return [sys.executable, "-m", "experiments.train"]


def train_args(config_path: str, name: str, workdir: str) -> list[str]:
  """The trainer's flags for one point."""
  return [f"--config={config_path}:{name}", f"--workdir={workdir}"]


def run_dir(sweep_dir: str | os.PathLike, name: str) -> pathlib.Path:
  return pathlib.Path(sweep_dir) / "runs" / name


def read_done(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The trainer's done.json of a workdir, or None while it is not finished (or unreadable)."""
  path = pathlib.Path(workdir) / DONE
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a results.jsonl (blank or truncated lines ignored)."""
  records = []
  path = pathlib.Path(path)
  if not path.exists():
    return records
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records


def result_record(point: dict[str, Any], done: dict[str, Any], workdir: str | os.PathLike) -> dict[str, Any]:
  """One results.jsonl line: the point's fields, overridden by what the trainer measured; `loss` is the final
  held-out loss (done.json `eval_loss`), `planned_tokens`/`planned_flops` are the point's own numbers."""
  record = dict(point)
  record["planned_tokens"], record["planned_flops"] = point.get("tokens"), point.get("flops")
  for key in ("params", "tokens", "flops", "step"):
    if done.get(key) is not None:
      record[key] = done[key]
  record["loss"] = done.get("eval_loss")
  record["workdir"] = str(workdir)
  return record


def record_result(sweep_dir: str | os.PathLike, point: dict[str, Any], workdir: str | os.PathLike) -> bool:
  """Appends the point's result to results.jsonl if it is finished and not yet there. True if appended."""
  done = read_done(workdir)
  if done is None:
    return False
  path = pathlib.Path(sweep_dir) / RESULTS
  with _write_lock:
    if any(r.get("name") == point["name"] for r in read_results(path)):
      return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
      f.write(json.dumps(result_record(point, done, workdir)) + "\n")
  return True


def _say(out: TextIO, text: str) -> None:
  with _write_lock:
    out.write(text if text.endswith("\n") else text + "\n")
    out.flush()


def run_streamed(cmd: Sequence[str], prefix: str, log_path: pathlib.Path, out: TextIO,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> int:
  """Runs `cmd`, copying each output line to `out` with `[prefix] ` in front and to `log_path`."""
  log_path.parent.mkdir(parents=True, exist_ok=True)
  with log_path.open("a") as log:
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=cwd)
    assert proc.stdout is not None
    for line in proc.stdout:
      log.write(line)
      log.flush()
      _say(out, f"[{prefix}] {line.rstrip()}")
    return proc.wait()


def run_local(points: Sequence[dict[str, Any]], *, config_path: str, sweep_dir: str | os.PathLike,
              parallel: int = 1, dry_run: bool = False, train_cmd: Sequence[str] | None = None,
              out: TextIO = sys.stdout) -> dict[str, str]:
  """Trains the points on this machine, `parallel` at a time. Returns name -> status: 'skipped' (already
  finished), 'done', 'resumed' (finished after a resume), 'failed', or 'dry_run'."""
  sweep_dir = pathlib.Path(sweep_dir)
  prefix = train_cmd_prefix(train_cmd)
  env = dict(os.environ)
  if parallel > 1:  # several processes share one accelerator: no up-front allocation of its memory
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  def one(point: dict[str, Any]) -> str:
    name = point["name"]
    workdir = run_dir(sweep_dir, name)
    cmd = prefix + train_args(config_path, name, str(workdir))
    if read_done(workdir) is not None:
      if not dry_run:
        record_result(sweep_dir, point, workdir)
      _say(out, f"[{name}] finished already: skipped")
      return "skipped"
    resuming = workdir.exists()
    if dry_run:
      _say(out, ("# resume: " if resuming else "") + shlex.join(cmd))
      return "dry_run"
    _say(out, f"[{name}] {'resuming' if resuming else 'starting'}: {shlex.join(cmd)}")
    workdir.mkdir(parents=True, exist_ok=True)
    rc = run_streamed(cmd, name, sweep_dir / "logs" / f"{name}.log", out, env=env)
    if rc != 0 or read_done(workdir) is None:
      _say(out, f"[{name}] FAILED (exit status {rc}{'' if rc else ', no done.json'})")
      return "failed"
    record_result(sweep_dir, point, workdir)
    return "resumed" if resuming else "done"

  return map_points(one, points, parallel)


def map_points(fn: Callable[[dict[str, Any]], str], points: Sequence[dict[str, Any]],
               parallel: int = 1) -> dict[str, str]:
  """name -> fn(point), `parallel` points at a time, in the points' order."""
  if parallel <= 1:
    return {p["name"]: fn(p) for p in points}
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {p["name"]: pool.submit(fn, p) for p in points}
    return {name: f.result() for name, f in futures.items()}


def summarize(statuses: dict[str, str]) -> str:
  counts: dict[str, int] = {}
  for s in statuses.values():
    counts[s] = counts.get(s, 0) + 1
  return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


class CommandError(RuntimeError):
  """A launcher command exited with a non-zero status."""


class Commands:
  """Runs external commands for the launchers, or only prints them (`dry_run`)."""

  def __init__(self, dry_run: bool = False, out: TextIO = sys.stdout):
    self.dry_run = dry_run
    self.out = out

  def run(self, cmd: Sequence[str], *, check: bool = True, capture: bool = False, dry_value: str = "") -> str:
    """Runs `cmd`; returns its stdout when `capture` (else ''). Dry run: prints it, returns `dry_value`."""
    if self.dry_run:
      _say(self.out, shlex.join(cmd))
      return dry_value
    proc = subprocess.run(list(cmd), text=True, stdout=subprocess.PIPE if capture else None)
    if check and proc.returncode != 0:
      raise CommandError(f"exit status {proc.returncode}: {shlex.join(cmd)}")
    return (proc.stdout or "") if capture else ""

  def say(self, text: str) -> None:
    _say(self.out, text)


def pending_points(points: Sequence[dict[str, Any]], sweep_dir: str | os.PathLike,
                   record: bool = True) -> list[dict[str, Any]]:
  """The points not finished yet (no done.json under SWEEP_DIR/runs); finished ones are recorded."""
  pending = []
  for p in points:
    workdir = run_dir(sweep_dir, p["name"])
    if read_done(workdir) is None:
      pending.append(p)
    elif record:
      record_result(sweep_dir, p, workdir)
  return pending
