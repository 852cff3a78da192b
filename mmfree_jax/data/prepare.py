"""Tokenize local text files into the flat token shards that the data pipeline reads.

Inputs: `.txt` (one document per file, or per line / per blank-line paragraph with `txt_doc`),
`.jsonl` (one JSON object per line, text in `text_field`) and `.parquet` (column `text_field`, read
with pyarrow); `.txt.gz` / `.jsonl.gz` too.

Output format: flat token files plus a document index, not ArrayRecord. The loader's unit of work is
"tokens [a, b) of the shuffled stream", which spans document boundaries; with a flat memory-mapped
file that is one vectorized numpy gather (no per-record deserialization, no Python loop over
documents, no copy beyond the gathered tokens) and random access is free, which is what makes the
loader run at many millions of tokens/s per process. ArrayRecord would add a record lookup and a
bytes->array decode per document on the hot path and buy nothing here: the shards are written once,
read-only, and checked by sha256.

Layout of `out/`:
  <split>-NNNNN.bin       raw little-endian uint16 (vocab <= 65536) or uint32 token ids; every
                          document stored framed as `[bos] + tokens + [eos]`
  <split>-NNNNN.idx.npy   int64 end offset (exclusive, in tokens) of each document in that shard
  manifest.json           see `prepare`; written last, so a directory without it is incomplete

Splits: "train" and "heldout". A document goes to held-out when a stable hash (BLAKE2b) of its text
falls below `heldout_fraction`: independent of file order and layout, and exact duplicates always
land in the same split.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import time
from typing import Iterator, Sequence

import numpy as np

from mmfree_jax.data import sources
from mmfree_jax.data.tokenizers import Tokenizer, load_tokenizer

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
TXT_DOC_MODES = ("file", "line", "paragraph")
DEFAULT_SHARD_TOKENS = 1 << 28


def expand_inputs(spec: str | Sequence[str]) -> list[str]:
  """Files named by comma-separated globs, files or directories (searched recursively), sorted."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  found: set[str] = set()
  for item in (i.strip() for i in items):
    if not item:
      continue
    matches = glob.glob(item, recursive=True) or ([item] if os.path.exists(item) else [])
    if not matches:
      raise FileNotFoundError(f"no input matches {item!r}")
    for m in matches:
      if os.path.isdir(m):
        for d, _, files in os.walk(m):
          found.update(os.path.join(d, f) for f in files if f.endswith(SUFFIXES))
      elif m.endswith(SUFFIXES):
        found.add(m)
      else:
        raise ValueError(f"{m}: unsupported input type; expected one of {SUFFIXES}")
  if not found:
    raise FileNotFoundError(f"no {SUFFIXES} files in {spec!r}")
  return sorted(found)


def _open_text(path: str):
  return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(
      path, encoding="utf-8")


def iter_documents(path: str, *, text_field: str = "text", txt_doc: str = "file") -> Iterator[str]:
  """The document texts of one input file, in file order."""
  if path.endswith(TEXT_SUFFIXES):
    if txt_doc not in TXT_DOC_MODES:
      raise ValueError(f"txt_doc must be one of {TXT_DOC_MODES}, got {txt_doc!r}")
    with _open_text(path) as f:
      if txt_doc == "line":
        yield from (line.rstrip("\n") for line in f)
        return
      text = f.read()
    yield from ([text] if txt_doc == "file" else text.split("\n\n"))
  elif path.endswith(JSONL_SUFFIXES):
    with _open_text(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          text = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{path}:{n}: no string field {text_field!r} ({e!r}); "
                           "set --text_field") from e
        yield text
  elif path.endswith(PARQUET_SUFFIXES):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
      raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                       "set --text_field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
      yield from (t for t in batch.column(0).to_pylist() if t is not None)
  else:
    raise ValueError(f"{path}: unsupported input type; expected one of {SUFFIXES}")


class _ShardWriter:
  """Appends framed documents of one split to `<split>-NNNNN.bin`, rolling over at a token budget."""

  def __init__(self, out: str, split: str, dtype: np.dtype, shard_tokens: int):
    self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
    self.shards: list[dict] = []
    self._file = None
    self._ends: list[int] = []
    self._n = 0

  def write(self, framed: Sequence[np.ndarray]) -> None:
    for doc in framed:
      if self._file is None:
        name = f"{self.split}-{len(self.shards):05d}"
        self._name = name
        self._file = open(os.path.join(self.out, name + ".bin"), "wb")
        self._ends, self._n = [], 0
      self._file.write(doc.astype(self.dtype).tobytes())
      self._n += doc.shape[0]
      self._ends.append(self._n)
      if self._n >= self.shard_tokens:
        self._finish()

  def _finish(self) -> None:
    self._file.close()
    self._file = None
    index = self._name + ".idx.npy"
    np.save(os.path.join(self.out, index), np.array(self._ends, np.int64))
    tokens = self._name + ".bin"
    self.shards.append({
        "split": self.split, "tokens": tokens, "index": index,
        "num_tokens": self._n, "num_docs": len(self._ends),
        "sha256": sources.file_sha256(os.path.join(self.out, tokens)),
        "index_sha256": sources.file_sha256(os.path.join(self.out, index)),
    })

  def close(self) -> list[dict]:
    if self._file is not None:
      self._finish()
    return self.shards


