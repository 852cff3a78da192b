"""Tokenizer wrappers: bytes, SentencePiece, tokenizer.json, and load_tokenizer specs."""

from __future__ import annotations

import json

import pytest

from mmfree_jax.data import prepare
from mmfree_jax.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer,
                                        load_tokenizer)


def test_byte_round_trip():
  tok = ByteTokenizer()
  text = "def f(x):\n  return x  # café ∑ 🙂\n"
  ids = tok.encode(text)
  assert all(3 <= i < 259 for i in ids)
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  assert tok.encode("A") == [ord("A") + 3]
  assert load_tokenizer("byte").vocab_size == 259


def test_sentencepiece(sp_model):
  tok = load_tokenizer(sp_model)
  assert isinstance(tok, SentencePieceTokenizer)
  assert tok.vocab_size == 100
  assert (tok.bos_id, tok.eos_id) == (1, 2)
  text = "return self.decode(s)"
  ids = tok.encode(text)
  assert ids and max(ids) < tok.vocab_size
  assert tok.decode(ids) == text
  assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5}
  t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  t.decoder = tokenizers.decoders.WordPiece()
  path = str(tmp_path / "tokenizer.json")
  t.save(path)
  tok = load_tokenizer(path)
  assert isinstance(tok, HFTokenizer)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (6, 1, 2, 3)
  assert tok.encode("hello world") == [4, 5]
  assert tok.decode([4, 5]) == "hello world"
  assert load_tokenizer(str(tmp_path)).vocab_size == 6  # a directory holding tokenizer.json
  with pytest.raises(ValueError, match="eos_token"):
    HFTokenizer(path, eos_token="<nope>")


def test_load_from_manifest(tmp_path, sp_model):
  src = tmp_path / "a.txt"
  src.write_text("hello there\n")
  prepare.prepare(str(src), sp_model, str(tmp_path / "out"), heldout_fraction=0.0, progress=False)
  tok = load_tokenizer(str(tmp_path / "out"))
  assert tok.vocab_size == 100
  with open(tmp_path / "out" / "manifest.json") as f:
    assert json.load(f)["tokenizer"] == tok.spec


def test_unknown_spec():
  with pytest.raises(ValueError, match="unknown tokenizer"):
    load_tokenizer("gpt2")
