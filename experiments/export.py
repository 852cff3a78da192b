"""Export a MatMul-free checkpoint for inference: `python -m experiments.export --workdir=DIR --out=PATH`.

Every BitLinear weight is quantized once to ternary and packed 4 per byte, with its per-matrix scale 1/s_w and
its norm scale (float32); embeddings and the other norms are stored in --float_dtype (bfloat16). The export
(`PATH/params`, `PATH/config.json`) loads in experiments.generate and experiments.evaluate and is never
re-quantized (weight quantization is not idempotent).
"""

from absl import app
from absl import flags

flags.DEFINE_string("workdir", None, "Training (or imported) workdir.")
flags.DEFINE_string("out", None, "Export directory.")
flags.DEFINE_string("float_dtype", "bfloat16", "dtype of embeddings and non-BitLinear norms.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmfree_jax.inference.loading import export_packed  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  s = export_packed(f.workdir, f.out, f.float_dtype, f.step)
  print(f"exported step {s['step']} to {f.out}: {s['packed_bytes'] / 2**20:.2f} MiB "
        f"(latent checkpoint parameters {s['latent_bytes'] / 2**20:.2f} MiB)", flush=True)


if __name__ == "__main__":
  app.run(main)
