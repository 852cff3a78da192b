"""The trainer runs that tests of several modules read: made once per session."""

import os

import pytest

from tests.train import trainer_util as tu


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """One uninterrupted float32 run on one device (12 steps, a checkpoint every 2, an evaluation every 4, a sample at
  the end): the run every interrupted run must reproduce, and a workdir holding a real run's checkpoints. Read-only:
  tests that change a workdir copy it first."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = tu.run(workdir, {"train.steps": 12, "train.sample_tokens": 16, "train.sample_temperature": 0.8})
  with open(os.path.join(workdir, "stdout.txt"), "w") as f:
    f.write(proc.stdout)
  return workdir
