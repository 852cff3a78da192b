"""The decode kernel (`inference.ternary_kernel`) against XLA's BitLinear, per matrix shape of a model.

  python -m benchmarks.ternary_kernel [--config=experiments/configs/370m.py] [--block_elems=4096,16384]
      [--num_warps=2,4,8]

For each BitLinear shape of the config at batch 1 (f/i/g as one group of three, o, gate/up, down, head): the
kernel's time per call for each (block_elems, num_warps), XLA's time for the same product (MODE=off), and the
kernel's largest difference from XLA in units of one activation code (`1/s_x * 1/s_w`; see the kernel's
docstring). Also a tiny float32 shape, as the tests use. Times: median of 200 calls inside one compiled loop.
"""

import time

from absl import app
from absl import flags

flags.DEFINE_string("config", "experiments/configs/370m.py", "Model config (the shapes).")
flags.DEFINE_list("block_elems", ["4096", "16384"], "Values of ternary_kernel.BLOCK_ELEMS to try.")
flags.DEFINE_list("num_warps", ["4"], "Values of ternary_kernel.NUM_WARPS to try.")
flags.DEFINE_integer("calls", 200, "Calls per timing.")

FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmfree_jax.inference import packed, ternary_kernel  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers.bitlinear import quantize_activations  # pylint: disable=g-import-not-at-top
  from mmfree_jax.layers.norm import rms_normalize  # pylint: disable=g-import-not-at-top
  from mmfree_jax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top
  from mmfree_jax.scaling.sweep import load_module  # pylint: disable=g-import-not-at-top

  m = ModelConfig.from_config(load_module(FLAGS.config).get_config().model)
  d, ff, vocab = m.d_model, m.ff, m.vocab_size
  shapes = [("fig", d, d, 3, 1, jnp.bfloat16), ("o", d, d, 1, 1, jnp.bfloat16),
            ("gate_up", d, 2 * ff, 1, 1, jnp.bfloat16), ("down", ff, d, 1, 1, jnp.bfloat16),
            ("head", d, vocab, 1, 1, jnp.bfloat16), ("tiny f32", 32, 32, 3, 8, jnp.float32)]
  layers = 3
  for name, k_in, n_out, groups, rows, dtype in shapes:
    keys = jax.random.split(jax.random.key(k_in * n_out), layers * groups + 1)
    nodes = [packed.to_packed({"kernel": jax.random.normal(k, (k_in, n_out)),
                               "norm_scale": 1 + 0.3 * jax.random.normal(k, (k_in,))}) for k in keys[1:]]
    stack = lambda key: jnp.stack([n[key] for n in nodes]).reshape(layers, groups, *nodes[0][key].shape)
    group = {"packed": ternary_kernel.pad_rows(stack("packed"), axis=2, k_in=k_in),
             "norm_scale": stack("norm_scale"), "inv_sw": stack("inv_sw"), "layer": jnp.int32(layers - 1)}
    x = jax.random.normal(keys[0], (rows, k_in), dtype)

    def timed(mode, group=group, x=x):  # mode "on": the kernel (compiled on GPUs), "off": XLA
      ternary_kernel.MODE = mode
      jax.clear_caches()

      @jax.jit
      def loop(x, group):
        def body(_, acc):
          outs = packed.ternary_linear_group(x + acc[0, 0].astype(x.dtype), group)
          return acc + sum(o.reshape(o.shape[0], -1)[:1, :1].astype(jnp.float32) for o in outs) * 0
        return jax.lax.fori_loop(0, FLAGS.calls, body, jnp.zeros((1, 1), jnp.float32))

      one = jax.jit(lambda x, group: jnp.stack([o.reshape(len(x), -1)
                                                for o in packed.ternary_linear_group(x, group)]))
      out = np.asarray(one(x, group), np.float32)
      jax.block_until_ready(loop(x, group))
      times = []
      for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(loop(x, group))
        times.append((time.perf_counter() - t) / FLAGS.calls)
      return sorted(times)[2], out

    t_xla, ref = timed("off")
    line = f"{name:<9} K={k_in:<5} N={n_out:<6} G={groups} M={rows}  xla {t_xla * 1e6:7.1f} us"
    inv_sx = [np.asarray(quantize_activations(rms_normalize(x, 1e-6) * nd["norm_scale"])[1])
              for nd in nodes[-groups:]]
    unit = np.stack([s * float(nd["inv_sw"]) for s, nd in zip(inv_sx, nodes[-groups:])])  # [G, M, 1]
    for be in FLAGS.block_elems:
      for nw in FLAGS.num_warps:
        ternary_kernel.BLOCK_ELEMS, ternary_kernel.NUM_WARPS = int(be), int(nw)
        t, got = timed("on")
        codes = np.abs(got - ref) / unit
        line += f" | {be}/{nw}w {t * 1e6:6.1f} us, max diff {codes.max():.2f} codes"
    print(line, flush=True)


if __name__ == "__main__":
  app.run(main)
