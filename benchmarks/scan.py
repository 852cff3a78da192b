"""The token-mixer recurrence h_t = a_t h_{t-1} + b_t: forward and forward+backward time per backend.

  python -m benchmarks.scan [--shape=8,2048,2048] [--dtype=bfloat16] [--impls=associative,chunked:64,pallas,...]

`chunked:<chunk>` sets the chunk length; `pallas:<block_d>:<unroll>:<num_warps>:<prefetch 0|1>` the GPU kernel's tiling
(`layers/recurrence_kernel.py`, that block_d at any grid size; plain `pallas` keeps its defaults).

bf16 (or float32) inputs, float32 state, as the model runs it. Median after warm-up of synchronized calls
(`fwd_ms`, `fwd_bwd_ms`: host dispatch included) and of calls issued back to back (`*_device_ms`: the device time
per call); appends JSON lines to benchmarks/results/scan.jsonl.
"""

import datetime
import json
import sys

from absl import app
from absl import flags

from benchmarks import tiling
from benchmarks import timing

flags.DEFINE_string("shape", "8,2048,2048", "B,T,D")
flags.DEFINE_string("dtype", "bfloat16", "input dtype")
flags.DEFINE_string("impls", "associative,chunked:128,pallas,sequential",
                    "backends (chunked:<chunk>)")
flags.DEFINE_integer("repeats", 20, "timed repeats")
flags.DEFINE_integer("back_to_back", 10, "calls per timed sample for the device-time figures (benchmarks/timing.py)")
flags.DEFINE_string("out", "benchmarks/results/scan.jsonl", "results file")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import recurrence_kernel  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers.recurrence import linear_scan  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  shape = tuple(int(s) for s in f.shape.split(","))
  dt = jnp.dtype(f.dtype)
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.nn.sigmoid(jax.random.normal(k1, shape) + 2).astype(dt)
  b = jax.random.normal(k2, shape).astype(dt)
  for spec in f.impls.split(","):
    impl, *params = spec.split(":")
    kw = dict(impl=impl, chunk=int(params[0]) if impl == "chunked" and params else 128)
    fwd = jax.jit(lambda a_, b_, kw=kw: linear_scan(a_, b_, **kw)[0])
    loss = lambda a_, b_, kw=kw: jnp.sum(linear_scan(a_, b_, **kw)[0].astype(jnp.float32))
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    reps = 3 if impl == "sequential" else f.repeats
    ms = lambda fn, k=1: round(timing.median_time(fn, a, b, repeats=reps, back_to_back=k) * 1e3, 3)
    exact = ["0"] if impl == "pallas" and params else []  # the spec's block_d at any grid size
    with tiling.kernel_tiling(recurrence_kernel, ("BLOCK_D", "UNROLL", "NUM_WARPS", "PREFETCH"), spec,
                              params if impl == "pallas" else []), \
         tiling.kernel_tiling(recurrence_kernel, ("SMALL_GRID",), spec, exact):
      row = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(), "impl": spec,
             "shape": list(shape), "dtype": f.dtype, "fwd_ms": ms(fwd), "fwd_bwd_ms": ms(bwd),
             "fwd_device_ms": ms(fwd, f.back_to_back), "fwd_bwd_device_ms": ms(bwd, f.back_to_back),
             "back_to_back": f.back_to_back, "jax": jax.__version__,
             "command": "python -m benchmarks.scan " + " ".join(sys.argv[1:])}
    print(f"SCAN {spec:>14}  fwd {row['fwd_ms']:8.3f} ms   fwd+bwd {row['fwd_bwd_ms']:8.3f} ms   back to back: "
          f"fwd {row['fwd_device_ms']:8.3f} ms   fwd+bwd {row['fwd_bwd_device_ms']:8.3f} ms", flush=True)
    with open(f.out, "a") as fh:  # line by line: a sweep cut short keeps what it measured
      fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
