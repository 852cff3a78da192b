"""Each activation-path kernel alone, at the 1.3B step's micro-batch shapes, per setting of the kernels' constants.

  python -m benchmarks.activation_kernels [--kernels=glu_forward,glu_backward,prenorm_backward:3] \
      [--set=bitlinear_kernel.FORWARD_ROWS_PER_PROGRAM=8,prenorm_kernel.FORWARD_PREFETCH=0 --set= ...]

Device time per call (calls back to back, `benchmarks/timing.py`) of one kernel launch and the XLA work its
wrapper adds (the sum of per-program partials), with the bandwidth its bytes imply (each byte read or written
once). Rows of 8192 (4 x 2048 tokens), bf16 as in training:
  bitlinear_forward:N / bitlinear_backward:N   `bitlinear_kernel` on [8192, 2048] with N norm scales (3: f/i/g)
  glu_forward / glu_backward                   the down projection's path on [8192, 2 x 5632] (swiglu inside)
  prenorm_forward:N / prenorm_backward:N       `prenorm_kernel`: N = 3 the MLGRU site (the stream itself), N = 1
                                               the GLU site (stream + residual)
Each `--set` is one configuration: comma-separated `module.CONSTANT=value` assignments (value an integer or
None) on `mmfree_jax.layers.<module>`, restored after it; an empty `--set=` is the defaults. Appends JSON lines to
benchmarks/results/activation_kernels.jsonl (benchmarks/README.md, log item 52).
"""

import datetime
import json
import sys

from absl import app
from absl import flags

from benchmarks import tiling
from benchmarks import timing

KERNELS = ("bitlinear_forward:1", "bitlinear_backward:1", "bitlinear_forward:3", "bitlinear_backward:3",
           "glu_forward", "glu_backward", "prenorm_forward:3", "prenorm_backward:3", "prenorm_forward:1",
           "prenorm_backward:1")
flags.DEFINE_list("kernels", list(KERNELS), "kernels to time: " + ", ".join(KERNELS))
flags.DEFINE_multi_string("set", [""], "one configuration: module.CONSTANT=value,... (repeat for several)")
flags.DEFINE_integer("rows", 8192, "rows (tokens of one micro-batch)")
flags.DEFINE_integer("repeats", 10, "timed repeats (each of 10 calls back to back)")
flags.DEFINE_string("label", "", "free-form label stored with the results")
flags.DEFINE_string("out", "benchmarks/results/activation_kernels.jsonl", "results file")

WIDTH, FFN = 2048, 5632  # the 1.3B model's d_model and GLU width


def _case(kernel: str, rows: int):
  """(function, arguments, bytes read and written) of one kernel."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import bitlinear_kernel as bk  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import prenorm_kernel as pk  # pylint: disable=g-import-not-at-top
  name, _, n = kernel.partition(":")
  n = int(n or 1)
  keys = iter(jax.random.split(jax.random.key(0), 8))
  arr = lambda *shape: jax.random.normal(next(keys), shape, jnp.bfloat16)
  unit = rows * WIDTH * 2  # one [rows, 2048] bf16 array
  if name in ("glu_forward", "glu_backward"):
    x, g = arr(rows, 2 * FFN), jnp.ones((1, FFN), jnp.float32)
    h_bytes = rows * FFN * 2
    if name == "glu_forward":
      return (lambda x: bk._forward(x, g, 1e-6, True)), (x,), 3 * h_bytes
    return (lambda x, dy: bk._backward(x, g, (dy,), 1e-6, True)), (x, arr(rows, FFN)), 5 * h_bytes
  gs, x = jnp.ones((n, WIDTH), jnp.float32), arr(rows, WIDTH)
  dys = tuple(arr(rows, WIDTH) for _ in range(n))
  if name == "bitlinear_forward":
    return (lambda x: bk._forward(x, gs, 1e-6, False)), (x,), unit * (1 + n)
  if name == "bitlinear_backward":
    return (lambda x, *d: bk._backward(x, gs, d, 1e-6, False)), (x, *dys), unit * (2 + n)
  w, residual = jnp.ones((WIDTH,), jnp.float32), n == 1
  if name == "prenorm_forward":
    fn = lambda x, r: pk._forward(x, r if residual else None, w, gs, 1e-6, 1e-6)
    return fn, (x, arr(rows, WIDTH)), unit * ((3 if residual else 1) + n)
  if name == "prenorm_backward":
    return (lambda h, dh, *d: pk._backward(h, w, gs, dh, d, 1e-6, 1e-6)), (x, arr(rows, WIDTH), *dys), unit * (3 + n)
  raise app.UsageError(f"--kernels: one of {', '.join(KERNELS)}, not {kernel!r}")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  for setting in f.set:
    for kernel in f.kernels:
      with tiling.layer_constants(setting):
        fn, args, nbytes = _case(kernel, f.rows)
        ms = timing.median_time(jax.jit(fn), *args, repeats=f.repeats, back_to_back=10) * 1e3
      row = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(), "kernel": kernel,
             "set": setting, "rows": f.rows, "ms": round(ms, 4), "tb_per_s": round(nbytes / ms / 1e9, 2),
             "label": f.label, "jax": jax.__version__,
             "command": "python -m benchmarks.activation_kernels " + " ".join(sys.argv[1:])}
      print(f"KERNEL {kernel:>20} {ms:8.4f} ms {row['tb_per_s']:5.2f} TB/s   {setting or '(defaults)'}", flush=True)
      with open(f.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
