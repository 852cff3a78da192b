"""The local sweep runner with a fake trainer: commands, skip, resume, idempotent results."""

import io
import json
import pathlib
import subprocess
import sys

from mmfree_jax.scaling import sweep

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "experiments/configs/scaling.py"
FAKE = [sys.executable, str(pathlib.Path(__file__).with_name("fake_train.py"))]


def _points():
  return sweep.load_points(f"{CONFIG}:cpu_smoke")[1]


def test_load_and_select():
  path, points = sweep.load_points(str(REPO / CONFIG))
  assert path.endswith("scaling.py") and len(points) == 10
  assert [p["name"] for p in sweep.select(points, "^mmfree-d1")] == ["mmfree-d128", "mmfree-d192"]
  assert sweep.split_config("a/b.py:x") == ("a/b.py", "x") and sweep.split_config("a/b.py") == ("a/b.py", "")


def test_run_skip_resume_idempotent(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  points = _points()
  monkeypatch.setenv("FAKE_TRAIN_FAIL", points[1]["name"])
  out = io.StringIO()
  status = sweep.run_local(points, config_path=CONFIG, sweep_dir=tmp_path, train_cmd=FAKE, out=out)
  assert status[points[1]["name"]] == "failed"
  assert all(status[p["name"]] == "done" for p in points if p is not points[1])
  text = out.getvalue()
  assert f"[{points[0]['name']}] training {points[0]['name']}" in text
  assert f"--config={CONFIG}:{points[0]['name']}" in text
  results = sweep.read_results(tmp_path / "results.jsonl")
  assert len(results) == len(points) - 1

  monkeypatch.delenv("FAKE_TRAIN_FAIL")
  status = sweep.run_local(points, config_path=CONFIG, sweep_dir=tmp_path, train_cmd=FAKE, out=io.StringIO(),
                           parallel=2)
  assert status[points[1]["name"]] == "resumed"
  assert sum(s == "skipped" for s in status.values()) == len(points) - 1
  calls = (tmp_path / "runs" / points[1]["name"] / "calls.txt").read_text().splitlines()
  assert [c.split()[0] for c in calls] == ["start", "resume"]
  assert len((tmp_path / "runs" / points[0]["name"] / "calls.txt").read_text().splitlines()) == 1

  sweep.run_local(points, config_path=CONFIG, sweep_dir=tmp_path, train_cmd=FAKE, out=io.StringIO())
  results = sweep.read_results(tmp_path / "results.jsonl")
  assert sorted(r["name"] for r in results) == sorted(p["name"] for p in points)
  r = next(r for r in results if r["name"] == points[0]["name"])
  done = json.loads((tmp_path / "runs" / r["name"] / "done.json").read_text())
  assert r["loss"] == done["eval_loss"] and r["flops"] == done["flops"] and r["params"] == done["params"]
  assert r["family"] == points[0]["family"] and r["workdir"] == str(tmp_path / "runs" / r["name"])
  assert r["planned_flops"] == points[0]["flops"]
  assert (tmp_path / "logs" / f"{r['name']}.log").exists()


def test_dry_run_prints_commands(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  out = io.StringIO()
  status = sweep.run_local(_points(), config_path=CONFIG, sweep_dir=tmp_path, dry_run=True, out=out)
  assert set(status.values()) == {"dry_run"}
  assert "-m experiments.train --config=experiments/configs/scaling.py:cpu_smoke-mmfree-d32" in out.getvalue()
  assert not (tmp_path / "runs").exists()


def test_cli_with_env_train_cmd(tmp_path):
  env = {"MMFREE_SWEEP_TRAIN_CMD": " ".join(FAKE), "PATH": "/usr/bin:/bin"}
  cmd = [sys.executable, "-m", "experiments.sweep", f"--config={CONFIG}:cpu_smoke", "--launcher=local",
         f"--sweep_dir={tmp_path}", "--only=transformer"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr + proc.stdout
  names = [r["name"] for r in sweep.read_results(tmp_path / "results.jsonl")]
  assert sorted(names) == ["cpu_smoke-transformer-d32", "cpu_smoke-transformer-d64"]
