"""The paper's 370m MatMul-free LM (L=24, d=1024, 374,108,160 parameters) or, with `:transformer`, its Transformer++.

  python -m experiments.prepare_data --input='corpus/*.jsonl' --tokenizer=tokenizer.model --out=data/corpus
  python -m experiments.train --config=experiments/configs/370m.py --workdir=runs/370m \
      --config.data.path=data/corpus
  python -m experiments.train --config=experiments/configs/370m.py:transformer --workdir=runs/370m_tpp \
      --config.data.path=data/corpus

Recipe: 2048-token rows, 256 rows per step (0.5M tokens), AdamW (0.9, 0.95), clip 1.0, 1000 warmup steps,
weight decay 0.1; MatMul-free: peak LR 4e-3, cosine with the LR halved at the midpoint; Transformer++: peak LR 3e-4,
cosine to 0.1x. Steps are set for the paper's 15B tokens. The paper trained on SlimPajama with a 32k
SentencePiece vocabulary; README.md lists its zero-shot results.
Smoke run without data: add `--config.data.source=embedded --config.train.steps=20 --config.train.global_batch=8`.
Speed on one H100 (benchmarks/README.md), 16 x 2048 tokens per step: this preset 144.6k tokens/s in 27.5 GiB
(any backend); its GPU configuration, `--config=experiments/configs/370m.py:gpu`, 185k-188k in 22.4-22.6 GiB:
micro-batches of 8 rows per GPU, the layers unrolled, no remat, the BitLinear kernels saving only their inputs but
the down, o and gate/up projections' quantized ones, the weights quantized once per pass, the blocks' norms inside
the kernels (`base.fastest_on_gpu`).
  python -m benchmarks.train_step --config=experiments/configs/370m.py:gpu --batch=16 --steps=10
The official code: 96.7k in 45.3 GiB.
"""

from experiments.configs import base

TOKENS = 15e9


def get_config(arg: str | None = None):
  c = base.sized("370m", base.parse_arg(arg, gpu=True))
  c.data.source = "shards"
  c.model.remat = "save_proj"  # fastest policy measured on one H100 (benchmarks/README.md)
  if base.wants_gpu(arg):  # one H100, 16 rows per step: 185k-188k tokens/s in 22.4-22.6 GiB
    base.fastest_on_gpu(c, micro_batch=8)
  c.data.seq_len = 2048
  c.train.global_batch = 256
  c.train.steps = int(TOKENS // (c.train.global_batch * c.data.seq_len))
  c.eval.every_steps = 1000
  c.eval.batches = 16
  c.checkpoint.every_steps = 1000
  return c
