"""Summarize a config: architecture, exact parameter counts, FLOPs per token.

  python -m experiments.info --config=experiments/configs/1p3b.py[:transformer] [--config.…]

Prints a human-readable summary and, as the last line of stdout, one JSON object with `arch`, `params`,
`non_embedding_params`, `forward_flops_per_token`, `train_flops_per_token` (the conventions of
mmfree_jax.flops: a multiply-add is 2 FLOPs, a ternary accumulate counts as a multiply-add, causal attention
counts the causal half, training = 3 x forward), `six_n` and the shape.
"""

import json

from absl import app
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)


def summary(config) -> dict:
  from mmfree_jax import flops  # pylint: disable=g-import-not-at-top
  from mmfree_jax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top
  m = ModelConfig.from_config(config.model)
  counts = flops.param_counts(config.model)
  f = flops.flops_per_token(config.model, int(config.data.seq_len))
  tokens = int(config.train.steps) * int(config.train.global_batch) * int(config.data.seq_len)
  return {
      "arch": m.arch, "params": counts["params"], "non_embedding_params": counts["non_embedding_params"],
      "forward_flops_per_token": f["forward"], "train_flops_per_token": f["train"],
      "six_n": flops.six_n(config.model), "d_model": m.d_model, "n_layers": m.n_layers, "d_ff": m.ff,
      "vocab_size": m.vocab_size, "seq_len": int(config.data.seq_len), "train_tokens": tokens,
      "train_flops": f["train"] * tokens,
  }


def main(argv):
  del argv
  s = summary(app.flags.FLAGS.config)
  name = {"hgrn_bit": "MatMul-free LM (HGRNBit)", "transformer": "Transformer++"}[s["arch"]]
  print(f"{name}: L={s['n_layers']} d={s['d_model']} I={s['d_ff']} V={s['vocab_size']}")
  print(f"  parameters            {s['params']:>16,}  (non-embedding {s['non_embedding_params']:,})")
  print(f"  forward FLOPs/token   {s['forward_flops_per_token']:>16,.0f}  at sequence length {s['seq_len']}")
  print(f"  training FLOPs/token  {s['train_flops_per_token']:>16,.0f}  (6N: {s['six_n']:,})")
  print(f"  training run          {s['train_tokens']:>16,} tokens, {s['train_flops']:.3e} FLOPs")
  print(json.dumps(s))


if __name__ == "__main__":
  app.run(main)
