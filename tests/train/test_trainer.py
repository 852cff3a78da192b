"""The trainer end to end: sharded == single-device, exact resume after SIGKILL / SIGTERM, corrupt fallback."""

import json
import os
import signal

import numpy as np
import pytest

from tests.train import trainer_util as tu

pytestmark = pytest.mark.slow

# `reference` (tests/train/conftest.py): one uninterrupted float32 run on one device, the run every interrupted
# run must reproduce. Runs of its config load its compiled programs from the session's compilation cache
# (`trainer_util.XLA_CACHE`).


def test_writes_metrics_checkpoints_and_summary(reference):
  rows = tu.metrics(reference)
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(1, 13))
  first = rows[0]
  for key in ("loss", "learning_rate", "grad_norm", "param_norm", "tokens_per_s", "step_time", "tokens", "flops"):
    assert key in first, key
  assert sorted(tu.eval_losses(reference)) == [4, 8, 12]
  assert tu.losses(reference)[12] < tu.losses(reference)[1]
  done = json.load(open(os.path.join(reference, "done.json")))
  assert done["step"] == 12 and done["tokens"] == 12 * 8 * 32 and done["eval_loss"] > 0
  assert json.load(open(os.path.join(reference, "config.json")))["model"]["d_model"] == 32
  assert max(int(d) for d in os.listdir(os.path.join(reference, "checkpoints")) if d.isdigit()) == 12
  assert os.listdir(os.path.join(reference, "tensorboard"))
  samples = [l for l in open(os.path.join(reference, "stdout.txt")) if l.startswith("sample: 'def ' -> '")]
  assert len(samples) == 1, "the run ends by printing one sample of train.sample_tokens tokens"


def _assert_same_run(a: str, b: str):
  la, lb = tu.losses(a), tu.losses(b)
  assert la.keys() == lb.keys()
  for step in la:
    assert la[step] == lb[step], (step, la[step], lb[step])  # bit for bit
  assert tu.eval_losses(a) == tu.eval_losses(b)
  pa, pb = tu.final_params(a), tu.final_params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_resume_after_sigkill_is_bit_exact(reference, tmp_path):
  workdir = str(tmp_path)
  proc = tu.start(workdir, {"train.steps": 12})
  tu.wait_for_step(workdir, 5, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "done.json"))
  out = tu.run(workdir, {"train.steps": 12})
  assert "resumed from the checkpoint at step" in out.stdout
  _assert_same_run(reference, workdir)


def test_sigterm_saves_and_resumes_bit_exact(reference, tmp_path):
  workdir = str(tmp_path)
  proc = tu.start(workdir, {"train.steps": 12, "checkpoint.every_steps": 100})
  tu.wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted: saved the checkpoint at step" in out
  saved = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert saved and int(saved[0]) < 12
  tu.run(workdir, {"train.steps": 12, "checkpoint.every_steps": 100})
  _assert_same_run(reference, workdir)


def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path):
  import shutil
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  os.remove(os.path.join(workdir, "done.json"))
  latest = os.path.join(workdir, "checkpoints", "12", "state")
  for root, _, files in os.walk(latest):  # truncate every data file of the newest checkpoint
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(3)
  out = tu.run(workdir, {"train.steps": 12})
  assert "checkpoint 12" in out.stdout and "falling back" in out.stdout
  assert "resumed from the checkpoint at step 10" in out.stdout
  _assert_same_run(reference, workdir)


def test_sharded_mesh_matches_one_device_float64(tmp_path):
  """(data, fsdp, tensor) = (2, 2, 2) on 8 devices gives the same losses as one device (float64: the 8-bit
  quantizers amplify last-bit differences of float32 reductions, see shared anchors; in float64 they agree).
  The model takes the GPU presets' paths (the BitLinear and recurrence kernels, per device, in interpret mode; the
  weights quantized once per pass), so the sharded program they make is the one checked."""
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  over = {**tu.FLOAT64, "train.steps": 4, "checkpoint.every_steps": 0, "eval.every_steps": 0,
          "model.bitlinear": "pallas", "model.scan_impl": "pallas", "model.quantize_weights_once": True}
  tu.run_together(tu.job(one, over, x64=True),
                  tu.job(eight, {**over, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, devices=8, x64=True))
  la, lb = tu.losses(one), tu.losses(eight)
  assert la.keys() == lb.keys() == {1, 2, 3, 4}
  for s in la:
    np.testing.assert_allclose(lb[s], la[s], rtol=1e-10)
  np.testing.assert_allclose(tu.eval_losses(eight)[4], tu.eval_losses(one)[4], rtol=1e-10)


def test_grad_accumulation_matches_one_big_batch_float64(tmp_path):
  one, four = str(tmp_path / "one"), str(tmp_path / "four")
  # Only the training losses are compared: no held-out evaluation (nor its compilation) in either run.
  over = {**tu.FLOAT64, "train.steps": 3, "checkpoint.every_steps": 0, "eval.every_steps": 0, "eval.batches": 0}
  tu.run_together(tu.job(one, over, x64=True), tu.job(four, {**over, "train.grad_accum": 4}, x64=True))
  for s, l in tu.losses(one).items():
    np.testing.assert_allclose(tu.losses(four)[s], l, rtol=1e-10)
