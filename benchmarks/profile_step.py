"""Where the training step's device time goes: trace a few steps and sum kernel time by kind.

  python -m benchmarks.profile_step --config=experiments/configs/370m.py --batch=16 [--top=25]

Traces with `jax.profiler` (Perfetto JSON), then groups the device-side events by kernel name with digits
stripped (gemm kernels, XLA loop / reduction fusions, cuDNN, copies) and prints the largest groups and the
matmul vs non-matmul split.
"""

from absl import app
from absl import flags

from benchmarks import trace
from benchmarks import train_step  # defines --config, --batch, --seq_len, --steps (traced steps here)

flags.DEFINE_integer("top", 25, "Groups to print.")
flags.DEFINE_bool("exact", False, "One group per kernel name (find it in the compiled HLO, e.g. with "
                  "XLA_FLAGS=--xla_dump_to=DIR) instead of per kind of kernel.")


def main(argv):
  del argv
  f = flags.FLAGS
  train_step.run(f.config, f.batch, f.seq_len, steps=2, warmup=1)  # compile + warm caches
  with trace.Trace(exact=f.exact) as t:
    train_step.run(f.config, f.batch, f.seq_len, steps=f.steps, warmup=0)
  t.print_table(per=f.steps, unit="step", top=f.top)


if __name__ == "__main__":
  app.run(main)
