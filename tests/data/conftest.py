"""Shared fixtures of the data tests: a tiny SentencePiece model and small prepared directories."""

from __future__ import annotations

import json

import pytest
from data_testutil import stdlib_texts

from mmfree_jax.data import prepare


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
  """A SentencePiece BPE model with ~100 pieces, trained on a few KB of standard-library text."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("sp")
  lines = "\n".join(stdlib_texts(4)).splitlines()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(d / "tiny"), vocab_size=100,
      model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  return str(d / "tiny.model")


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory) -> str:
  """Byte-tokenized shards of 60 short documents, several train shards, ~20% held out."""
  d = tmp_path_factory.mktemp("byte_shards")
  src = d / "docs.jsonl"
  with open(src, "w") as f:
    for t in stdlib_texts(60, max_chars=600):
      f.write(json.dumps({"text": t}) + "\n")
  prepare.prepare(str(src), "byte", str(d / "out"), heldout_fraction=0.2, shard_tokens=8000,
                  progress=False)
  return str(d / "out")
