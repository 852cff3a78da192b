"""The full set of config fields, with defaults. Every other config file starts from `get_base_config()`.

Field groups:
  model       the architecture (`arch` = "hgrn_bit" for the MatMul-free LM, "transformer" for Transformer++).
  data        where tokens come from and how rows are packed.
  optim       AdamW, clipping, learning-rate and weight-decay schedules.
  train       steps, batch, seed, gradient accumulation, logging cadence, what to do on a non-finite loss.
  eval        held-out evaluation cadence and size.
  mesh        device mesh axis sizes (-1 = all remaining devices) and the logical-axis rules.
  checkpoint  Orbax checkpoint cadence and retention.

A config file is documentation: its docstring gives the exact command and what it should reach.
"""

import ml_collections

# name -> (n_layers, d_model, transformer heads, peak lr MatMul-free, peak lr Transformer++, tie embeddings)
SIZES = {
    "370m": (24, 1024, 32, 4e-3, 3e-4, True),
    "1p3b": (24, 2048, 32, 2.5e-3, 3e-4, False),
    "2p7b": (32, 2560, 32, 1.5e-3, 3e-4, False),
}

ARCHS = ("hgrn_bit", "transformer")


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.arch = "hgrn_bit"
  m.vocab_size = 32000
  m.d_model = 1024
  m.n_layers = 24
  m.d_ff = 0  # 0: the reference rule I = 256 * ceil(int(d * 4 * 2/3) / 256)
  m.n_heads = 16  # Transformer++ only
  m.rope_base = 10000.0  # Transformer++ only
  m.tie_embeddings = False  # Transformer++ only; the MatMul-free LM is always untied
  m.norm_eps = 1e-6
  m.param_dtype = "float32"
  m.dtype = "bfloat16"  # compute dtype; the loss and the recurrence state are always float32
  m.scan_impl = "auto"  # sequential | associative | chunked | pallas (GPU kernel) | auto (pallas on GPUs)
  m.scan_chunk = 128  # chunk length of the chunked scan
  # vanilla (autodiff) | fused (recompute norm + quantization) | int8 | pallas | pallas_fused | auto
  m.bitlinear = "vanilla"
  # the GLU down projection's impl ("": m.bitlinear's); e.g. pallas among pallas_fused layers keeps its quantized
  # input for the backward instead of recomputing it
  m.down_bitlinear = ""
  m.o_bitlinear = ""  # the MLGRU output projection's, as down_bitlinear
  m.gate_bitlinear = ""  # the GLU gate/up projection's, as down_bitlinear
  # MatMul-free: quantize every layer's weights once per forward pass, before the layer loop (not per use; the same
  # values; needs bitlinear vanilla / pallas / pallas_fused / auto)
  m.quantize_weights_once = False
  # MatMul-free: each block's two RMSNorms (and the residual add before the GLU's) computed inside the activation
  # kernels of the BitLinears they feed (bitlinear pallas / pallas_fused / auto on GPUs; elsewhere as before)
  m.fuse_block_norms = False
  m.attention_impl = "xla"  # xla | cudnn (jax.nn.dot_product_attention implementation)
  m.remat = "full"  # none | full | save_dots | save_proj (policy of nn.remat around each block)
  m.unroll_layers = 1  # layers per iteration of the layer loop (n_layers: unrolled, no loop; longer compile)
  m.loss_chunk = 0  # > 0: LM head + cross-entropy over this many positions at a time (less memory, 1 more head fwd)

  c.data = d = ml_collections.ConfigDict()
  d.source = "embedded"  # embedded (the Python standard library's source, byte tokens) | shards
  d.path = ""  # shards: a directory written by experiments.prepare_data
  d.seq_len = 2048
  d.shuffle_seed = 0
  d.heldout_fraction = 0.02  # embedded source: fraction of files held out for evaluation
  d.prefetch = 2
  d.num_workers = 0  # grain worker processes (0: read in the main process)

  c.optim = o = ml_collections.ConfigDict()
  o.peak_lr = 4e-3
  o.warmup_steps = 1000
  o.schedule = "cosine_halve"  # cosine (warmup, cosine to floor) | cosine_halve (the paper's MatMul-free recipe)
  o.min_lr_ratio = 0.1
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.wd_schedule = "constant"  # constant | two_stage (weight_decay in the first half, 0 after)
  o.clip_norm = 1.0

  c.train = t = ml_collections.ConfigDict()
  t.steps = 10000
  t.global_batch = 256  # sequences per optimizer step, over all processes
  t.grad_accum = 1  # micro-batches per step
  t.micro_batch = 0  # rows per device and micro-batch: sets grad_accum from the mesh (0: grad_accum as given)
  t.seed = 0
  t.log_every = 10
  t.on_nonfinite = "skip"  # skip (drop the update, keep going) | stop (keep the last good checkpoint, exit)
  t.sample_prompt = ""  # printed sample at the end of training ("" = none)
  t.sample_tokens = 0
  t.sample_temperature = 0.0  # 0 = greedy; the sample is drawn with train.seed

  c.eval = e = ml_collections.ConfigDict()
  e.every_steps = 500
  e.batches = 8

  c.mesh = ms = ml_collections.ConfigDict()
  ms.data = -1
  ms.fsdp = 1
  ms.tensor = 1
  ms.slices = 1  # multi-slice: the data axis spans slices over the data-center network

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.every_steps = 1000
  ck.keep = 3
  ck.keep_period = 0  # also keep every N-th step forever (0 = off)
  ck.async_save = True

  return c


