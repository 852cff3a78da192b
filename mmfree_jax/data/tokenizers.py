"""Tokenizers: bytes, SentencePiece and Hugging Face `tokenizer.json`.

Every tokenizer has the same small interface (`Tokenizer`): `encode(str) -> list[int]` (no bos/eos
added; the data pipeline frames each document as `[bos] + tokens + [eos]`), `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_id`, `pad_id`, and a `spec` string that `load_tokenizer` accepts.

`sentencepiece` and `tokenizers` are optional extras (`pip install mmfree_jax[data]`); they are
imported only when such a tokenizer is loaded.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Protocol, Sequence

BYTE_SPEC = "byte"


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  spec: str

  @property
  def vocab_size(self) -> int: ...

  @property
  def bos_id(self) -> int: ...

  @property
  def eos_id(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes: pad=0, bos=1, eos=2, byte b -> b + 3; vocabulary of 259."""

  OFFSET = 3
  spec = BYTE_SPEC

  @property
  def vocab_size(self) -> int:
    return 256 + self.OFFSET

  @property
  def bos_id(self) -> int:
    return 1

  @property
  def eos_id(self) -> int:
    return 2

  @property
  def pad_id(self) -> int:
    return 0

  def encode(self, text: str) -> list[int]:
    return [b + self.OFFSET for b in text.encode("utf-8")]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Special ids (< 3) are dropped; invalid UTF-8 sequences become U+FFFD."""
    data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.vocab_size)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece `.model` file.

  A model trained without a pad piece (SentencePiece's default, `pad_id() == -1`) reports pad_id 0;
  the pipeline never feeds padding to the loss (its weight is 0), so any in-vocabulary id will do.
  """

  def __init__(self, path: str):
    try:
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("SentencePiece tokenizers need `pip install sentencepiece` "
                        "(or `pip install mmfree_jax[data]`)") from e
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model not found: {path}")
    self.spec = os.path.abspath(path)
    self._sp = spm.SentencePieceProcessor(model_file=path)
    if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
      raise ValueError(f"{path}: the SentencePiece model needs bos and eos pieces "
                       "(train it with bos_id >= 0 and eos_id >= 0)")

  @property
  def vocab_size(self) -> int:
    return int(self._sp.get_piece_size())

  @property
  def bos_id(self) -> int:
    return int(self._sp.bos_id())

  @property
  def eos_id(self) -> int:
    return int(self._sp.eos_id())

  @property
  def pad_id(self) -> int:
    pad = int(self._sp.pad_id())
    return pad if pad >= 0 else 0

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(x) for x in self._sp.encode(list(texts))]

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


_BOS_CANDIDATES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]", "<|endoftext|>")
_EOS_CANDIDATES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|padding|>")


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` package).

  bos/eos are found among common special-token spellings unless given; a tokenizer with a single
  document separator (GPT-2's `<|endoftext|>`) uses it for both.
  """

  def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("tokenizer.json files need `pip install tokenizers` "
                        "(or `pip install mmfree_jax[data]`)") from e
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    self.spec = os.path.abspath(path)
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._bos = self._find(bos_token, _BOS_CANDIDATES, "bos")
    self._eos = self._find(eos_token, _EOS_CANDIDATES, "eos")
    pads = [self._tok.token_to_id(t) for t in _PAD_CANDIDATES]
    self._pad = next((p for p in pads if p is not None), 0)

  def _find(self, given: str | None, candidates: Sequence[str], what: str) -> int:
    names = (given,) if given else candidates
    for name in names:
      idx = self._tok.token_to_id(name)
      if idx is not None:
        return int(idx)
    raise ValueError(f"{self.spec}: no {what} token among {list(names)}; "
                     f"pass {what}_token= naming one of its special tokens")

  @property
  def vocab_size(self) -> int:
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
  """A tokenizer from `spec`.

  `spec` is "byte", a SentencePiece `.model` file, a `tokenizer.json` file (or a directory holding
  one), or a data directory / `manifest.json` written by `experiments.prepare_data`, whose recorded
  tokenizer is loaded.
  """
  if spec == BYTE_SPEC:
    return ByteTokenizer()
  if os.path.isdir(spec):
    for name in ("manifest.json", "tokenizer.json"):
      if os.path.isfile(os.path.join(spec, name)):
        return load_tokenizer(os.path.join(spec, name))
    raise ValueError(f"{spec}: directory holds neither manifest.json nor tokenizer.json")
  if os.path.basename(spec) == "manifest.json":
    with open(spec) as f:
      recorded = json.load(f)["tokenizer"]
    return load_tokenizer(recorded)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec)
  if spec.endswith(".json"):
    return HFTokenizer(spec)
  raise ValueError(f"unknown tokenizer {spec!r}: use 'byte', a SentencePiece .model file, "
                   "a tokenizer.json file, or a prepared data directory")
