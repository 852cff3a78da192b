"""Bad input ends in a one-line error naming the problem and the fix, before compiling, with the workdir untouched."""

import json
import os
import shutil
import subprocess

import pytest

from experiments.configs import tiny
from mmfree_jax.data import prepare
from mmfree_jax.train.checkpoint import Checkpointer
from mmfree_jax.train.trainer import train
from tests.train import trainer_util as tu


def _config(**overrides):
  c = tiny.get_config()
  for key, value in {**tu.SMALL, **overrides}.items():
    group, field = key.split(".")
    c[group][field] = value
  return c


def _shards(tmp_path):
  src = tmp_path / "text.txt"
  src.write_text("\n\n".join(f"document {i}: " + "some text " * 40 for i in range(40)))
  out = str(tmp_path / "shards")
  prepare.prepare([str(src)], "byte", out, heldout_fraction=0.2, txt_doc="paragraph", progress=False)
  return out


@pytest.mark.parametrize("overrides,match", [
    ({"mesh.data": 3}, "needs 3 devices but 8"),
    ({"train.global_batch": 12}, "not divisible by the data-parallel size"),
    ({"train.grad_accum": 3}, "not divisible by train.grad_accum"),
    ({"model.vocab_size": 100}, "vocab_size"),
    ({"model.scan_impl": "parallel"}, "model.scan_impl"),
    ({"data.source": "shards", "data.path": "/nonexistent/data"}, "does not exist"),
    ({"data.source": "shards", "data.path": ""}, "data.path is empty"),
    ({"train.on_nonfinite": "ignore"}, "train.on_nonfinite"),
])
def test_config_errors(tmp_path, overrides, match):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match) as e:
    train(_config(**overrides), str(workdir))
  assert "\n" not in str(e.value)
  assert not workdir.exists()


def test_empty_and_corrupt_data(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="manifest.json is missing"):
    train(_config(**{"data.source": "shards", "data.path": str(empty)}), str(tmp_path / "run"))
  shards = _shards(tmp_path)
  manifest = json.load(open(os.path.join(shards, "manifest.json")))
  victim = os.path.join(shards, manifest["shards"][0]["tokens"])
  with open(victim, "r+b") as f:
    f.seek(10)
    f.write(b"\xff\xff")
  with pytest.raises(ValueError, match="checksum|corrupt") as e:
    train(_config(**{"data.source": "shards", "data.path": shards}), str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_workdir_of_a_different_model(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)  # a real run's workdir (tests/train/conftest.py): tu.SMALL's model, trained
  before = open(os.path.join(workdir, "config.json")).read()
  listing = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ValueError, match="different model .*d_model.*new --workdir"):
    train(_config(**{"train.steps": 4, "model.d_model": 48}), workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == listing
  # How the model is computed may change (`model_config.IMPLEMENTATION_FIELDS`): that workdir takes it.
  other_way = _config(**{"model.remat": "full", "model.scan_impl": "sequential", "model.unroll_layers": 2,
                         "model.bitlinear": "pallas_fused", "model.quantize_weights_once": True})
  ckpt = Checkpointer(workdir, other_way.checkpoint)
  ckpt.check_compatible(json.loads(other_way.to_json_best_effort()))
  ckpt.close()


@pytest.mark.parametrize("flag,match", [
    ("--config.train.stepz=5", "stepz"),
    ("--config.train.steps=many", "steps"),
])
def test_command_line_errors(tmp_path, flag, match):
  cmd = tu.command(str(tmp_path / "run"), {})[:-0 or None] + [flag]
  proc = subprocess.run(cmd, cwd=tu.REPO, env=tu.env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert match in proc.stderr
  assert not (tmp_path / "run").exists()
