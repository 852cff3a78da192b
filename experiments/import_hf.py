"""Import a released MatMul-free checkpoint: `python -m experiments.import_hf --hf_dir=DIR --workdir=OUT`.

DIR holds config.json, model.safetensors (or shards + model.safetensors.index.json) and tokenizer.model, as
downloaded from the Hub (e.g. ridger/MMfreeLM-370M). OUT becomes a training workdir at step 0. To fine-tune,
pass the same --config (and overrides) here and to experiments.train: the checkpoint holds that config's
optimizer and data-iterator state. Without --config the base config on the embedded corpus is used.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

flags.DEFINE_string("hf_dir", None, "Local directory of the released checkpoint.")
flags.DEFINE_string("workdir", None, "Output workdir.")
config_flags.DEFINE_config_file("config", None, "Optional fine-tuning config (path[:arg]).", lock_config=False)
flags.mark_flags_as_required(["hf_dir", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmfree_jax.inference.hf_import import import_hf  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  s = import_hf(f.hf_dir, f.workdir, f.config)
  print(f"imported {s['tensors']:,} parameters ({s['model']}) into {f.workdir}", flush=True)


if __name__ == "__main__":
  app.run(main)