class TokenShardWriter:
  """Writes framed documents (`[bos] + tokens + [eos]`) of both splits, then `manifest.json`.

  Used by `prepare` and by anything that produces token ids itself (e.g. synthetic benchmarks).
  """

  def __init__(self, out: str, *, tokenizer: str, vocab_size: int, bos_id: int, eos_id: int,
               pad_id: int, shard_tokens: int = DEFAULT_SHARD_TOKENS):
    self.out = out
    self.info = {"tokenizer": tokenizer, "vocab_size": int(vocab_size), "bos_id": int(bos_id),
                 "eos_id": int(eos_id), "pad_id": int(pad_id)}
    self.dtype = np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")
    os.makedirs(out, exist_ok=True)
    self.mpath = os.path.join(out, sources.MANIFEST)
    if os.path.exists(self.mpath):
      os.remove(self.mpath)
    self.writers = {s: _ShardWriter(out, s, self.dtype, shard_tokens) for s in sources.SPLITS}
    self.num_docs = self.num_tokens = 0
    self.max_id = -1

  def add(self, split: str, doc: np.ndarray) -> None:
    """Append one framed document to `split` ("train" | "heldout")."""
    self.writers[split].write([doc])
    self.num_docs += 1
    self.num_tokens += int(doc.shape[0])
    self.max_id = max(self.max_id, int(doc.max()))

  def close(self, **fields) -> dict:
    """Finish the shards, write and return the manifest (`fields` are recorded as given)."""
    if self.num_docs == 0:
      raise ValueError(f"no documents were written to {self.out}")
    if self.max_id >= self.info["vocab_size"]:
      raise ValueError(f"token id {self.max_id} >= vocab_size {self.info['vocab_size']}")
    shards = [x for split in sources.SPLITS for x in self.writers[split].close()]
    manifest = {
        "format": sources.FORMAT, **self.info, "dtype": self.dtype.str,
        "num_tokens": self.num_tokens, "num_docs": self.num_docs, "max_token_id": self.max_id,
        **fields,
        "splits": {s: {"num_tokens": sum(x["num_tokens"] for x in self.writers[s].shards),
                       "num_docs": sum(x["num_docs"] for x in self.writers[s].shards)}
                   for s in sources.SPLITS},
        "shards": shards,
    }
    tmp = self.mpath + ".tmp"
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=1)
    os.replace(tmp, self.mpath)
    return manifest


class _Progress:
  """A one-line progress report on stderr, refreshed at most twice a second."""

  def __init__(self, total_files: int, enabled: bool):
    self.total_files, self.enabled = total_files, enabled
    self.t0 = self.last = time.time()

  def update(self, files: int, docs: int, tokens: int, final: bool = False) -> None:
    now = time.time()
    if not self.enabled or (not final and now - self.last < 0.5):
      return
    self.last = now
    rate = tokens / max(now - self.t0, 1e-9)
    sys.stderr.write(f"\r[prepare_data] files {files}/{self.total_files}  docs {docs:,}  "
                     f"tokens {tokens:,}  {rate / 1e6:.2f}M tok/s" + ("\n" if final else ""))
    sys.stderr.flush()


def prepare(inputs: str | Sequence[str], tokenizer: str, out: str, *, text_field: str = "text",
            heldout_fraction: float = 0.01, txt_doc: str = "file",
            shard_tokens: int = DEFAULT_SHARD_TOKENS, batch_docs: int = 512,
            progress: bool = True) -> dict:
  """Tokenize `inputs` into `out/` and return the manifest (also written to `out/manifest.json`).

  Manifest fields: format, tokenizer (a spec `load_tokenizer` accepts), vocab_size, bos_id, eos_id,
  pad_id, dtype, num_tokens (stored tokens, bos/eos included), num_docs, max_token_id,
  heldout_fraction, text_field, txt_doc, inputs, splits ({split: {num_tokens, num_docs}}) and shards
  (list of {split, tokens, index, num_tokens, num_docs, sha256, index_sha256}).
  """
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
  files = expand_inputs(inputs)
  tok: Tokenizer = load_tokenizer(tokenizer)
  writer = TokenShardWriter(out, tokenizer=tok.spec, vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, shard_tokens=shard_tokens)
  bos, eos = np.array([tok.bos_id], np.int64), np.array([tok.eos_id], np.int64)
  bar = _Progress(len(files), progress)

  def flush(texts: list[str]) -> None:
    for text, ids in zip(texts, tok.encode_batch(texts)):
      held = sources.stable_fraction(text.encode("utf-8")) < heldout_fraction
      writer.add("heldout" if held else "train", np.concatenate([bos, np.asarray(ids, np.int64),
                                                                 eos]))

  for n, path in enumerate(files, 1):
    batch: list[str] = []
    for text in iter_documents(path, text_field=text_field, txt_doc=txt_doc):
      if text:
        batch.append(text)
      if len(batch) >= batch_docs:
        flush(batch)
        batch = []
        bar.update(n - 1, writer.num_docs, writer.num_tokens)
    if batch:
      flush(batch)
    bar.update(n, writer.num_docs, writer.num_tokens)
  bar.update(len(files), writer.num_docs, writer.num_tokens, final=True)
  if writer.num_docs == 0:
    raise ValueError(f"no non-empty documents in {inputs!r}")
  return writer.close(heldout_fraction=heldout_fraction, text_field=text_field, txt_doc=txt_doc,
                      inputs=[os.path.abspath(f) for f in files])
