"""The layers' gradients of two micro-batches summed and stacked (`mmfree_jax.train.grad_stack`): XLA's stack
against the kernel, at the 1.3B step's layer matrices.

  python -m benchmarks.grad_stack [--set=grad_stack.ROWS_PER_PROGRAM=16 --set= ...]

For each layer matrix of the 1.3B model (24 layers; f/i/g/o [2048, 2048], down [5632, 2048], gate/up
[2048, 2 x 5632]), bf16 gradients of 2 micro-batches per layer are summed in float32 and stacked. Device time per
call (calls back to back, `benchmarks/timing.py`) and the bandwidth its bytes imply (each gradient read once, each
sum written once). Each `--set` is one configuration of the kernel's constants (`benchmarks/tiling.py`); an empty
`--set=` is the defaults. Appends JSON lines to benchmarks/results/grad_stack.jsonl (benchmarks/README.md, log
item 54).
"""

import datetime
import json
import sys

from absl import app
from absl import flags

from benchmarks import tiling
from benchmarks import timing

flags.DEFINE_multi_string("set", [""], "one kernel configuration: module.CONSTANT=value,... (repeat for several)")
flags.DEFINE_integer("layers", 24, "layers")
flags.DEFINE_integer("micro_batches", 2, "micro-batches (gradients per layer)")
flags.DEFINE_integer("repeats", 10, "timed repeats (each of 10 calls back to back)")
flags.DEFINE_string("label", "", "free-form label stored with the results")
flags.DEFINE_string("out", "benchmarks/results/grad_stack.jsonl", "results file")

MATRICES = {"f/i/g/o": (2048, 2048), "down": (5632, 2048), "gate/up": (2048, 2, 5632)}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import grad_stack  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  device = jax.devices()[0].device_kind
  for setting in f.set:
    for name, shape in MATRICES.items():
      keys = jax.random.split(jax.random.key(0), f.layers)
      per_layer = [jax.random.normal(k, (f.micro_batches,) + shape, jnp.bfloat16) for k in keys]
      n = per_layer[0].size
      moved = f.layers * (n * 2 + n // f.micro_batches * 4)
      for impl, kernel in (("xla", False), ("kernel", True)):
        with tiling.layer_constants(setting):
          fn = jax.jit(lambda p, kernel=kernel: grad_stack.sum_and_stack(p, jnp.float32, kernel=kernel))
          ms = 1e3 * timing.median_time(fn, per_layer, repeats=f.repeats, back_to_back=10)
        row = dict(device=device, date=datetime.date.today().isoformat(), matrix=name, shape=list(shape),
                   layers=f.layers, micro_batches=f.micro_batches, impl=impl, set=setting, ms=round(ms, 4),
                   tb_per_s=round(moved / ms / 1e9, 3), label=f.label, jax=jax.__version__)
        print(json.dumps(row))
        sys.stdout.flush()
        with open(f.out, "a", encoding="utf-8") as out:
          out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
