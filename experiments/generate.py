"""Generate text from a checkpoint: `python -m experiments.generate --workdir=DIR --prompt="def "`.

DIR is a training workdir (newest checkpoint), an imported one, or a packed export (`experiments.export`).
Several --prompt flags make one batch (left-padded); greedy unless --temperature > 0.
"""

from absl import app
from absl import flags

flags.DEFINE_string("workdir", None, "Training workdir or packed export directory.")
flags.DEFINE_multi_string("prompt", [""], "Prompt text (repeat for a batch).")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 0, "Prompts per compiled call (0 = all).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmfree_jax.inference import generate, load  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  loaded = load(f.workdir)
  tok = loaded.tokenizer
  prompts = [[tok.bos_id] + tok.encode(p) for p in f.prompt]
  outs = generate(loaded.model_cfg, loaded.params, prompts, max_new_tokens=f.max_new_tokens,
                  temperature=f.temperature, top_p=f.top_p, top_k=f.top_k, seed=f.seed, eos_id=tok.eos_id,
                  pad_id=tok.pad_id, batch_size=f.batch_size or None)
  for p, o in zip(f.prompt, outs):
    print(f"{p!r} -> {tok.decode(o)!r}", flush=True)


if __name__ == "__main__":
  app.run(main)
