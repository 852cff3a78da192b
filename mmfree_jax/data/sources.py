"""Where documents come from: the embedded default corpus and pre-tokenized shards.

Embedded corpus. With `data.source = "embedded"` the training text is the Python standard library's
own `.py` source files, read from the running interpreter's installation
(`sysconfig.get_paths()["stdlib"]`), byte-tokenized (`ByteTokenizer`, vocabulary 259). Why this text:
it is real, varied, human-written text (code, docstrings, comments in prose; ~12 MB over ~700 files
for CPython 3.11), it is present on every machine that runs this package, and it needs no download,
no credentials and no network, so smoke tests, CI and the small scaling runs work anywhere.
Third-party packages (`site-packages`, `dist-packages`) and the test suites (`test`, `tests`,
`idle_test`) are excluded: the former vary per machine, the latter are large and repetitive. Files are
sorted by relative path, and each goes to the held-out split when a stable hash (BLAKE2b) of its
relative path falls below `heldout_fraction`, so the split does not depend on the machine or on
`PYTHONHASHSEED`. The corpus differs slightly between Python versions (files are added, removed and
edited between releases); losses on it are comparable only within one Python minor version.

Shards. `experiments.prepare_data` writes, per split, flat token files (`<split>-NNNNN.bin`, raw
little-endian `uint16` or `uint32`, each document stored framed as `[bos] + tokens + [eos]`) and an
index per shard (`<split>-NNNNN.idx.npy`, int64 end offset of every document), described by
`manifest.json`. `ShardCorpus` memory-maps them.

Both sources expose the same `TokenCorpus` view: documents laid out in one virtual token space
(`doc_starts`, `doc_lens`) and a vectorized `gather` of token ids at arbitrary positions.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sysconfig
import threading

import numpy as np

from mmfree_jax.data.tokenizers import ByteTokenizer

MANIFEST = "manifest.json"
FORMAT = "mmfree_jax.tokens.v1"
SPLITS = ("train", "heldout")
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                            "__pycache__"})


def stable_fraction(key: bytes) -> float:
  """A hash of `key` mapped to [0, 1), identical on every machine and Python run."""
  digest = hashlib.blake2b(key, digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


class TokenCorpus:
  """Documents in one virtual token space.

  Attributes:
    doc_starts: int64 [num_docs], position of each document's first token (its bos).
    doc_lens: int64 [num_docs], tokens per document, bos and eos included.
  """

  doc_starts: np.ndarray
  doc_lens: np.ndarray

  @property
  def num_docs(self) -> int:
    return int(self.doc_lens.shape[0])

  @property
  def num_tokens(self) -> int:
    return int(self.doc_lens.sum())

  def gather(self, idx: np.ndarray) -> np.ndarray:
    """Token ids (int32) at virtual positions `idx` (any shape)."""
    raise NotImplementedError


class ArrayCorpus(TokenCorpus):
  """A corpus held in memory: one flat token array and document end offsets."""

  def __init__(self, tokens: np.ndarray, doc_ends: np.ndarray):
    self.tokens = tokens
    ends = np.asarray(doc_ends, np.int64)
    self.doc_starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    self.doc_lens = ends - self.doc_starts

  def gather(self, idx: np.ndarray) -> np.ndarray:
    return self.tokens[idx].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Embedded corpus.


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=4)
def stdlib_files(heldout_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(train, held-out) relative paths of the standard library's `.py` files, sorted."""
  if not 0.0 <= heldout_fraction < 1.0:
    raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
  root = stdlib_root()
  paths = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in _EXCLUDED_DIRS)
    rel = os.path.relpath(d, root)
    paths += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/")
              for f in files if f.endswith(".py")]
  paths.sort()
  train, heldout = [], []
  for p in paths:
    (heldout if stable_fraction(p.encode()) < heldout_fraction else train).append(p)
  if not paths:
    raise ValueError(f"no .py files under the standard library at {root}")
  return tuple(train), tuple(heldout)


_EMBEDDED_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _embedded_corpus(split: str, heldout_fraction: float) -> ArrayCorpus:
  train, heldout = stdlib_files(heldout_fraction)
  files = train if split == "train" else heldout
  if not files:
    raise ValueError(f"the embedded corpus has no {split} files with heldout_fraction="
                     f"{heldout_fraction}; use a heldout_fraction in (0, 1)")
  tok = ByteTokenizer()
  root = stdlib_root()
  parts, ends, total = [], [], 0
  for rel in files:
    with open(os.path.join(root, rel), "rb") as f:
      data = np.frombuffer(f.read(), np.uint8).astype(np.uint16) + tok.OFFSET
    parts += [np.array([tok.bos_id], np.uint16), data, np.array([tok.eos_id], np.uint16)]
    total += data.shape[0] + 2
    ends.append(total)
  return ArrayCorpus(np.concatenate(parts), np.array(ends, np.int64))


