"""The grain input pipeline: shuffled, packed, per-process batches of token rows.

Shuffle and packing. For training epoch `e`, the documents of the train split are permuted by a
generator seeded with `(seed, data.shuffle_seed, e)` and concatenated into one stream; row `r` of the
epoch is the window of `seq_len + 1` tokens starting at `r * seq_len` (consecutive rows overlap by one
token, so every input has its next token as target). Each row packs several documents, and long
documents are split across rows. The last partial row of an epoch is dropped; epochs follow each other
without a seam (`global row = step * global_batch + i`, `epoch = global row // rows per epoch`).

Per-row fields: `inputs = window[:-1]`, `targets = window[1:]`; `segment_ids` numbers the documents
that appear in the row 1, 2, 3, ...; `positions` count from 0 at each segment's first token in the row
(a document continuing from the previous row restarts at 0, so positions stay below seq_len);
`weights` is 1 where the target belongs to the same document as the input (so the eos -> next bos
transition is never trained), else 0. Rows are always full, so segment id 0 (padding) does not occur
from this packer; consumers must still treat it as padding.

Sharding. Global step `t` is the global rows `[t * global_batch, (t + 1) * global_batch)`; process
`p` computes and reads only rows `p * B ... (p + 1) * B - 1` of them (`B = global_batch //
process_count`), so slices are disjoint and complete. A batch is a pure function of (data, config,
seed, step, process), computed by vectorized numpy (searchsorted + one gather), which keeps the
loader far above the model's consumption rate. Grain (`MapDataset.to_iter_dataset`) supplies
threaded prefetch and the checkpointable iterator: its state is the next step index, so
`set_state(get_state())` resumes exactly.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np

from mmfree_jax.data import sources
from mmfree_jax.data.tokenizers import ByteTokenizer

SOURCES = ("embedded", "shards")
_FIELDS = ("inputs", "targets", "segment_ids", "positions", "weights")


def _corpus(data_cfg: ml_collections.ConfigDict, split: str) -> sources.TokenCorpus:
  if data_cfg.source == "embedded":
    return sources.embedded_corpus(split, float(data_cfg.heldout_fraction))
  if data_cfg.source == "shards":
    return sources.ShardCorpus(data_cfg.path, split)
  raise ValueError(f"unknown data.source {data_cfg.source!r}; use one of {SOURCES}")


class PackedRows:
  """Rows of the (per-epoch shuffled) concatenated document stream of one corpus.

  Holds a corpus description, not open files: pickles cheaply for grain worker processes.
  """

  def __init__(self, data_cfg: ml_collections.ConfigDict, split: str, *, seq_len: int,
               seed: int | None):
    self._cfg = {k: data_cfg[k] for k in ("source", "path", "heldout_fraction")}
    self.split, self.seq_len = split, int(seq_len)
    self.seed = None if seed is None else (int(seed), int(data_cfg.shuffle_seed))
    corpus = self.corpus
    total = corpus.num_tokens
    self.rows_per_epoch = (total - 1) // self.seq_len if total else 0
    if self.rows_per_epoch < 1:
      raise ValueError(f"the {split} split holds {total} tokens, fewer than seq_len + 1 = "
                       f"{self.seq_len + 1}; lower data.seq_len or add data")
    self._lock = threading.Lock()
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state["_lock"], state["_epochs"]
    state.pop("_corpus", None)
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._epochs = {}

  @property
  def corpus(self) -> sources.TokenCorpus:
    if "_corpus" not in self.__dict__:
      self._corpus = _corpus(ml_collections.ConfigDict(self._cfg), self.split)
    return self._corpus

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(document order, stream offset of each document in that order + total) of one epoch."""
    with self._lock:
      if epoch not in self._epochs:
        lens = self.corpus.doc_lens
        if self.seed is None:
          order = np.arange(lens.shape[0], dtype=np.int64)
        else:
          rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
              [*self.seed, epoch])))
          order = rng.permutation(lens.shape[0]).astype(np.int64)
        cum = np.zeros(order.shape[0] + 1, np.int64)
        np.cumsum(lens[order], out=cum[1:])
        if len(self._epochs) >= 2:
          self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = (order, cum)
      return self._epochs[epoch]

  def rows(self, global_rows: np.ndarray) -> dict[str, np.ndarray]:
    """The packed rows with these global indices (epochs wrap), as the batch fields."""
    global_rows = np.asarray(global_rows, np.int64)
    n, L = global_rows.shape[0], self.seq_len
    epochs, rows = np.divmod(global_rows, self.rows_per_epoch)
    out = {k: np.empty((n, L), np.float32 if k == "weights" else np.int32) for k in _FIELDS}
    for e in np.unique(epochs):
      sel = epochs == e
      fields = self._pack(int(e), rows[sel])
      for k in _FIELDS:
        out[k][sel] = fields[k]
    return out

  def _pack(self, epoch: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    order, cum = self._epoch(epoch)
    L = self.seq_len
    row_start = rows * L
    pos = row_start[:, None] + np.arange(L + 1, dtype=np.int64)[None, :]  # [n, L+1] stream positions
    k = np.searchsorted(cum, pos, side="right") - 1  # index into the epoch's document order
    doc_start = cum[k]
    tokens = self.corpus.gather(self.corpus.doc_starts[order[k]] + (pos - doc_start))
    k_in = k[:, :L]
    return {
        "inputs": tokens[:, :L],
        "targets": tokens[:, 1:],
        "segment_ids": (k_in - k_in[:, :1] + 1).astype(np.int32),
        "positions": (pos[:, :L] - np.maximum(doc_start[:, :L], row_start[:, None])).astype(
            np.int32),
        "weights": (k[:, 1:] == k_in).astype(np.float32),
    }


class _StepBatches(grain.MapDataset):
  """Step t -> this process's slice of global batch t. Length: `num_steps` (or unbounded)."""

  def __init__(self, rows: PackedRows, *, global_batch: int, process_index: int,
               process_count: int, num_steps: int | None = None):
    super().__init__()
    self._rows = rows
    self._global_batch = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._len = sys.maxsize if num_steps is None else num_steps

  def __len__(self) -> int:
    return self._len

  def __str__(self) -> str:
    return f"PackedBatches(split={self._rows.split}, seq_len={self._rows.seq_len})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    first = int(index) * self._global_batch + self._offset
    return self._rows.rows(np.arange(first, first + self._local, dtype=np.int64))


def _check_batch(global_batch: int, process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f"global_batch {global_batch} must be a positive multiple of process_count "
                     f"{process_count}; change train.global_batch")


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, global_batch: int, seq_len: int,
                        seed: int, process_index: int, process_count: int
                        ) -> grain.DatasetIterator:
  """An endless, checkpointable iterator over this process's slices of the training batches.

  Each element: {inputs, targets, segment_ids, positions: int32, weights: float32}, each of shape
  [global_batch // process_count, seq_len]. `get_state()` / `set_state()` resume exactly.
  """
  _check_batch(global_batch, process_index, process_count)
  rows = PackedRows(data_cfg, "train", seq_len=seq_len, seed=seed)
  ds = _StepBatches(rows, global_batch=global_batch, process_index=process_index,
                    process_count=process_count)
  prefetch = int(data_cfg.get("prefetch", 2))
  threads = min(prefetch, os.cpu_count() or 1) if prefetch > 0 else 0
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                               prefetch_buffer_size=max(prefetch, 1)))
  workers = int(data_cfg.get("num_workers", 0))
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults suffice)
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
  return iter(it_ds)


