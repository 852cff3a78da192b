"""One BitLinear's forward and forward+backward time: XLA's vanilla layer against the activation-path kernel.

  python -m benchmarks.bitlinear_kernel [--rows=32768] [--shapes=1024x1024,2816x1024,1024x5632] \
      [--impls=vanilla,pallas,pallas:32:8192:4]

`pallas:<rows_per_program>:<tile_elems>:<num_warps>` sets the kernel's tiling (`layers/bitlinear_kernel.py`;
plain `pallas` keeps its defaults). bf16 input and output, float32 latent weights, as in training. Median of
synchronized repeats after warm-up; appends JSON lines to benchmarks/results/bitlinear_kernel.jsonl.

`--activation_only` times the activation path alone (norm + absmax + quantize, y_q of `[rows, in]`, and its
backward; no product) as device time (calls back to back, `benchmarks/timing.py`), with the bandwidth that its
bytes imply: what a tiling changes, without the GEMM around it. With `--glu`, the down projection's path: the
input is `[rows, 2, in]` (gate, up) and h = swiglu of it (the kernel's GLU prologue; vanilla: `glu.swiglu` in XLA,
then its path).
"""

import datetime
import json
import sys

from absl import app
from absl import flags

from benchmarks import tiling
from benchmarks import timing

flags.DEFINE_integer("rows", 32768, "tokens (rows of the input)")
flags.DEFINE_string("shapes", "1024x1024,2816x1024,1024x5632", "in x out features")
flags.DEFINE_string("impls", "vanilla,pallas", "BitLinear impls (pallas:<rows_per_program>:<tile_elems>:<warps>)")
flags.DEFINE_integer("repeats", 20, "timed repeats")
flags.DEFINE_bool("activation_only", False, "time the activation path alone (device time; no product)")
flags.DEFINE_bool("glu", False, "with --activation_only: the input is [rows, 2, in] and the layer reads its swiglu")
flags.DEFINE_string("out", "benchmarks/results/bitlinear_kernel.jsonl", "results file")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import bitlinear_kernel  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers.bitlinear import bitlinear  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  for shape in f.shapes.split(","):
    k, n = (int(v) for v in shape.split("x"))
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (f.rows, 2, k) if f.glu else (f.rows, k), jnp.bfloat16)
    if f.glu and not f.activation_only:
      raise app.UsageError("--glu times the activation path alone: add --activation_only")
    g = jnp.ones((k,), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
    dout = jax.random.normal(kd, (f.rows, n), jnp.bfloat16)
    for spec in f.impls.split(","):
      impl, *params = spec.split(":")
      if f.activation_only:
        fwd, bwd, ms = _activation_path(impl, x, g, f.repeats, f.glu)
      else:
        fwd = jax.jit(lambda x_, g_, w_, impl=impl: bitlinear(x_, g_, w_, impl=impl))
        loss = lambda x_, g_, w_, impl=impl: jnp.sum((bitlinear(x_, g_, w_, impl=impl) * dout).astype(jnp.float32))
        bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        ms = lambda fn: round(timing.median_time(fn, x, g, w, repeats=f.repeats) * 1e3, 3)
      with tiling.kernel_tiling(bitlinear_kernel, ("ROWS_PER_PROGRAM", "TILE_ELEMS", "NUM_WARPS"), spec,
                                params if impl == "pallas" else []):
        row = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(), "impl": spec,
               "rows": f.rows, "in": k, "out": n, "fwd_ms": ms(fwd), "fwd_bwd_ms": ms(bwd), "jax": jax.__version__,
               "command": "python -m benchmarks.bitlinear_kernel " + " ".join(sys.argv[1:])}
      extra = ""
      if f.activation_only:
        del row["out"]
        # Forward: read x, write y_q; backward: read x, dy, write dx (bf16); the forward's bytes again. With glu,
        # x and dx are twice y_q's size.
        row["activation_only"], row["glu"] = True, f.glu
        unit = x.nbytes // 2 if f.glu else x.nbytes
        fwd_bytes, bwd_bytes = (3 * unit, 5 * unit) if f.glu else (2 * unit, 3 * unit)
        row["fwd_tb_per_s"] = round(fwd_bytes / row["fwd_ms"] / 1e9, 2)
        row["fwd_bwd_tb_per_s"] = round((fwd_bytes + bwd_bytes) / row["fwd_bwd_ms"] / 1e9, 2)
        extra = f"   ({row['fwd_tb_per_s']} / {row['fwd_bwd_tb_per_s']} TB/s)"
      print(f"BITLINEAR {k:>5}x{n:<5} {spec:>16}  fwd {row['fwd_ms']:8.3f} ms   fwd+bwd {row['fwd_bwd_ms']:8.3f} ms"
            + extra, flush=True)
      with open(f.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _activation_path(impl, x, g, repeats, glu=False):
  """(forward, forward + backward, timer) of y_q alone for `impl` (vanilla: XLA's fusions; pallas: the kernel)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import bitlinear as bl  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import bitlinear_kernel  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers.glu import swiglu  # pylint: disable=g-import-not-at-top
  pre = swiglu if glu else (lambda v: v)
  if impl == "pallas":
    y_q = lambda x_, g_: bitlinear_kernel.quantized_inputs(x_, g_[None], 1e-6, glu)[0]
  elif impl == "vanilla":
    y_q = lambda x_, g_: bl._quantized_input_xla(pre(x_), g_, 1e-6).astype(x_.dtype)  # pylint: disable=protected-access
  else:
    raise app.UsageError(f"--activation_only times vanilla and pallas, not {impl!r}")
  dy = jax.random.normal(jax.random.key(1), (x.shape[0], g.shape[0]), x.dtype)
  # (a random cotangent: a constant one lets XLA simplify)
  fwd = jax.jit(y_q)
  bwd = jax.jit(jax.grad(lambda x_, g_: jnp.sum((y_q(x_, g_) * dy).astype(jnp.float32)), argnums=(0, 1)))
  return fwd, bwd, lambda fn: round(timing.median_time(fn, x, g, repeats=repeats, back_to_back=10) * 1e3, 4)


if __name__ == "__main__":
  app.run(main)
