"""Data loader throughput: tokens/s per process of the training iterator on pre-tokenized shards.

  python -m benchmarks.data_loader [--tokens=50000000] [--global_batch=16] [--seq_len=2048]

Writes synthetic shards (random ids below a 32000 vocabulary, log-normal document lengths around
1000 tokens) with the same writer `experiments.prepare_data` uses, runs `make_train_iterator` for a
warm-up and then a few timed windows, and reports the median tokens/s of this process's slice. One
JSON line is appended to benchmarks/results/data_loader.jsonl. The shards were just written, so they
are read from the page cache: this measures the loader's CPU cost, not the disk.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app, flags
import grain
import ml_collections
import numpy as np

from mmfree_jax.data import pipeline, prepare

_TOKENS = flags.DEFINE_integer("tokens", 50_000_000, "synthetic corpus size in tokens")
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "synthetic vocabulary size")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 16, "sequences per global batch")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "tokens per row")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "simulated processes (this is 0)")
_WINDOWS = flags.DEFINE_integer("windows", 5, "timed windows")
_WINDOW_BATCHES = flags.DEFINE_integer("window_batches", 300, "batches per timed window")
_WARMUP = flags.DEFINE_integer("warmup", 20, "untimed batches first")
_PREFETCH = flags.DEFINE_integer("prefetch", 2, "data.prefetch")
_OUT = flags.DEFINE_string("out", "benchmarks/results/data_loader.jsonl", "results file")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def write_synthetic(out: str, tokens: int, vocab: int, seed: int = 0) -> dict:
  """Synthetic framed documents through `TokenShardWriter`; 1% of them held out."""
  rng = np.random.default_rng(seed)
  writer = prepare.TokenShardWriter(out, tokenizer="synthetic", vocab_size=vocab, bos_id=1,
                                    eos_id=2, pad_id=0, shard_tokens=1 << 24)
  written = 0
  while written < tokens:
    lens = np.clip(rng.lognormal(np.log(800), 1.0, 4096).astype(np.int64), 1, 50_000)
    body = rng.integers(3, vocab, int(lens.sum()), dtype=np.int64)
    for i, piece in enumerate(np.split(body, np.cumsum(lens)[:-1])):
      doc = np.concatenate([[1], piece, [2]])
      writer.add("heldout" if i % 100 == 0 else "train", doc)
      written += doc.shape[0]
      if written >= tokens:
        break
  return writer.close(synthetic_seed=seed)


def main(argv: list[str]) -> None:
  del argv
  cfg = ml_collections.ConfigDict(dict(source="shards", path="", seq_len=_SEQ_LEN.value,
                                       shuffle_seed=0, heldout_fraction=0.01,
                                       prefetch=_PREFETCH.value, num_workers=0))
  with tempfile.TemporaryDirectory() as d:
    t0 = time.time()
    manifest = write_synthetic(d, _TOKENS.value, _VOCAB.value)
    print(f"wrote {manifest['num_tokens']:,} tokens in {len(manifest['shards'])} shards "
          f"({time.time() - t0:.1f}s)", file=sys.stderr)
    cfg.path = d
    pipeline.validate(cfg, model_vocab_size=_VOCAB.value)
    it = pipeline.make_train_iterator(cfg, global_batch=_GLOBAL_BATCH.value,
                                      seq_len=_SEQ_LEN.value, seed=0, process_index=0,
                                      process_count=_PROCESS_COUNT.value)
    for _ in range(_WARMUP.value):
      next(it)
    rates = []
    for _ in range(_WINDOWS.value):
      n, t = 0, time.perf_counter()
      for _ in range(_WINDOW_BATCHES.value):
        n += next(it)["inputs"].size
      rates.append(n / (time.perf_counter() - t))
  tps = statistics.median(rates)
  record = {
      "benchmark": "data_loader",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": cpu_model(),
      "cpu_count": os.cpu_count(),
      "command": "python -m benchmarks.data_loader " + " ".join(sys.argv[1:]),
      "tokens_per_s": round(tps),
      "window_tokens_per_s": [round(r) for r in rates],
      "global_batch": _GLOBAL_BATCH.value,
      "batch": _GLOBAL_BATCH.value // _PROCESS_COUNT.value,
      "process_count": _PROCESS_COUNT.value,
      "seq_len": _SEQ_LEN.value,
      "corpus_tokens": manifest["num_tokens"],
      "prefetch": _PREFETCH.value,
      "versions": {"python": platform.python_version(), "numpy": np.__version__,
                   "grain": grain.__version__},
  }
  print(f"{tps / 1e6:.2f}M tokens/s per process (median of {len(rates)} windows)")
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "a") as f:
    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
