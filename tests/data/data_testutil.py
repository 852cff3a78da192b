"""Helpers shared by the data tests (a module with a unique name, importable from each test)."""

from __future__ import annotations

import os
import sysconfig

import ml_collections


def stdlib_texts(n: int, max_chars: int = 3000) -> list[str]:
  """Deterministic snippets of the standard library's source, `n` of them."""
  root = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  texts = []
  for name in sorted(os.listdir(root)):
    if name.endswith(".py"):
      with open(os.path.join(root, name), encoding="utf-8") as f:
        text = f.read()
      texts += [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
  texts = [t for t in texts if t.strip()]
  out = []
  while len(out) < n:
    out += [f"{len(out)}: {t[:max_chars - 50 * (len(out) % 7)]}" for t in texts[:n - len(out)]]
  return out


def data_cfg(source: str = "embedded", path: str = "", heldout_fraction: float = 0.02,
             shuffle_seed: int = 0, prefetch: int = 2) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      source=source, path=path, seq_len=64, shuffle_seed=shuffle_seed,
      heldout_fraction=heldout_fraction, prefetch=prefetch, num_workers=0))
