"""A 13b MatMul-free LM (or, with `:transformer`, its Transformer++): past the paper's sizes, for TPU slices.

Shape rule: Llama's width and depth at this size (d_model=5120, n_layers=40), the family's GLU width
`I = 256 * ceil(int(8d/3) / 256)`, the paper's 32000-token vocabulary; Transformer++ heads of dimension 128.
Peak learning rate from the scaling sweep's rule `lr_ref * (N / N_ref) ** (-1/3)` (experiments/configs/scaling.py).
Batch: 1024 rows of 2048 tokens per step; steps set for 1e23 training FLOPs (`mmfree_jax.flops`).
Full rematerialization; on a TPU slice shard everything over the slice (FSDP) and use gradient accumulation
for activation memory. Check the fit before renting the slice (docs/tpu.md lists the ones that fit):

  python -m experiments.compile_tpu --config=experiments/configs/13b.py --topology=v5p:4x4x4 --fsdp \
      --config.train.grad_accum=8
  python -m experiments.train --config=experiments/configs/13b.py --workdir=runs/13b \
      --config.data.path=data/corpus --config.mesh.data=1 --config.mesh.fsdp=-1
"""

from experiments.configs import base
from experiments.configs import scaling
from mmfree_jax import flops

COMPUTE = 1e23  # training FLOPs
LAYERS, WIDTH, HEADS = 40, 5120, 40


def get_config(arg: str | None = None):
  c = base.get_base_config()
  arch = base.parse_arg(arg)
  c.model.arch = arch
  c.model.n_layers, c.model.d_model, c.model.n_heads = LAYERS, WIDTH, HEADS
  c.model.remat = "full"
  family = "mmfree" if arch == "hgrn_bit" else "transformer"
  c.optim.peak_lr = scaling.peak_lr(family, flops.param_counts(c.model)["non_embedding_params"])
  c.optim.schedule = "cosine_halve" if family == "mmfree" else "cosine"
  c.optim.warmup_steps = 2000
  c.data.source = "shards"
  c.data.seq_len = 2048
  c.train.global_batch = 1024
  c.train.steps = int(COMPUTE // (flops.flops_per_token(c.model, c.data.seq_len)["train"]
                                  * c.train.global_batch * c.data.seq_len))
  c.eval.every_steps = 1000
  c.eval.batches = 16
  c.checkpoint.every_steps = 500
  return c
