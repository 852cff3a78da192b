"""The paper's 1.3b MatMul-free LM (L=24, d=2048, 1,364,779,008 parameters) or, with `:transformer`, its Transformer++.

  python -m experiments.prepare_data --input='corpus/*.jsonl' --tokenizer=tokenizer.model --out=data/corpus
  python -m experiments.train --config=experiments/configs/1p3b.py --workdir=runs/1p3b \
      --config.data.path=data/corpus
  python -m experiments.train --config=experiments/configs/1p3b.py:transformer --workdir=runs/1p3b_tpp \
      --config.data.path=data/corpus

Recipe: 2048-token rows, 256 rows per step (0.5M tokens), AdamW (0.9, 0.95), clip 1.0, 1000 warmup steps,
weight decay 0.1; MatMul-free: peak LR 2.5e-3, cosine with the LR halved at the midpoint; Transformer++: peak LR 3e-4,
cosine to 0.1x. Steps are set for the paper's 100B tokens. The paper trained on SlimPajama with a 32k
SentencePiece vocabulary; README.md lists its zero-shot results.
Smoke run without data: add `--config.data.source=embedded --config.train.steps=20 --config.train.global_batch=8`.
Speed on one H100 (benchmarks/README.md), 8 x 2048 tokens per step: this preset 52.6k tokens/s in 39.9 GiB; its
GPU configuration, `--config=experiments/configs/1p3b.py:gpu`, 60.0k-61.2k (per H100) in 37.7 GiB:
micro-batches of 4 rows per GPU, the layers unrolled, no remat, the BitLinear kernels saving only their inputs but
the down, o and gate/up projections' quantized ones, the blocks' norms inside the kernels (`base.fastest_on_gpu`).
The official code: 39.9k in 57.2 GiB.
  python -m benchmarks.train_step --config=experiments/configs/1p3b.py:gpu --batch=8 --steps=10
"""

from experiments.configs import base

TOKENS = 100e9


def get_config(arg: str | None = None):
  c = base.sized("1p3b", base.parse_arg(arg, gpu=True))
  c.data.source = "shards"
  c.model.remat = "save_proj"  # fastest policy measured on one H100 (benchmarks/README.md)
  if c.model.arch == "transformer":  # unrolled: +4% on the H100, 19 s to compile (the MatMul-free LM: 122 s at 370m)
    c.model.unroll_layers = c.model.n_layers
  else:  # BitLinear's activation-path kernel on GPUs: 49.9k -> 50.3k tokens/s, 40.05 -> 39.49 GiB on one H100
    c.model.bitlinear = "auto"
    c.model.quantize_weights_once = True  # one H100 (with the GLU kernel): 51.5k -> 52.2k tokens/s, 39.89 GiB
  if base.wants_gpu(arg):  # one H100, 8 rows per step: 60.0k-61.2k tokens/s in 37.7 GiB
    base.fastest_on_gpu(c, micro_batch=4)
  c.data.seq_len = 2048
  c.train.global_batch = 256
  c.train.steps = int(TOKENS // (c.train.global_batch * c.data.seq_len))
  c.eval.every_steps = 1000
  c.eval.batches = 16
  c.checkpoint.every_steps = 1000
  return c
