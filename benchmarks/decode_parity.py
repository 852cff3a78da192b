"""Prefill + decode logits of the tiny float32 test model on the accelerator, path by path, against XLA on the CPU.

  python -m benchmarks.decode_parity [--seed=3]

The quantizers amplify last-bit differences (`shared/spec/anchors.md`, Numerics), so an accelerator's decoding is
checked against the CPU's on the same float32 program rather than by a loose tolerance: each path (the decode
kernel, XLA's BitLinear with the int8 and with the bf16 product) runs 4 prompt tokens and 8 teacher-forced
decode steps of 2 rows; the table gives the largest difference relative to the logits' range and the share of
logits within 1e-4 of it, per path and per position (0 = prefill). Exits 1 if the library's default path (what
`inference.generation` runs) is not within 1e-5.
"""

import sys

from absl import app
from absl import flags

flags.DEFINE_integer("seed", 3, "Seed of the prompt tokens.")


def _logits(fam, cfg, params, tokens):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.inference import generation as gen  # pylint: disable=g-import-not-at-top
  w = fam.prepare(cfg, params)
  first, cache = gen.prefill(cfg, w, tokens[:, :4], jnp.ones((tokens.shape[0], 4), bool), 16)

  def one(cache, tok):
    x, cache = fam.hidden(cfg, w, tok[:, None], None, cache)
    return cache, fam.logits(cfg, w, x)[:, 0]

  _, later = jax.lax.scan(one, cache, tokens[:, 4:].T)
  return jnp.concatenate([first[:, None], jnp.swapaxes(later, 0, 1)], axis=1)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmfree_jax.inference import generation as gen, packed, ternary_kernel  # pylint: disable=g-import-not-at-top
  from mmfree_jax.models import model_config  # pylint: disable=g-import-not-at-top
  from tests.inference.helpers import tiny_cfg, tiny_params  # pylint: disable=g-import-not-at-top

  cfg_d = tiny_cfg("hgrn_bit", "float32")
  cfg = model_config(cfg_d)
  params = packed.pack_params(tiny_params(cfg_d, head_gain=5.0), jnp.float32)
  fam = gen.family(cfg)
  tokens = jax.random.randint(jax.random.key(flags.FLAGS.seed), (2, 12), 3, 97)
  default = (ternary_kernel.MODE, packed.PRODUCT)

  def run(device, mode, product):
    ternary_kernel.MODE, packed.PRODUCT = mode, product
    jax.clear_caches()  # both are read when a function is traced
    dev = jax.devices(device)[0]
    with jax.default_device(dev):
      out = np.asarray(jax.jit(_logits, static_argnums=(0, 1))(fam, cfg, jax.device_put(params, dev),
                                                               jax.device_put(tokens, dev)))
    ternary_kernel.MODE, packed.PRODUCT = default
    return out

  ref = run("cpu", "off", "int8")
  accel = jax.default_backend()
  paths = {"library default": default, "XLA, int8 product": ("off", "int8"), "XLA, bf16 product": ("off", "bf16")}
  if accel == "gpu":
    paths["decode kernel"] = ("on", None)
  scale = np.abs(ref).max()
  print(f"{accel} vs XLA on the CPU (tiny float32 model, 4 prompt tokens + 8 decode steps, 2 rows):")
  worst_default = None
  for name, (mode, product) in paths.items():
    err = np.abs(run(accel, mode, product) - ref) / scale
    per_pos = " ".join(f"{v:.2f}" for v in np.mean(err <= 1e-4, axis=(0, 2)))
    print(f"  {name:<20} max {err.max():.1e}  within 1e-4: {np.mean(err <= 1e-4):.2f}  by position: {per_pos}")
    if name == "library default":
      worst_default = err.max()
  sys.exit(0 if worst_default <= 1e-5 else 1)


if __name__ == "__main__":
  app.run(main)
