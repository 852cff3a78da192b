"""The block norm inside the BitLinear kernel (`layers/prenorm_kernel.py`) against the unfused path, per tiling.

  python -m benchmarks.prenorm_kernel [--rows=8192] [--width=2048] \
      [--impls=unfused,fused,rows:8:2048:4]

Times the activation path of one block site alone, device time (calls back to back, `benchmarks/timing.py`):
the MLGRU site (`--scales=3`: f/i/g, the stream x itself) and the GLU site (`--scales=1`: gate_proj, the stream
x + residual), forward and forward + backward, with the stream's own cotangent. `unfused`: XLA's add and RMSNorm,
then `bitlinear_kernel.quantized_inputs`; `fused`: `prenorm_kernel.prenormed_inputs` as configured;
`rows:<rows_per_program>:<tile_elems>:<backward_warps>`: that tiling. bf16 rows as in training (1.3B: 8192 rows
per micro-batch, width 2048). Appends JSON lines to benchmarks/results/prenorm_kernel.jsonl. (Lines with
`chunked:...` there timed a backward over column chunks, removed after log item 52. Each kernel alone, forward or
backward, per setting of the kernels' constants: `benchmarks/activation_kernels.py`.)
"""

import datetime
import json
import sys

from absl import app
from absl import flags

from benchmarks import tiling
from benchmarks import timing

flags.DEFINE_integer("rows", 8192, "rows (tokens of one micro-batch)")
flags.DEFINE_integer("width", 2048, "row width (d_model)")
flags.DEFINE_string("scales", "3,1", "sites by their number of norm scales: 3 (f/i/g, no residual), 1 (gate_proj)")
flags.DEFINE_string("impls", "unfused,fused", "unfused | fused | rows:<rows_per_program>:<tile_elems>:<warps>")
flags.DEFINE_integer("repeats", 20, "timed repeats")
flags.DEFINE_string("out", "benchmarks/results/prenorm_kernel.jsonl", "results file")


def _site(impl, n, residual):
  """The site's stream and quantized inputs as a function of (x, residual, w, gs)."""
  from mmfree_jax.layers import bitlinear_kernel  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import prenorm_kernel  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers.norm import PreNorm  # pylint: disable=g-import-not-at-top
  del n
  if impl == "fused":
    return lambda x, r, w, gs: prenorm_kernel.prenormed_inputs(x, r if residual else None, w, gs, 1e-6, 1e-6)

  def unfused(x, r, w, gs):
    h, n_ = PreNorm(x, w, 1e-6, r if residual else None).unfused(x.dtype)
    return h, bitlinear_kernel.quantized_inputs(n_, gs, 1e-6)
  return unfused


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers import prenorm_kernel  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  keys = jax.random.split(jax.random.key(0), 8)
  x = jax.random.normal(keys[0], (f.rows, f.width), jnp.bfloat16)
  r = jax.random.normal(keys[1], (f.rows, f.width), jnp.bfloat16)
  w = jnp.ones((f.width,), jnp.float32)
  cots = [jax.random.normal(k, (f.rows, f.width), jnp.bfloat16) for k in keys[2:]]  # random: XLA can't simplify
  for n in (int(v) for v in f.scales.split(",")):
    residual = n == 1
    gs = jnp.ones((n, f.width), jnp.float32)
    for spec in f.impls.split(","):
      impl, *params = spec.split(":")
      if impl not in ("fused", "unfused", "rows"):
        raise app.UsageError(f"--impls: unfused, fused or rows:..., not {impl!r}")
      site = _site("unfused" if impl == "unfused" else "fused", n, residual)
      loss = lambda *a, site=site: sum(jnp.sum((c * v).astype(jnp.float32))
                                       for c, v in zip(cots, (site(*a)[0], *site(*a)[1])))
      fwd = jax.jit(site)
      bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
      ms = lambda fn: round(timing.median_time(fn, x, r, w, gs, repeats=f.repeats, back_to_back=10) * 1e3, 4)
      names = ("ROWS_PER_PROGRAM", "TILE_ELEMS", "BACKWARD_WARPS")
      with tiling.kernel_tiling(prenorm_kernel, names, spec, params if impl == "rows" else []):
        row = {"device": jax.devices()[0].device_kind, "date": datetime.date.today().isoformat(), "impl": spec,
               "rows": f.rows, "width": f.width, "scales": n, "residual": residual, "fwd_ms": ms(fwd),
               "fwd_bwd_ms": ms(bwd), "jax": jax.__version__,
               "command": "python -m benchmarks.prenorm_kernel " + " ".join(sys.argv[1:])}
      # The fused kernels' bytes (bf16): forward reads x (and the residual), writes h (with one) and n y_q;
      # backward reads h, its cotangent and n cotangents, writes dx; plus the forward again.
      unit = x.nbytes
      fwd_bytes = unit * ((3 if residual else 1) + n)
      row["fused_bytes_tb_per_s"] = round((2 * fwd_bytes + unit * (3 + n)) / row["fwd_bwd_ms"] / 1e9, 2)
      print(f"PRENORM scales={n} {spec:>16}  fwd {row['fwd_ms']:8.4f} ms   fwd+bwd {row['fwd_bwd_ms']:8.4f} ms   "
            f"({row['fused_bytes_tb_per_s']} TB/s at the fused bytes)", flush=True)
      with open(f.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
