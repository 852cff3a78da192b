"""The paper's fused-BitLinear ablation: a vanilla BitLinear (autodiff keeps the normalized and quantized
activations) vs ours (the backward recomputes norm and quantization from the layer input).

  python -m benchmarks.bitlinear_ablation [--layers=24 --width=1024 --seq_len=1024 --log2_batches=4,5,6,7,8]

Setting as the paper's: input size and sequence length 1024, batch and sequence flattened, a stack of
BitLinear layers (with a residual and SiLU between them) trained by forward + backward. Reports time and peak
memory per batch size for both; appends JSON lines to benchmarks/results/bitlinear_ablation.jsonl.
`--compile_only`: compile without running (the compiled temporaries alone; for a machine without the
accelerator, or with too little memory to run the vanilla layer). `--compile_only --topology=v5p:1x1x1`:
compile for one chip of a TPU with libtpu (`pip install -e .[tpu]`), on any machine.
"""

import datetime
import json
import statistics
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_integer("layers", 24, "BitLinear layers in the stack")
flags.DEFINE_integer("width", 1024, "input size (= output size) of each layer")
flags.DEFINE_integer("seq_len", 1024, "sequence length")
flags.DEFINE_string("log2_batches", "4,5,6,7,8", "log2 of the batch sizes")
flags.DEFINE_integer("repeats", 5, "timed repeats")
flags.DEFINE_string("out", "benchmarks/results/bitlinear_ablation.jsonl", "results file")
flags.DEFINE_bool("compile_only", False, "report the compiled temporaries without running the step")
flags.DEFINE_string("topology", "", "with --compile_only: compile for the first chip of this TPU topology")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers.bitlinear import bitlinear  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  key = jax.random.key(0)
  ws = jax.random.normal(key, (f.layers, f.width, f.width), jnp.float32) * 0.02
  gs = jnp.ones((f.layers, f.width), jnp.float32)

  def make(impl):
    def loss(params, x):
      w_all, g_all = params
      for l in range(f.layers):  # unrolled: each layer's residuals are visible to the memory planner
        x = x + jax.nn.silu(bitlinear(x, g_all[l], w_all[l], impl=impl))
      return jnp.mean(x.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss))

  sharding = None
  if f.topology:
    from mmfree_jax.train import aot  # pylint: disable=g-import-not-at-top
    if not f.compile_only:
      raise app.UsageError("--topology needs --compile_only")
    sharding = jax.sharding.SingleDeviceSharding(aot.topology_devices(aot.parse_topology(f.topology))[0])
  kind = next(iter(sharding.device_set)).device_kind if sharding else jax.devices()[0].device_kind
  rows = []
  for lb in (int(v) for v in f.log2_batches.split(",")):
    for impl in ("vanilla", "fused"):
      row = {"device": kind, "date": datetime.date.today().isoformat(), "impl": impl,
             "batch": 2 ** lb, "seq_len": f.seq_len, "width": f.width, "layers": f.layers, "jax": jax.__version__,
             "command": "python -m benchmarks.bitlinear_ablation " + " ".join(sys.argv[1:])}
      try:
        shape = (2 ** lb * f.seq_len, f.width)
        if f.compile_only:
          abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
          fn = make(impl).lower(jax.tree.map(abstract, (ws, gs)), abstract(jax.ShapeDtypeStruct(shape, jnp.bfloat16)))
          fn = fn.compile()
          mem = fn.memory_analysis()
          row["temp_gib"] = round(mem.temp_size_in_bytes / 2**30, 2) if mem else None
          row["compile_only"] = True
          rows.append(row)
          print(f"ABLATION batch 2^{lb} {impl:>8}: temporaries {row['temp_gib']} GiB (compiled, not run)", flush=True)
          continue
        x = jax.random.normal(jax.random.fold_in(key, lb), shape, jnp.bfloat16)
        fn = make(impl).lower((ws, gs), x).compile()
        mem = fn.memory_analysis()
        jax.block_until_ready(fn((ws, gs), x))
        ts = []
        for _ in range(f.repeats):
          t = time.perf_counter()
          jax.block_until_ready(fn((ws, gs), x))
          ts.append(time.perf_counter() - t)
        row["ms"] = round(statistics.median(ts) * 1e3, 2)
        row["temp_gib"] = round(mem.temp_size_in_bytes / 2**30, 2) if mem else None
        del x
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = type(e).__name__ + ": " + str(e).splitlines()[0][:200]
      rows.append(row)
      print(f"ABLATION batch 2^{lb} {impl:>8}: {row.get('ms', '-')} ms, temporaries {row.get('temp_gib', '-')} GiB "
            f"{row.get('error', '')}", flush=True)
  with open(f.out, "a") as fh:
    for row in rows:
      fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
