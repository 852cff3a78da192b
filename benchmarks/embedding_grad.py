"""Backward pass of the token embedding: flax's bf16 lookup (bf16 scatter-add) vs `layers.embed`.

  python -m benchmarks.embedding_grad [--repeats=20]

Cases (vocab, width, tokens per step, which ids):
  bytes      384 x 320, 16384 ids of the embedded byte-level corpus (the scaling sweep's transformer-d320 step)
  bpe_zipf   32000 x 1024, 32768 ids drawn from a Zipf law (s = 1.1), a stand-in for word pieces of real text
  uniform    32000 x 1024, 32768 uniformly random ids (what the training-step benchmark feeds)
Variants: `flax` (`jnp.take` of the table cast to bf16, as `flax.linen.Embed(dtype=bf16)`), `ours`
(`layers.embed.lookup`: one-hot product up to 1024 ids on accelerators, else float32 scatter),
`ours_one_hot` and `ours_scatter` (either branch forced). Median of synchronized repeats after warm-up;
appends JSON lines to benchmarks/results/embedding_grad.jsonl.
"""

import datetime
import json
import platform
import statistics
import time

from absl import app
from absl import flags

flags.DEFINE_integer("repeats", 20, "timed repeats")
flags.DEFINE_string("out", "benchmarks/results/embedding_grad.jsonl", "results file")
FLAGS = flags.FLAGS


def _ids(case: str, n: int, vocab: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  if case == "bytes":
    from mmfree_jax.data import sources  # pylint: disable=g-import-not-at-top
    corpus = sources.embedded_corpus("train", 0.01)
    start = int(rng.integers(0, corpus.num_tokens - n))
    return np.asarray(corpus.gather(np.arange(start, start + n)), np.int32)
  if case == "bpe_zipf":
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    return rng.choice(vocab, size=n, p=p / p.sum()).astype(np.int32)
  return rng.integers(0, vocab, n).astype(np.int32)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import embed  # pylint: disable=g-import-not-at-top

  variants = {
      "flax": lambda t, i: jnp.take(t.astype(jnp.bfloat16), i, axis=0),
      "ours": lambda t, i: embed.lookup(t, i, jnp.dtype(jnp.bfloat16)),
      "ours_one_hot": lambda t, i: embed.lookup(t, i, jnp.dtype(jnp.bfloat16), embed.ONE_HOT_MAX_VOCAB),
      "ours_scatter": lambda t, i: embed.lookup(t, i, jnp.dtype(jnp.bfloat16), 0),
  }
  dev = jax.devices()[0]
  for case, vocab, width, n in (("bytes", 384, 320, 16384), ("bpe_zipf", 32000, 1024, 32768),
                                ("uniform", 32000, 1024, 32768)):
    ids = jnp.asarray(_ids(case, n, vocab))
    table = jax.random.normal(jax.random.key(0), (vocab, width), jnp.float32)
    g = jax.random.normal(jax.random.key(1), (n, width), jnp.bfloat16)
    row = {"device": dev.device_kind, "date": datetime.date.today().isoformat(),
           "command": "python -m benchmarks.embedding_grad", "case": case, "vocab": vocab, "width": width,
           "tokens": n, "distinct_ids": int(jnp.unique(ids).shape[0]),
           "versions": {"jax": jax.__version__, "python": platform.python_version()}}
    for name, fn in variants.items():
      bwd = jax.jit(lambda t, i, g, fn=fn: jax.vjp(lambda t: fn(t, i), t)[1](g)[0])
      jax.block_until_ready(bwd(table, ids, g))
      ts = []
      for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(bwd(table, ids, g))
        ts.append(time.perf_counter() - t0)
      row[f"{name}_ms"] = round(statistics.median(ts) * 1e3, 4)
    print(json.dumps(row), flush=True)
    with open(FLAGS.out, "a") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
