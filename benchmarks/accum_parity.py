"""Does the gradient depend on how a batch's rows are split into micro-batches, beyond summation order?

  python -m benchmarks.accum_parity --config=experiments/configs/370m.py:gpu --batch=8 [--seq_len=2048]

At the config's initialization and on random tokens, the summed-loss gradient of one micro-batch of B rows is
compared with the sums over two micro-batches of B/2 rows, split two ways: first and second half (what
`train.grad_accum=2` does) and even and odd rows. Both splits compute on B/2 rows, so their distance from each
other is the yardstick of reassociation: if the row count itself mattered (a kernel's or a GEMM's behaviour at
B/2 rows), the distance of either split from the one-batch gradient would stand far above it. Reports the
relative L2 distances over all parameters, for each `--dtypes` compute dtype, and appends one JSON line to
benchmarks/results/accum_parity.jsonl.

Read the distances with the 8-bit activation quantizer in mind: a last-bit difference that moves a value across
a rounding step changes that activation by a whole step. The two splits run one compiled program on rows of the
same shape, so per row they can agree bit for bit; the one-batch program is another compilation, whose last
bits may differ (the CPU's vectorization in float32: the tiny model at 4 rows of 16 tokens gives 7e-4 against
the one batch and 1.3e-7 between the splits). In float64 all three agree to summation order (the test).
"""

import datetime
import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags


def _define_flags():  # at run time only: importing `distances` (the tests) defines no global flags
  config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=False)
  flags.DEFINE_integer("batch", 8, "Rows of the one-micro-batch gradient (even).")
  flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (model.dtype) to compare in.")
  flags.DEFINE_string("out", "benchmarks/results/accum_parity.jsonl", "Where to append the result line.")
  flags.mark_flags_as_required(["config"])


def distances(config, batch: int, seq_len: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train.program import build_program  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train.step import loss_sums  # pylint: disable=g-import-not-at-top

  if batch % 2:
    raise ValueError(f"--batch={batch} must be even (two micro-batches of batch/2 rows)")
  program = build_program(config, sharding.make_mesh(config.mesh))
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (batch, seq_len + 1), dtype=np.int32)
  rows = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
          "weights": np.ones((batch, seq_len), np.float32)}
  with program.context:
    params = program.init_state().params
    grad = jax.jit(jax.grad(lambda p, b: loss_sums(program.model, p, b)[0]))
    take = lambda idx: {k: v[idx] for k, v in rows.items()}
    wide = lambda x: x.astype(np.promote_types(x.dtype, np.float32))  # bf16 gradients summed in float32
    add = lambda a, b: jax.tree.map(lambda x, y: wide(x) + wide(y), a, b)
    one = jax.tree.map(wide, grad(params, rows))
    half = batch // 2
    halves = add(grad(params, take(slice(0, half))), grad(params, take(slice(half, batch))))
    even_odd = add(grad(params, take(slice(0, batch, 2))), grad(params, take(slice(1, batch, 2))))

  def dist(a, b):
    num = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))
    return (num / sum(float(np.sum(np.asarray(y) ** 2)) for y in jax.tree.leaves(b))) ** 0.5

  return {"halves_vs_one": dist(halves, one), "even_odd_vs_one": dist(even_odd, one),
          "halves_vs_even_odd": dist(halves, even_odd)}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  result = {"device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
            "date": datetime.date.today().isoformat(), "config": config_flags.get_config_filename(f["config"]),
            "batch": f.batch, "seq_len": f.seq_len, "bitlinear": f.config.model.bitlinear,
            "scan_impl": f.config.model.scan_impl, "jax": jax.__version__}
  for dtype in f.dtypes:
    f.config.model.dtype = dtype
    result[dtype] = distances(f.config, f.batch, f.seq_len)
    print(f"RESULT {dtype}: relative L2 distance of the gradients: " + ", ".join(
        f"{k} {v:.3g}" for k, v in result[dtype].items()), flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  with open(f.out, "a", encoding="utf-8") as fh:
    fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
