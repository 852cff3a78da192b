"""Scaling-law sweep: MatMul-free LM vs Transformer++, five sizes per family, on the embedded byte data.

Run the whole default sweep on one machine (about 10 minutes of H100 compute for the ten points: a bare
training step, AdamW in bf16 without rematerialization, took 370 s for all the points' steps together plus about
10 s of compilation per point on one H100; from 13 model TFLOP/s at d=128 to 55 (MatMul-free) and 79
(Transformer++) at d=384; the trainer's evaluation, checkpoints and data add to that; measured through the
trainer: Transformer++ d=320 and d=384 took 42 s and 91 s of steps, 10.6 and 27.6 ms per step). What it should
reach: the held-out losses in `experiments/results/results.jsonl` (d=128: 2.17 MatMul-free, 2.35
Transformer++; d=384: 1.13 and 1.04) and the crossing in `experiments/results/fit.json`.

  python -m experiments.sweep --config=experiments/configs/scaling.py --launcher=local --sweep_dir=/tmp/scaling
  python -m experiments.fit_scaling /tmp/scaling/results.jsonl --out /tmp/scaling/fit

One point alone: `python -m experiments.train --config=experiments/configs/scaling.py:mmfree-d256 --workdir=DIR`.
`get_config(name)` returns the full config of the point `name`; `sweep(arg)` lists the points of a grid
(`arg` = "" for the default grid, "cpu_smoke" for a tiny grid of two points per family that runs on a CPU in
seconds). Point names are `<family>-d<width>`, prefixed with `cpu_smoke-` for the tiny grid.

Rules (N = non-embedding parameters, `mmfree_jax.flops`):
  * Width/depth: d_model in {128, 192, 256, 320, 384}, n_layers = d / 64 (aspect ratio 64), Transformer++
    heads of dimension 64 (n_heads = d / 64). GLU width d_ff = 64 * ceil(8d/3 / 64), the 8/3 ratio of the
    reference rule without its rounding to 256, which would distort such small widths. Same shapes for both
    families: N from 0.48M to 10.8M.
  * Tokens: 10 N (rounded up to whole steps, and the step count to a multiple of 50). Training compute
    spans 1.4e13 .. 7.1e15 FLOPs per family (2.7 decades), 2.1e16 FLOPs for the whole sweep.
  * Batch: sequences of 256 byte tokens (`data.source="embedded"`, 259 symbols, vocab_size 384);
    32 sequences per step for d <= 192, 64 for d <= 320, 128 above.
  * Learning rate: `peak_lr = min(lr_max, lr_ref * (N / N_ref) ** (-1/3))`, anchored on the paper's 370M
    models (N_ref = 3.41e8 non-embedding parameters). MatMul-free: lr_ref 4e-3, lr_max 1e-2, schedule
    cosine_halve (the paper's; the rule gives 2.6e-3 and 2.0e-3 at 1.3B and 2.7B, against the paper's 2.5e-3 and
    1.5e-3). Transformer++: lr_ref 3e-4, lr_max 3e-3, cosine to 0.1x.
  * Warmup 5% of the steps (at least 10); held-out evaluation every tenth of the run (8 batches) and at the end;
    checkpoints every fifth. No rematerialization (the models are small).
"""

import math
from typing import Any

import ml_collections

from experiments.configs import base
from mmfree_jax import flops

FAMILIES = {"mmfree": "hgrn_bit", "transformer": "transformer"}
WIDTHS = (128, 192, 256, 320, 384)
ASPECT = 64  # d_model / n_layers
HEAD_DIM = 64
TOKENS_PER_PARAM = 10
SEQ_LEN = 256
VOCAB = 384  # the embedded byte data has 259 symbols
N_REF = 3.41e8  # non-embedding parameters of the paper's 370M models
LR_RULES = {"mmfree": (4e-3, 1e-2), "transformer": (3e-4, 3e-3)}  # family -> (lr_ref, lr_max)
SMOKE = "cpu_smoke"
SMOKE_WIDTHS = (32, 64)


def peak_lr(family: str, non_embedding_params: float) -> float:
  """The family's learning-rate rule (module docstring)."""
  lr_ref, lr_max = LR_RULES[family]
  return min(lr_max, lr_ref * (non_embedding_params / N_REF) ** (-1 / 3))


