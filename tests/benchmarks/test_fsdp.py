"""benchmarks.fsdp's bookkeeping: the devices each run sees, the metrics it reads, and the comparison."""

import json

import pytest

from benchmarks import fsdp


def test_device_env_on_the_cpu_sets_the_host_device_count(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x")
  env = fsdp.device_env(2)
  assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=2"]
  assert fsdp.REPO in env["PYTHONPATH"].split(":")


def test_read_losses_takes_train_rows_and_the_last_eval(tmp_path):
  rows = [{"step": 1, "loss": 5.0, "grad_norm": 1.0}, {"step": 2, "loss": 4.5}, {"step": 2, "eval_loss": 4.8},
          {"step": 3, "loss": 4.0}, {"step": 3, "eval_loss": 4.2}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  losses, eval_loss = fsdp.read_losses(str(tmp_path))
  assert losses == {1: 5.0, 2: 4.5, 3: 4.0} and eval_loss == 4.2


def test_compare_over_shared_steps_and_the_verdict():
  ref = {1: 5.0, 2: 4.0, 3: 3.0}
  other = {1: 5.0, 2: 4.5, 3: 2.9, 4: 1.0}  # step 4 is not in the reference: ignored
  c = fsdp.compare(ref, other)
  assert c["steps"] == 3 and c["max_abs"] == pytest.approx(0.5) and c["max_at_step"] == 2
  assert c["mean_abs"] == pytest.approx(0.6 / 3) and c["max_rel"] == pytest.approx(0.5 / 4.0)
  assert fsdp.verdict(c, {"max_abs": 0.25})
  assert not fsdp.verdict(c, {"max_abs": 0.2})
  with pytest.raises(ValueError, match="no logged step"):
    fsdp.compare(ref, {7: 1.0})


@pytest.mark.slow
def test_losses_stage_end_to_end_on_two_cpu_devices(tmp_path):
  """The real trainer three times (one device, FSDP over two, one device with two micro-batches), compared."""
  small = [f"--config.{k}={v}" for k, v in {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
                                             "data.seq_len": 32}.items()]
  r = fsdp.losses("experiments/configs/tiny.py", 2, steps=4, batch=4, warmup=2, overrides=small)
  assert set(r["losses"]) == {"one", "fsdp", "one_accum2"} and all(len(v) == 4 for v in r["losses"].values())
  # float32 on the CPU: the three runs are the same computation up to summation order.
  assert r["fsdp_vs_one"]["max_abs"] < 1e-3 and r["accum2_vs_one"]["max_abs"] < 1e-3
  assert r["first_loss"] > r["last_loss"]