def embedded_corpus(split: str, heldout_fraction: float) -> ArrayCorpus:
  """The byte-tokenized standard library split ("train" | "heldout"), built once per process."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  with _EMBEDDED_LOCK:
    return _embedded_corpus(split, float(heldout_fraction))


# ---------------------------------------------------------------------------------------------
# Pre-tokenized shards.


def read_manifest(path: str) -> dict:
  """The manifest of a prepared data directory; FileNotFoundError / ValueError if absent or bad."""
  mpath = os.path.join(path, MANIFEST)
  with open(mpath) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def split_shards(manifest: dict, split: str) -> list[dict]:
  return [s for s in manifest["shards"] if s["split"] == split]


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


class ShardCorpus(TokenCorpus):
  """One split of a prepared directory, memory-mapped. Pickles without its maps (for workers)."""

  def __init__(self, path: str, split: str):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    self.path = path
    self.split = split
    manifest = read_manifest(path)
    self.dtype = np.dtype(manifest["dtype"])
    self.shards = split_shards(manifest, split)
    starts, lens, offsets, offset = [], [], [], 0
    for s in self.shards:
      ends = np.load(os.path.join(path, s["index"])).astype(np.int64)
      starts.append(np.concatenate([[0], ends[:-1]]) + offset)
      lens.append(np.diff(ends, prepend=0))
      offsets.append(offset)
      offset += int(s["num_tokens"])
    self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    self.doc_lens = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    self.shard_offsets = np.array(offsets + [offset], np.int64)
    self._maps: list[np.memmap] | None = None

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_maps"] = None
    return state

  def _open(self) -> list[np.memmap]:
    if self._maps is None:
      self._maps = [np.memmap(os.path.join(self.path, s["tokens"]), dtype=self.dtype, mode="r")
                    for s in self.shards]
    return self._maps

  def gather(self, idx: np.ndarray) -> np.ndarray:
    maps = self._open()
    if len(maps) == 1:
      return maps[0][idx].astype(np.int32)
    sid = np.searchsorted(self.shard_offsets, idx, side="right") - 1
    out = np.empty(idx.shape, np.int32)
    for s in np.unique(sid):
      m = sid == s
      out[m] = maps[s][idx[m] - self.shard_offsets[s]]
    return out


def check_shards(path: str, *, verify_checksums: bool = True) -> dict:
  """The manifest of a prepared directory after checking it; ValueError (one line, how to fix).

  Checks: directory and manifest present and parseable, a non-empty train split, every shard file
  present with the size its token count implies, indexes readable and consistent, and (unless
  `verify_checksums` is False) every file's sha256.
  """
  redo = "re-run python -m experiments.prepare_data --out=" + (path or "DIR")
  if not path:
    raise ValueError("data.path is empty; set data.path to a directory written by "
                     "python -m experiments.prepare_data")
  if not os.path.isdir(path):
    raise ValueError(f"data directory {path} does not exist; set data.path or create it with "
                     "python -m experiments.prepare_data --out=" + path)
  mpath = os.path.join(path, MANIFEST)
  if not os.path.isfile(mpath):
    raise ValueError(f"{mpath} is missing (incomplete or not a prepared directory); {redo}")
  try:
    manifest = read_manifest(path)
    dtype = np.dtype(manifest["dtype"])
    shards = list(manifest["shards"])
    _ = (manifest["vocab_size"], manifest["max_token_id"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{mpath} is unreadable or corrupt ({e}); {redo}") from e
  train = split_shards(manifest, "train")
  if not train or sum(int(s["num_tokens"]) for s in train) == 0:
    raise ValueError(f"{path} has no training tokens (empty inputs?); {redo} with non-empty inputs")
  for s in shards:
    tpath, ipath = os.path.join(path, s["tokens"]), os.path.join(path, s["index"])
    for p in (tpath, ipath):
      if not os.path.isfile(p):
        raise ValueError(f"shard file {p} is missing; {redo}")
    if os.path.getsize(tpath) != int(s["num_tokens"]) * dtype.itemsize:
      raise ValueError(f"shard {tpath} has {os.path.getsize(tpath)} bytes, expected "
                       f"{int(s['num_tokens']) * dtype.itemsize} (truncated or corrupt); {redo}")
    if verify_checksums:
      for p, key in ((tpath, "sha256"), (ipath, "index_sha256")):
        if file_sha256(p) != s[key]:
          raise ValueError(f"checksum mismatch for {p} (corrupt or modified); {redo}")
    try:
      ends = np.load(ipath)
    except (ValueError, OSError) as e:
      raise ValueError(f"index {ipath} is unreadable ({e}); {redo}") from e
    if (ends.shape != (int(s["num_docs"]),) or (ends.size and int(ends[-1]) != int(s["num_tokens"]))
        or np.any(np.diff(ends, prepend=0) < 2)):
      raise ValueError(f"index {ipath} does not match its shard (corrupt); {redo}")
  return manifest
