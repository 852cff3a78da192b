"""Tiny MatMul-free LM (or Transformer++) on the embedded corpus: trains in a few minutes on 2 CPU cores.

  python -m experiments.train --config=experiments/configs/tiny.py --workdir=workdirs/tiny
  python -m experiments.train --config=experiments/configs/tiny.py:transformer --workdir=workdirs/tiny_tpp

Model: 4 layers, d_model 128 (about 1.2M parameters), byte-level tokens (vocab 259, padded to 384), rows of 256
tokens, 16 rows per step, 300 steps (1.2M tokens). Data: the Python standard library's own source files
(`data.source=embedded`), 2% of files held out.
Expected (2-core CPU, MatMul-free): held-out loss falls from ~5.95 (uniform over 384 symbols) to roughly
2.3 nats/byte (measured: 2.33 after 300 steps; 3-6 minutes), then prints a sampled continuation (temperature 0.8).
"""

from experiments.configs import base


def get_config(arg: str | None = None):
  c = base.get_base_config()
  c.model.arch = base.parse_arg(arg)
  c.model.vocab_size = 384
  c.model.d_model = 128
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.dtype = "float32"  # CPU: bfloat16 matmuls are emulated and slower
  c.model.remat = "none"
  c.data.source = "embedded"
  c.data.seq_len = 256
  c.train.global_batch = 16
  c.train.steps = 300
  c.train.log_every = 10
  c.train.sample_prompt = "def "
  c.train.sample_tokens = 80
  c.train.sample_temperature = 0.8  # greedy decoding of so small a model repeats one word
  c.optim.warmup_steps = 30
  c.optim.peak_lr = 4e-3 if c.model.arch == "hgrn_bit" else 2e-3
  c.eval.every_steps = 100
  c.eval.batches = 4
  c.checkpoint.every_steps = 100
  return c
