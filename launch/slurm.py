"""SLURM launcher of a sweep: one batch job per point, one process per GPU.

For each point not finished yet, writes `SWEEP_DIR/slurm/<name>.sbatch`:

  #SBATCH --nodes=N --ntasks-per-node=G --gpus-per-node=G ...
  srun --kill-on-bad-exit=1 --output=SWEEP_DIR/logs/<name>.%j.%t.log \
      python -m experiments.train --config=<config file>:<name> --workdir=SWEEP_DIR/runs/<name>

and submits it with `sbatch --parsable`. Every process sees the node's GPUs; `jax.distributed.initialize()` in
the trainer reads the SLURM environment (coordinator, process id and count, SLURM_LOCALID -> local GPU). Job
ids are kept in `SWEEP_DIR/slurm/jobs.json`; a point whose job is still queued or running (`squeue`) is not
submitted again. With `wait` (default) the launcher polls `squeue` until the jobs have left the queue, then
records the finished points in results.jsonl (the cluster's shared file system holds the workdirs); without
it, re-running the sweep later collects them. SWEEP_DIR should be on the shared file system.
"""

import dataclasses
import json
import os
import pathlib
import shlex
import sys
import time
from typing import Any, Sequence, TextIO

from mmfree_jax.scaling import sweep


@dataclasses.dataclass
class SlurmOptions:
  nodes: int = 1
  gpus_per_node: int = 8
  cpus_per_task: int = 8
  time: str = "24:00:00"
  partition: str = ""
  account: str = ""
  setup: str = ""  # shell lines before srun: modules, environment activation
  python: str = "python"
  wait: bool = True
  poll_s: float = 30.0
  train_cmd: Sequence[str] = ()  # replaces `python -m experiments.train` (also $MMFREE_SWEEP_TRAIN_CMD)


def sbatch_script(point: dict[str, Any], *, config_path: str, sweep_dir: pathlib.Path, options: SlurmOptions,
                  repo: pathlib.Path) -> str:
  """The batch script of one point."""
  name = point["name"]
  logs = sweep_dir / "logs"
  train = list(options.train_cmd) or (
      sweep.train_cmd_prefix() if os.environ.get(sweep.TRAIN_CMD_ENV)
      else [options.python, "-m", "experiments.train"])
  cmd = train + sweep.train_args(config_path, name, str(sweep.run_dir(sweep_dir, name)))
  lines = [
      "#!/bin/bash",
      f"#SBATCH --job-name=mmfree-{name}",
      f"#SBATCH --nodes={options.nodes}",
      f"#SBATCH --ntasks-per-node={options.gpus_per_node}",
      f"#SBATCH --gpus-per-node={options.gpus_per_node}",
      f"#SBATCH --cpus-per-task={options.cpus_per_task}",
      f"#SBATCH --time={options.time}",
      f"#SBATCH --output={logs}/{name}.%j.out",
      "#SBATCH --open-mode=append",
  ]
  lines += [f"#SBATCH --partition={options.partition}"] * bool(options.partition)
  lines += [f"#SBATCH --account={options.account}"] * bool(options.account)
  lines += ["set -euo pipefail", f"cd {shlex.quote(str(repo))}"]
  lines += [options.setup] * bool(options.setup)
  srun = ["srun", "--kill-on-bad-exit=1", f"--output={logs}/{name}.%j.%t.log"]
  lines.append(shlex.join(srun + cmd))
  return "\n".join(lines) + "\n"


def _jobs_path(sweep_dir: pathlib.Path) -> pathlib.Path:
  return sweep_dir / "slurm" / "jobs.json"


def _queued(commands: sweep.Commands, job_ids: Sequence[str]) -> set[str]:
  """The job ids among `job_ids` still in the queue (pending, running, completing)."""
  if not job_ids:
    return set()
  text = commands.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], check=False, capture=True)
  return {line.strip() for line in text.splitlines() if line.strip()} & set(job_ids)


def run(points: Sequence[dict[str, Any]], *, config_path: str, sweep_dir: str | os.PathLike,
        options: SlurmOptions = SlurmOptions(), dry_run: bool = False, repo: str | os.PathLike | None = None,
        out: TextIO = sys.stdout) -> dict[str, str]:
  """Submits the unfinished points; with `options.wait`, waits and collects. Returns name -> status
  ('skipped', 'done', 'failed', 'submitted', 'dry_run')."""
  sweep_dir = pathlib.Path(sweep_dir).absolute()
  repo = pathlib.Path(repo or os.getcwd()).absolute()
  commands = sweep.Commands(dry_run, out)
  pending = sweep.pending_points(points, sweep_dir, record=not dry_run)
  status = {p["name"]: "skipped" for p in points}
  jobs_path = _jobs_path(sweep_dir)
  jobs: dict[str, str] = json.loads(jobs_path.read_text()) if jobs_path.exists() else {}
  queued = _queued(commands, [jobs[p["name"]] for p in pending if p["name"] in jobs]) if not dry_run else set()
  for p in pending:
    name = p["name"]
    if jobs.get(name) in queued:
      commands.say(f"[{name}] job {jobs[name]} is still queued: not submitted again")
      status[name] = "submitted"
      continue
    script = sbatch_script(p, config_path=config_path, sweep_dir=sweep_dir, options=options, repo=repo)
    path = sweep_dir / "slurm" / f"{name}.sbatch"
    if dry_run:
      commands.say(f"# {path}\n{script}")
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
      path.write_text(script)
    job = commands.run(["sbatch", "--parsable", str(path)], capture=True, dry_value="0").strip()
    status[name] = "dry_run" if dry_run else "submitted"
    if not dry_run:
      jobs[name] = job.splitlines()[-1].split(";")[0]
      jobs_path.write_text(json.dumps(jobs, indent=1))
      commands.say(f"[{name}] submitted as job {jobs[name]}")
  if dry_run or not options.wait:
    return status
  waiting = {jobs[n] for n, s in status.items() if s == "submitted"}
  while waiting:
    waiting = _queued(commands, sorted(waiting))
    if waiting:
      time.sleep(options.poll_s)
  for p in pending:
    workdir = sweep.run_dir(sweep_dir, p["name"])
    finished = sweep.read_done(workdir) is not None
    if finished:
      sweep.record_result(sweep_dir, p, workdir)
    status[p["name"]] = "done" if finished else "failed"
  return status
