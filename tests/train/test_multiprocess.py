"""Two processes on 127.0.0.1 (jax.distributed, 4 CPU devices each) train like one process with 8 devices."""

import socket

import numpy as np
import pytest

from tests.train import trainer_util as tu

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  over = {**tu.FLOAT64, "train.steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 4,
          "mesh.data": 2, "mesh.fsdp": 4}
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  port = _free_port()
  # The one-process run and the two processes at once (independent runs; each process exits 0 or this raises).
  outs = tu.run_together(tu.job(single, over, devices=8, x64=True), *[(
      tu.command(multi, {**tu.SMALL, **over}) + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                 f"--process_id={i}"],
      tu.env(devices=4, x64=True, cache=False)) for i in range(2)])
  assert "8 devices" in outs[1]
  ls, lm = tu.losses(single), tu.losses(multi)
  assert ls.keys() == lm.keys() == {1, 2, 3, 4}
  for s in ls:
    np.testing.assert_allclose(lm[s], ls[s], rtol=1e-10)
  np.testing.assert_allclose(tu.eval_losses(multi)[4], tu.eval_losses(single)[4], rtol=1e-10)
  pa, pb = tu.final_params(single), tu.final_params(multi)
  for k in pa:
    np.testing.assert_allclose(pb[k], pa[k], rtol=1e-9, atol=1e-12, err_msg=k)
