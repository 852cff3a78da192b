"""Cloud TPU launcher against a fake gcloud: pre-flight, create, copy, train on all workers, collect, delete."""

import io
import json
import sys

import pytest

import launch_fakes
from launch import tpu
from mmfree_jax.scaling import sweep

CONFIG = "experiments/configs/scaling.py"


def _points():
  return sweep.load_points(f"{CONFIG}:cpu_smoke")[1][:2]


def _options(tmp_path, **kw):
  code = tmp_path / "code"
  code.mkdir(exist_ok=True)
  (code / "setup.cfg").write_text("[metadata]\nname = x\n")
  base = dict(name="node", zone="z1", project="p1", accelerator_type="v5litepod-16", code_dir=str(code),
              train_cmd=[sys.executable, str(launch_fakes.FAKE_TRAIN)], skip_compile_check=True, poll_s=0.01)
  base.update(kw)
  return tpu.TpuOptions(**base)


def _verbs(calls):
  return [" ".join(a for a in c[1:7] if not a.startswith("-")) for c in calls]


def test_full_cycle(tmp_path, monkeypatch):
  fakes = launch_fakes.Fakes(tmp_path, monkeypatch)
  points = _points()
  sweep_dir = tmp_path / "sweep"
  status = tpu.run(points, config_path=CONFIG, sweep_dir=sweep_dir, options=_options(tmp_path), out=io.StringIO())
  assert set(status.values()) == {"done"}
  calls = fakes.calls("gcloud")
  verbs = _verbs(calls)
  assert verbs[0] == "compute tpus queued-resources create node"
  assert "--accelerator-type=v5litepod-16" in calls[0] and "--zone=z1" in calls[0] and "--project=p1" in calls[0]
  assert verbs[1] == "compute tpus queued-resources describe node"
  assert verbs[-1] == "compute tpus queued-resources delete node" and "--force" in calls[-1]
  ssh = [c for c in calls if c[4] == "ssh"]
  assert all("--worker=all" in c for c in ssh)
  assert any("pip install -q -e '.[tpu]'" in a for a in ssh[0])
  train = [a for c in ssh[1:] for a in c if a.startswith("--command=")]
  assert len(train) == 2 and f"--config={CONFIG}:{points[0]['name']}" in train[0]
  assert [c for c in fakes.calls("pip")]  # installed on the "workers"
  for p in points:
    local = sweep_dir / "runs" / p["name"]
    assert json.loads((local / "done.json").read_text())["step"] == 2
    assert (local / "metrics.jsonl").exists()
    assert list((sweep_dir / "logs").glob(f"{p['name']}.*.log"))  # per-worker log
  assert len(sweep.read_results(sweep_dir / "results.jsonl")) == 2

  n = len(fakes.calls())
  status = tpu.run(points, config_path=CONFIG, sweep_dir=sweep_dir, options=_options(tmp_path), out=io.StringIO())
  assert set(status.values()) == {"skipped"} and len(fakes.calls()) == n  # nothing created


def test_deleted_on_failure(tmp_path, monkeypatch):
  fakes = launch_fakes.Fakes(tmp_path, monkeypatch)
  (fakes.bin / "tar").write_text("#!/bin/sh\nexit 2\n")
  (fakes.bin / "tar").chmod(0o755)
  with pytest.raises(sweep.CommandError):
    tpu.run(_points(), config_path=CONFIG, sweep_dir=tmp_path / "s", options=_options(tmp_path, queued=False),
            out=io.StringIO())
  verbs = _verbs(fakes.calls("gcloud"))
  assert verbs == ["compute tpus tpu-vm create node", "compute tpus tpu-vm delete node"]


@pytest.mark.parametrize("fits", [True, False])
def test_compile_check(tmp_path, monkeypatch, fits):
  fakes = launch_fakes.Fakes(tmp_path, monkeypatch)
  check = tmp_path / "check.py"
  check.write_text("import json, sys\nprint('compiling')\n"
                   f"print(json.dumps(dict(fits={fits}, argv=sys.argv[1:])))\n")
  options = _options(tmp_path, skip_compile_check=False, compile_cmd=[sys.executable, str(check)],
                     topology="4x4")
  if fits:
    status = tpu.run(_points(), config_path=CONFIG, sweep_dir=tmp_path / "s", options=options, out=io.StringIO())
    assert set(status.values()) == {"done"}
  else:
    with pytest.raises(tpu.PreflightError):
      tpu.run(_points(), config_path=CONFIG, sweep_dir=tmp_path / "s", options=options, out=io.StringIO())
    assert not fakes.calls("gcloud")  # failed before anything was created
  cmd = tpu.compile_check_cmd(options, CONFIG, "x")
  assert cmd[-3:] == [f"--config={CONFIG}:x", "--topology=4x4", "--json"]


def test_default_compile_check_uses_module_when_present():
  options = tpu.TpuOptions()
  cmd = tpu.compile_check_cmd(options, CONFIG, "x")
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec(tpu.COMPILE_MODULE) is None:
    assert cmd is None  # the pre-flight hook is skipped while experiments.compile_tpu does not exist
  else:
    assert cmd[1:3] == ["-m", tpu.COMPILE_MODULE]
  assert tpu.compile_check_cmd(tpu.TpuOptions(skip_compile_check=True), CONFIG, "x") is None


def test_dry_run(tmp_path, monkeypatch):
  fakes = launch_fakes.Fakes(tmp_path, monkeypatch)
  out = io.StringIO()
  status = tpu.run(_points(), config_path=CONFIG, sweep_dir=tmp_path / "s", options=_options(tmp_path),
                   dry_run=True, out=out)
  assert set(status.values()) == {"dry_run"} and not fakes.calls()
  text = out.getvalue()
  for s in ("queued-resources create node", "tpu-vm scp", "--worker=all", "experiments/configs/scaling.py:",
            "queued-resources delete node"):
    assert s in text
