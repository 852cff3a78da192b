"""prepare_data: txt / jsonl / parquet inputs, manifest fields, checksums, splits."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from data_testutil import stdlib_texts

from mmfree_jax.data import prepare, sources
from mmfree_jax.data.tokenizers import load_tokenizer


def _write_inputs(d, kind: str, texts: list[str]) -> str:
  if kind == "txt":
    for i, t in enumerate(texts):
      (d / f"doc{i:03d}.txt").write_text(t)
    return str(d / "*.txt")
  if kind == "jsonl":
    with open(d / "docs.jsonl", "w") as f:
      for t in texts:
        f.write(json.dumps({"body": t, "id": 0}) + "\n")
    return str(d / "docs.jsonl")
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), d / "docs.parquet")
  return str(d / "docs.parquet")


def _stored_docs(out: str, split: str) -> list[np.ndarray]:
  corpus = sources.ShardCorpus(out, split)
  return [corpus.gather(np.arange(s, s + n)) for s, n in zip(corpus.doc_starts, corpus.doc_lens)]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_prepare_inputs(tmp_path, sp_model, kind):
  texts = stdlib_texts(24, max_chars=400)
  pattern = _write_inputs(tmp_path, kind, texts)
  out = str(tmp_path / "out")
  m = prepare.prepare(pattern, sp_model, out, text_field="body", heldout_fraction=0.25,
                      shard_tokens=1500, progress=False)
  tok = load_tokenizer(sp_model)
  assert (m["vocab_size"], m["bos_id"], m["eos_id"]) == (100, tok.bos_id, tok.eos_id)
  assert m["num_docs"] == len(texts)
  assert m["splits"]["heldout"]["num_docs"] > 0 and m["splits"]["train"]["num_docs"] > 0
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f) == m

  docs = _stored_docs(out, "train") + _stored_docs(out, "heldout")
  assert sum(len(d) for d in docs) == m["num_tokens"]
  assert max(int(d.max()) for d in docs) == m["max_token_id"] < m["vocab_size"]
  for d in docs:
    assert d[0] == tok.bos_id and d[-1] == tok.eos_id
  # Every input document is stored exactly once, tokenized as the tokenizer does it.
  expected = sorted(tuple([tok.bos_id] + tok.encode(t) + [tok.eos_id]) for t in texts)
  assert sorted(tuple(d.tolist()) for d in docs) == expected

  assert len(m["shards"]) > 2
  for s in m["shards"]:
    for key, name in (("sha256", s["tokens"]), ("index_sha256", s["index"])):
      with open(os.path.join(out, name), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == s[key]
    assert os.path.getsize(os.path.join(out, s["tokens"])) == 2 * s["num_tokens"]


def test_split_is_stable(tmp_path):
  texts = stdlib_texts(40, max_chars=300)
  a = _write_inputs(tmp_path, "jsonl", texts)
  m1 = prepare.prepare(a, "byte", str(tmp_path / "o1"), text_field="body",
                       heldout_fraction=0.3, progress=False)
  (tmp_path / "rev").mkdir()
  b = _write_inputs(tmp_path / "rev", "jsonl", texts[::-1])
  m2 = prepare.prepare(b, "byte", str(tmp_path / "o2"), text_field="body",
                       heldout_fraction=0.3, progress=False)
  assert m1["splits"] == m2["splits"]
  held1 = sorted(tuple(d.tolist()) for d in _stored_docs(str(tmp_path / "o1"), "heldout"))
  held2 = sorted(tuple(d.tolist()) for d in _stored_docs(str(tmp_path / "o2"), "heldout"))
  assert held1 == held2


def test_txt_doc_modes_and_errors(tmp_path):
  (tmp_path / "a.txt").write_text("one\ntwo\n\nthree\n")
  assert list(prepare.iter_documents(str(tmp_path / "a.txt"), txt_doc="paragraph")) == [
      "one\ntwo", "three\n"]
  assert list(prepare.iter_documents(str(tmp_path / "a.txt"), txt_doc="line")) == [
      "one", "two", "", "three"]
  (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"content": "y"}\n')
  with pytest.raises(ValueError, match="text_field"):
    prepare.prepare(str(tmp_path / "b.jsonl"), "byte", str(tmp_path / "o"), progress=False)
  with pytest.raises(FileNotFoundError):
    prepare.expand_inputs(str(tmp_path / "missing*.txt"))