def _batch(d: int) -> int:
  return 32 if d <= 192 else 64 if d <= 320 else 128


def _model(c: ml_collections.ConfigDict, family: str, d: int, n_layers: int, n_heads: int) -> None:
  m = c.model
  m.arch = FAMILIES[family]
  m.vocab_size = VOCAB
  m.d_model = d
  m.n_layers = n_layers
  m.n_heads = n_heads
  m.d_ff = 64 * math.ceil(8 * d / 3 / 64)
  m.tie_embeddings = False
  m.remat = "none"


def _point_config(family: str, d: int, smoke: bool) -> ml_collections.ConfigDict:
  c = base.get_base_config()
  c.data.source = "embedded"
  if smoke:
    _model(c, family, d, n_layers=1 if d <= 32 else 2, n_heads=2)
    c.data.seq_len, c.train.global_batch, steps = 32, 4, 4
  else:
    _model(c, family, d, n_layers=d // ASPECT, n_heads=d // HEAD_DIM)
    c.data.seq_len, c.train.global_batch = SEQ_LEN, _batch(d)
    tokens = TOKENS_PER_PARAM * flops.param_counts(c.model)["non_embedding_params"]
    steps = 50 * math.ceil(tokens / (c.data.seq_len * c.train.global_batch) / 50)
  c.train.steps = steps
  c.train.log_every = max(1, min(10, steps // 20))
  c.optim.peak_lr = peak_lr(family, flops.param_counts(c.model)["non_embedding_params"])
  c.optim.schedule = "cosine_halve" if family == "mmfree" else "cosine"
  c.optim.warmup_steps = max(1 if smoke else 10, steps // 20)
  c.eval.every_steps = max(1, steps // 10) if not smoke else 2
  c.eval.batches = 1 if smoke else 8
  c.checkpoint.every_steps = max(1, steps // 5) if not smoke else 2
  if smoke:
    c.model.dtype = "float32"
    c.checkpoint.async_save = False
  return c


def _grid(smoke: bool) -> dict[str, tuple[str, int]]:
  widths = SMOKE_WIDTHS if smoke else WIDTHS
  prefix = f"{SMOKE}-" if smoke else ""
  return {f"{prefix}{family}-d{d}": (family, d) for family in FAMILIES for d in widths}


def _describe(name: str, family: str, c: ml_collections.ConfigDict) -> dict[str, Any]:
  counts = flops.param_counts(c.model)
  tokens = c.train.steps * c.train.global_batch * c.data.seq_len
  return dict(
      name=name, family=family, arch=c.model.arch, d_model=c.model.d_model, n_layers=c.model.n_layers,
      n_heads=c.model.n_heads, d_ff=c.model.d_ff, params=counts["params"],
      non_embedding_params=counts["non_embedding_params"], tokens=tokens,
      flops=flops.train_flops(c.model, c.data.seq_len, tokens),
      six_nd=float(flops.six_n(c.model)) * tokens, steps=c.train.steps, global_batch=c.train.global_batch,
      seq_len=c.data.seq_len, peak_lr=c.optim.peak_lr)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The full config of the point named `arg` (a name listed by `sweep()` or `sweep("cpu_smoke")`)."""
  name = (arg or "").strip()
  for smoke in (False, True):
    grid = _grid(smoke)
    if name in grid:
      return _point_config(*grid[name], smoke=smoke)
  names = sorted(_grid(False)) + sorted(_grid(True))
  raise ValueError(f"unknown scaling point {name!r}; expected one of {names}")


def sweep(arg: str | None = None) -> list[dict[str, Any]]:
  """The points of a grid: "" (default) or "cpu_smoke". Each a dict with name, family, arch, params, tokens,
  flops (training FLOPs, `mmfree_jax.flops.train_flops`) and the shape and recipe fields."""
  arg = (arg or "").strip()
  if arg not in ("", SMOKE):
    raise ValueError(f"unknown sweep {arg!r}; expected '' or {SMOKE!r}")
  smoke = arg == SMOKE
  return [_describe(name, family, _point_config(family, d, smoke))
          for name, (family, d) in _grid(smoke).items()]
