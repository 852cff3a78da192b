"""The grain pipeline: determinism, process slices, packing correctness, exact resumption."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from data_testutil import data_cfg

from mmfree_jax.data import pipeline, sources

SEQ = 64


def _take(it, n: int) -> list[dict]:
  return list(itertools.islice(it, n))


def _equal(a: list[dict], b: list[dict]) -> bool:
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _train(cfg, *, gb=8, seed=0, pi=0, pc=1):
  return pipeline.make_train_iterator(cfg, global_batch=gb, seq_len=SEQ, seed=seed,
                                      process_index=pi, process_count=pc)


@pytest.fixture(params=["embedded", "shards"])
def cfg(request, byte_shards):
  return data_cfg() if request.param == "embedded" else data_cfg("shards", byte_shards)


def test_shapes_and_dtypes(cfg):
  b = next(_train(cfg, gb=8, pc=2))
  assert set(b) == {"inputs", "targets", "segment_ids", "positions", "weights"}
  for k, v in b.items():
    assert v.shape == (4, SEQ)
    assert v.dtype == (np.float32 if k == "weights" else np.int32)


def test_deterministic_given_seed(cfg):
  a = _take(_train(cfg, seed=3), 5)
  assert _equal(a, _take(_train(cfg, seed=3), 5))
  assert not _equal(a, _take(_train(cfg, seed=4), 5))
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.shuffle_seed = 1
  assert not _equal(a, _take(_train(cfg2, seed=3), 5))


def test_process_slices_disjoint_and_complete(cfg):
  whole = _take(_train(cfg, gb=8, pc=1), 4)
  parts = [_take(_train(cfg, gb=8, pi=p, pc=4), 4) for p in range(4)]
  for step in range(4):
    for k in whole[step]:
      assert np.array_equal(np.concatenate([parts[p][step][k] for p in range(4)]),
                            whole[step][k])
  rows = {r.tobytes() for p in parts for b in p for r in b["inputs"]}
  assert len(rows) == 4 * 8  # no row is served twice


def test_bad_batch():
  with pytest.raises(ValueError, match="multiple of process_count"):
    _train(data_cfg(), gb=6, pc=4)
  with pytest.raises(ValueError, match="process_index"):
    _train(data_cfg(), gb=8, pi=2, pc=2)


def _expected_row(corpus, order, row: int):
  """The reference packing of one row, document by document, in plain Python."""
  stream, doc_of = [], []
  for j, d in enumerate(order):
    s, n = int(corpus.doc_starts[d]), int(corpus.doc_lens[d])
    stream += corpus.gather(np.arange(s, s + n)).tolist()
    doc_of += [j] * n
    if len(stream) > (row + 1) * SEQ:
      break
  lo = row * SEQ
  win, docs = stream[lo:lo + SEQ + 1], doc_of[lo:lo + SEQ + 1]
  seg, pos = [], []
  for i in range(SEQ):
    if i == 0 or docs[i] != docs[i - 1]:
      seg.append(1 if i == 0 else seg[-1] + 1)
      pos.append(0)
    else:
      seg.append(seg[-1])
      pos.append(pos[-1] + 1)
  return {"inputs": win[:-1], "targets": win[1:], "segment_ids": seg, "positions": pos,
          "weights": [float(docs[i] == docs[i + 1]) for i in range(SEQ)]}


def test_packing_matches_reference(byte_shards):
  cfg = data_cfg("shards", byte_shards)
  rows = pipeline.PackedRows(cfg, "train", seq_len=SEQ, seed=5)
  order, _ = rows._epoch(0)  # pylint: disable=protected-access
  assert not np.array_equal(order, np.sort(order))  # documents are shuffled
  assert not np.array_equal(order, rows._epoch(1)[0])  # and reshuffled each epoch
  corpus = sources.ShardCorpus(byte_shards, "train")
  picks = [0, 1, 2, 7, rows.rows_per_epoch - 1]
  got = rows.rows(np.array(picks))
  for i, r in enumerate(picks):
    want = _expected_row(corpus, order, r)
    for k, v in want.items():
      np.testing.assert_array_equal(got[k][i], np.asarray(v), err_msg=f"row {r} {k}")
  # Invariants on whole batches: bos starts every segment that begins in a row, targets are the
  # next token, weights exclude exactly the document ends.
  b = next(_train(cfg, gb=16))
  assert np.array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
  starts = (b["positions"] == 0)[:, 1:]
  assert np.all(b["inputs"][:, 1:][starts] == 1)
  assert np.array_equal(b["weights"] == 0, b["inputs"] == 2)
  assert b["segment_ids"].min() == 1


def test_epochs_cover_every_row(byte_shards):
  cfg = data_cfg("shards", byte_shards)
  rows = pipeline.PackedRows(cfg, "train", seq_len=SEQ, seed=0)
  n = rows.rows_per_epoch
  epoch0 = rows.rows(np.arange(n))["inputs"]
  total = sources.ShardCorpus(byte_shards, "train").num_tokens
  assert n == (total - 1) // SEQ
  tokens = np.bincount(epoch0.ravel(), minlength=259)
  corpus_counts = np.bincount(
      sources.ShardCorpus(byte_shards, "train").gather(np.arange(total)), minlength=259)
  assert np.all(tokens <= corpus_counts) and corpus_counts.sum() - tokens.sum() <= SEQ + 1
  wrapped = rows.rows(np.arange(n - 2, n + 2))  # crosses into epoch 1
  assert np.array_equal(wrapped["inputs"][:2], epoch0[-2:])
  assert not np.array_equal(wrapped["inputs"][2:], epoch0[:2])


def test_state_round_trip(cfg):
  it1 = _train(cfg, seed=1)
  _take(it1, 3)
  state = it1.get_state()
  it2 = _train(cfg, seed=1)
  it2.set_state(state)
  assert _equal(_take(it1, 4), _take(it2, 4))
  it3 = _train(cfg, seed=1)
  _take(it3, 9)
  it3.set_state(state)  # rewinding works too
  assert _equal(_take(it3, 2), _take(_train(cfg, seed=1), 5)[3:])


def test_eval_batches(cfg):
  kw = dict(global_batch=4, seq_len=SEQ, num_batches=3, process_index=0, process_count=1)
  a = pipeline.make_eval_batches(cfg, **kw)
  assert len(a) == 3 and _equal(a, pipeline.make_eval_batches(cfg, **kw))
  halves = [pipeline.make_eval_batches(cfg, **{**kw, "process_index": p, "process_count": 2})
            for p in range(2)]
  assert np.array_equal(np.concatenate([halves[0][1]["inputs"], halves[1][1]["inputs"]]),
                        a[1]["inputs"])
  train_rows = {r.tobytes() for b in _take(_train(cfg, gb=32), 4) for r in b["inputs"]}
  assert not any(r.tobytes() in train_rows for b in a for r in b["inputs"])


@pytest.mark.slow
def test_multiprocess_workers(byte_shards):
  cfg = data_cfg("shards", byte_shards)
  want = _take(_train(cfg, seed=2), 3)
  cfg.num_workers = 1
  it = _train(cfg, seed=2)
  try:
    assert _equal(_take(it, 3), want)
  finally:
    it.close()