def sized(name: str, arch: str) -> ml_collections.ConfigDict:
  """The base config with one of the paper's sizes and the family's recipe filled in."""
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
  n_layers, d_model, n_heads, lr_mmfree, lr_tpp, tie = SIZES[name]
  c = get_base_config()
  c.model.arch = arch
  c.model.n_layers = n_layers
  c.model.d_model = d_model
  c.model.n_heads = n_heads
  if arch == "transformer":
    c.model.tie_embeddings = tie
    c.optim.peak_lr = lr_tpp
    c.optim.schedule = "cosine"
  else:
    c.optim.peak_lr = lr_mmfree
    c.optim.schedule = "cosine_halve"
  return c


def _tokens(arg: str | None) -> list[str]:
  return [t.strip() for t in (arg or "").split(",") if t.strip()]


def parse_arg(arg: str | None, gpu: bool = False) -> str:
  """`get_config(arg)`: '' or 'mmfree' -> hgrn_bit, 'transformer' -> transformer; presets with a GPU configuration
  (`gpu=True`) also take 'gpu' (e.g. ':gpu', ':mmfree,gpu'; see `fastest_on_gpu`)."""
  if wants_gpu(arg) and not gpu:
    raise ValueError(f"config argument {arg!r}: this preset has no ':gpu' configuration (370m.py and 1p3b.py do)")
  archs = [t for t in _tokens(arg) if t != "gpu"]
  if len(archs) > 1 or any(t not in ("mmfree", "hgrn_bit", "transformer") for t in archs):
    raise ValueError(f"unknown config argument {arg!r}: use ':transformer' for Transformer++, ':gpu' for the "
                     "MatMul-free LM's GPU configuration (where the preset has one), or nothing")
  return "transformer" if archs == ["transformer"] else "hgrn_bit"


def wants_gpu(arg: str | None) -> bool:
  return "gpu" in _tokens(arg)


def fastest_on_gpu(c: ml_collections.ConfigDict, micro_batch: int) -> None:
  """The fastest MatMul-free training step measured on one H100 (benchmarks/README.md, log items 30-38, 50-51):
  micro-batches of `micro_batch` rows per GPU (`train.micro_batch`), the layers unrolled, no remat, the BitLinear
  kernels saving only their inputs but the down, o and gate/up projections' quantized ones, the weights quantized
  once per pass, the blocks' norms inside the BitLinear kernels. The kernels are Pallas Triton kernels: elsewhere
  they run in interpret mode (slow)."""
  if c.model.arch != "hgrn_bit":
    raise ValueError("':gpu' is the MatMul-free LM's GPU configuration; the Transformer++ presets need none")
  c.model.update(unroll_layers=c.model.n_layers, remat="none", bitlinear="pallas_fused", down_bitlinear="pallas",
                 o_bitlinear="pallas", gate_bitlinear="pallas", quantize_weights_once=True, fuse_block_norms=True)
  c.train.micro_batch = micro_batch
