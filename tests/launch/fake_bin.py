"""Fake `gcloud`, `sbatch`, `srun`, `squeue` and `pip` for the launcher tests: `fake_bin.py PROGRAM ARGS...`.

Every call is appended to $FAKE_LOG as {"prog", "argv"}. gcloud plays a one-machine TPU VM whose home
directory is $FAKE_REMOTE: `tpu-vm ssh --command=C` runs C there with bash, `tpu-vm scp` copies between here
and there (`NODE:path` is a path under $FAKE_REMOTE), `queued-resources describe` answers ACTIVE. sbatch runs
the batch script at once and prints job id 4242; srun runs its command; squeue lists nothing.
"""

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys


def _remote(path: str) -> pathlib.Path:
  return pathlib.Path(os.environ["FAKE_REMOTE"]) / path.split(":", 1)[1]


def gcloud(args: list[str]) -> int:
  pos = [a for a in args if not a.startswith("--")]
  flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
  if pos[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print("ACTIVE")
  elif pos[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    home = os.environ["FAKE_REMOTE"]
    return subprocess.run(["bash", "-c", flags["command"]], cwd=home, env=dict(os.environ, HOME=home)).returncode
  elif pos[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    *sources, dest = pos[4:]
    target = _remote(dest) if ":" in dest else pathlib.Path(dest)
    for src in sources:
      paths = glob.glob(str(_remote(src))) if ":" in src else [src]
      for path in paths:
        if target.is_dir() or dest.endswith("/"):
          target.mkdir(parents=True, exist_ok=True)
        else:
          target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
  return 0


def main() -> int:
  prog, args = sys.argv[1], sys.argv[2:]
  with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(dict(prog=prog, argv=args)) + "\n")
  if prog == "gcloud":
    return gcloud(args)
  if prog == "sbatch":
    with open(args[-1] + ".out", "w") as out:  # as sbatch --output
      subprocess.run(["bash", args[-1]], check=True, stdout=out, stderr=subprocess.STDOUT)
    print("4242;cluster")
  elif prog == "srun":
    cmd = args[next(i for i, a in enumerate(args) if not a.startswith("-")):]
    return subprocess.run(cmd).returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
