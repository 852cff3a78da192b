"""SLURM launcher against fake sbatch/srun/squeue: the batch script, submission, collection, no resubmission."""

import io
import json
import sys

import launch_fakes
from launch import slurm
from mmfree_jax.scaling import sweep

CONFIG = "experiments/configs/scaling.py"


def _points():
  return sweep.load_points(f"{CONFIG}:cpu_smoke")[1][:2]


def test_submit_wait_collect(tmp_path, monkeypatch):
  fakes = launch_fakes.Fakes(tmp_path, monkeypatch)
  points = _points()
  options = slurm.SlurmOptions(nodes=2, gpus_per_node=4, partition="gpu", poll_s=0.01, setup="echo setup",
                               train_cmd=[sys.executable, str(launch_fakes.FAKE_TRAIN)])
  sweep_dir = tmp_path / "sweep"
  status = slurm.run(points, config_path=CONFIG, sweep_dir=sweep_dir, options=options, out=io.StringIO())
  assert set(status.values()) == {"done"}
  script = (sweep_dir / "slurm" / f"{points[0]['name']}.sbatch").read_text()
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
               "#SBATCH --partition=gpu", "echo setup"):
    assert line in script
  sbatch = fakes.calls("sbatch")
  assert [c[1:3] for c in sbatch] == [["--parsable", str(sweep_dir / "slurm" / f"{p['name']}.sbatch")]
                                      for p in points]
  srun = fakes.calls("srun")
  workdir = sweep_dir / "runs" / points[0]["name"]
  assert f"--config={CONFIG}:{points[0]['name']}" in srun[0] and f"--workdir={workdir}" in srun[0]
  assert "--kill-on-bad-exit=1" in srun[0]
  assert json.loads((sweep_dir / "slurm" / "jobs.json").read_text())[points[0]["name"]] == "4242"
  results = sweep.read_results(sweep_dir / "results.jsonl")
  assert sorted(r["name"] for r in results) == sorted(p["name"] for p in points)
  assert fakes.calls("squeue")

  status = slurm.run(points, config_path=CONFIG, sweep_dir=sweep_dir, options=options, out=io.StringIO())
  assert set(status.values()) == {"skipped"} and len(fakes.calls("sbatch")) == 2
  assert len(sweep.read_results(sweep_dir / "results.jsonl")) == 2


def test_queued_job_not_resubmitted(tmp_path, monkeypatch):
  fakes = launch_fakes.Fakes(tmp_path, monkeypatch)
  (fakes.bin / "squeue").write_text("#!/bin/sh\necho 77\n")
  points = _points()[:1]
  sweep_dir = tmp_path / "sweep"
  (sweep_dir / "slurm").mkdir(parents=True)
  (sweep_dir / "slurm" / "jobs.json").write_text(json.dumps({points[0]["name"]: "77"}))
  options = slurm.SlurmOptions(wait=False)
  status = slurm.run(points, config_path=CONFIG, sweep_dir=sweep_dir, options=options, out=io.StringIO())
  assert status == {points[0]["name"]: "submitted"} and not fakes.calls("sbatch")


def test_dry_run_prints_script(tmp_path, monkeypatch):
  fakes = launch_fakes.Fakes(tmp_path, monkeypatch)
  out = io.StringIO()
  status = slurm.run(_points(), config_path=CONFIG, sweep_dir=tmp_path / "s", dry_run=True, out=out)
  assert set(status.values()) == {"dry_run"} and not fakes.calls()
  text = out.getvalue()
  assert "srun --kill-on-bad-exit=1" in text and "python -m experiments.train" in text
  assert "sbatch --parsable" in text and not (tmp_path / "s").exists()
