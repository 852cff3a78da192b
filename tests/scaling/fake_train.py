"""A stand-in for `python -m experiments.train` in the sweep tests.

Takes `--config=FILE:NAME --workdir=DIR`. Appends its invocation to DIR/calls.txt, writes DIR/metrics.jsonl and
DIR/done.json. FAKE_TRAIN_FAIL=<name> makes that point exit with status 3 after writing a "checkpoint"
(DIR/ckpt), so that a second run finds the workdir and resumes.
"""

import json
import os
import pathlib
import sys


def main() -> int:
  args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
  name = args["config"].rsplit(":", 1)[1]
  workdir = pathlib.Path(args["workdir"])
  workdir.mkdir(parents=True, exist_ok=True)
  resumed = (workdir / "ckpt").exists()
  with (workdir / "calls.txt").open("a") as f:
    f.write(("resume " if resumed else "start ") + " ".join(sys.argv[1:]) + "\n")
  print(f"training {name}", flush=True)
  if os.environ.get("FAKE_TRAIN_FAIL") == name and not resumed:
    (workdir / "ckpt").write_text("1")
    print("interrupted", flush=True)
    return 3
  size = 1 + len(name)
  with (workdir / "metrics.jsonl").open("w") as f:
    for step in (1, 2):
      f.write(json.dumps(dict(step=step, loss=3.0 / step, tokens=100 * step, flops=1e9 * step)) + "\n")
  done = dict(step=2, eval_loss=2.0 / size, tokens=200, flops=2e9 * size, params=1000 * size)
  (workdir / "done.json").write_text(json.dumps(done))
  print("done", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