def make_eval_batches(data_cfg: ml_collections.ConfigDict, *, global_batch: int, seq_len: int,
                      num_batches: int, process_index: int, process_count: int
                      ) -> list[dict[str, Any]]:
  """The first `num_batches` batches of the held-out stream, unshuffled: the same on every call.

  The held-out stream wraps around when it holds fewer than `num_batches * global_batch` rows.
  """
  _check_batch(global_batch, process_index, process_count)
  rows = PackedRows(data_cfg, "heldout", seq_len=seq_len, seed=None)
  ds = _StepBatches(rows, global_batch=global_batch, process_index=process_index,
                    process_count=process_count, num_steps=num_batches)
  return [ds[i] for i in range(num_batches)]


def data_vocab_size(data_cfg: ml_collections.ConfigDict) -> int:
  """259 for the embedded byte-level corpus; the manifest's vocab_size for shards."""
  if data_cfg.source == "embedded":
    return ByteTokenizer().vocab_size
  if data_cfg.source == "shards":
    return int(sources.read_manifest(data_cfg.path)["vocab_size"])
  raise ValueError(f"unknown data.source {data_cfg.source!r}; use one of {SOURCES}")


def validate(data_cfg: ml_collections.ConfigDict, *, model_vocab_size: int,
             verify_checksums: bool = True) -> None:
  """Check that the configured data exists, is intact and fits the model; ValueError if not.

  Each error message is one line that says how to fix it. `verify_checksums=False` skips the
  sha256 pass over the shards (sizes and indexes are still checked).
  """
  source = data_cfg.get("source", None)
  if source == "embedded":
    need = ByteTokenizer().vocab_size
    if model_vocab_size < need:
      raise ValueError(f"the embedded corpus is byte-level (ids < {need}) but model.vocab_size is "
                       f"{model_vocab_size}; set model.vocab_size >= {need}")
    train, heldout = sources.stdlib_files(float(data_cfg.heldout_fraction))
    if not train or not heldout:
      raise ValueError(f"the embedded corpus split is empty (train {len(train)} files, held-out "
                       f"{len(heldout)}); set data.heldout_fraction to e.g. 0.02")
    return
  if source != "shards":
    raise ValueError(f"unknown data.source {source!r}; set data.source to one of {SOURCES}")
  manifest = sources.check_shards(data_cfg.path, verify_checksums=verify_checksums)
  if manifest["max_token_id"] >= model_vocab_size:
    raise ValueError(f"{data_cfg.path}: token ids reach {manifest['max_token_id']} but "
                     f"model.vocab_size is {model_vocab_size}; set model.vocab_size >= "
                     f"{manifest['max_token_id'] + 1} (the tokenizer's is {manifest['vocab_size']})")
