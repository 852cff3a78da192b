"""validate(): one-line, actionable errors for every way the data can be unusable."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from data_testutil import data_cfg

from mmfree_jax.data import pipeline


@pytest.fixture
def shards(tmp_path, byte_shards) -> str:
  """A private copy of the byte shards that a test may damage."""
  return shutil.copytree(byte_shards, tmp_path / "copy").as_posix()


def _check(cfg, match: str, vocab: int = 259) -> None:
  with pytest.raises(ValueError, match=match) as e:
    pipeline.validate(cfg, model_vocab_size=vocab)
  assert "\n" not in str(e.value)


def test_valid(byte_shards):
  pipeline.validate(data_cfg("shards", byte_shards), model_vocab_size=259)
  pipeline.validate(data_cfg(), model_vocab_size=259)
  assert pipeline.data_vocab_size(data_cfg("shards", byte_shards)) == 259
  assert pipeline.data_vocab_size(data_cfg()) == 259


def test_unknown_source():
  _check(data_cfg("s3"), "unknown data.source")


def test_missing(tmp_path):
  _check(data_cfg("shards", ""), "data.path is empty")
  _check(data_cfg("shards", str(tmp_path / "nope")), "does not exist")
  _check(data_cfg("shards", str(tmp_path)), "manifest.json is missing")


def test_empty(tmp_path):
  (tmp_path / "e.txt").write_text("")
  (tmp_path / "f.txt").write_text("only held out")
  from mmfree_jax.data import prepare  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="no non-empty documents"):
    prepare.prepare(str(tmp_path / "e.txt"), "byte", str(tmp_path / "o"), progress=False)
  prepare.prepare(str(tmp_path / "f.txt"), "byte", str(tmp_path / "o"), heldout_fraction=0.999999,
                  progress=False)
  _check(data_cfg("shards", str(tmp_path / "o")), "no training tokens")


def test_corrupt(shards):
  with open(os.path.join(shards, "train-00000.bin"), "r+b") as f:
    f.seek(10)
    f.write(b"\x07\x00")
  _check(data_cfg("shards", shards), "checksum mismatch")
  pipeline.validate(data_cfg("shards", shards), model_vocab_size=259, verify_checksums=False)


def test_truncated_and_missing_shard(shards):
  with open(os.path.join(shards, "train-00001.bin"), "r+b") as f:
    f.truncate(100)
  _check(data_cfg("shards", shards), "truncated or corrupt")
  os.remove(os.path.join(shards, "train-00001.bin"))
  _check(data_cfg("shards", shards), "is missing")


def test_unreadable_manifest(shards):
  with open(os.path.join(shards, "manifest.json"), "w") as f:
    f.write("{not json")
  _check(data_cfg("shards", shards), "unreadable or corrupt")
  with open(os.path.join(shards, "manifest.json"), "w") as f:
    json.dump({"format": "mmfree_jax.tokens.v1"}, f)
  _check(data_cfg("shards", shards), "unreadable or corrupt")


def test_out_of_vocab(byte_shards):
  with open(os.path.join(byte_shards, "manifest.json")) as f:
    max_id = json.load(f)["max_token_id"]
  pipeline.validate(data_cfg("shards", byte_shards), model_vocab_size=max_id + 1)
  _check(data_cfg("shards", byte_shards), f"model.vocab_size >= {max_id + 1}", vocab=max_id)
  _check(data_cfg(), "model.vocab_size >= 259", vocab=128)
