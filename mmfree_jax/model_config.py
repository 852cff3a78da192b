"""`ModelConfig`: the frozen, validated form of a config's `model` field that the modules hold."""

import dataclasses
import math

import jax.numpy as jnp

ARCHS = ("hgrn_bit", "transformer")
REMAT = ("none", "full", "save_dots", "save_proj")
# Fields that choose how the model is computed, not what it is: the parameters (tree, shapes, dtypes) do not depend
# on them and the function only to rounding, so a checkpoint resumes under any of their values (e.g. the presets'
# ':gpu' configuration of a run started elsewhere).
# The MatMul-free LM's projections whose BitLinear impl may differ from `bitlinear`'s ("": the same).
PROJECTION_IMPL_FIELDS = ("down_bitlinear", "o_bitlinear", "gate_bitlinear")
IMPLEMENTATION_FIELDS = ("dtype", "scan_impl", "scan_chunk", "bitlinear", *PROJECTION_IMPL_FIELDS,
                         "quantize_weights_once", "fuse_block_norms", "attention_impl", "remat", "unroll_layers", "loss_chunk")


def glu_width(d_model: int) -> int:
  """The reference intermediate size: I = 256 * ceil(int(d * 4 * 2/3) / 256)."""
  return 256 * math.ceil(int(d_model * 4 * 2 / 3) / 256)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  arch: str = "hgrn_bit"
  vocab_size: int = 32000
  d_model: int = 1024
  n_layers: int = 24
  d_ff: int = 0  # 0: glu_width(d_model)
  n_heads: int = 16
  rope_base: float = 10000.0
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  scan_impl: str = "auto"
  scan_chunk: int = 128
  bitlinear: str = "vanilla"
  down_bitlinear: str = ""  # the GLU down projection's BitLinear impl ("": bitlinear's)
  o_bitlinear: str = ""  # the MLGRU output projection's
  gate_bitlinear: str = ""  # the GLU gate/up projection's
  quantize_weights_once: bool = False  # MatMul-free: the layer stack's weights quantized once per forward pass
  # MatMul-free: the blocks' RMSNorms (and the add before the GLU's) inside the BitLinear kernels they feed
  fuse_block_norms: bool = False
  attention_impl: str = "xla"
  remat: str = "full"
  unroll_layers: int = 1  # layers per iteration of the layer loop (nn.scan's unroll; n_layers: no loop)
  loss_chunk: int = 0  # > 0: head + cross-entropy over this many positions at a time (models/head_loss.py)

  def __post_init__(self):
    from mmfree_jax.layers import bitlinear, recurrence  # pylint: disable=g-import-not-at-top
    checks = [
        (self.arch in ARCHS, f"model.arch={self.arch!r}: expected one of {ARCHS}"),
        (self.scan_impl in recurrence.IMPLS, f"model.scan_impl={self.scan_impl!r}: expected one of {recurrence.IMPLS}"),
        (self.bitlinear in bitlinear.IMPLS, f"model.bitlinear={self.bitlinear!r}: expected one of {bitlinear.IMPLS}"),
        *((getattr(self, name) in ("", *bitlinear.IMPLS),
           f"model.{name}={getattr(self, name)!r}: expected '' (model.bitlinear's) or one of {bitlinear.IMPLS}")
          for name in PROJECTION_IMPL_FIELDS),
        (not self.quantize_weights_once or self.arch != "hgrn_bit"
         or {self.bitlinear, *(self.projection_impl(n) for n in ("down", "o", "gate"))}
         <= set(bitlinear.PREQUANTIZED_IMPLS),
         f"model.quantize_weights_once needs model.bitlinear and model.{'/'.join(PROJECTION_IMPL_FIELDS)} in "
         f"{bitlinear.PREQUANTIZED_IMPLS}, not {self.bitlinear!r} / "
         f"{' / '.join(repr(getattr(self, n)) for n in PROJECTION_IMPL_FIELDS)} (they quantize their own weight)"),
        (self.remat in REMAT, f"model.remat={self.remat!r}: expected one of {REMAT}"),
        (self.attention_impl in ("xla", "cudnn"), f"model.attention_impl={self.attention_impl!r}: expected xla or cudnn"),
        (min(self.vocab_size, self.d_model, self.n_layers, self.scan_chunk) > 0, "model sizes must be positive"),
        (self.unroll_layers >= 1, f"model.unroll_layers={self.unroll_layers}: expected >= 1"),
        (self.loss_chunk >= 0, f"model.loss_chunk={self.loss_chunk}: expected 0 (whole rows) or a positive length"),
        (self.arch != "transformer" or self.d_model % self.n_heads == 0,
         f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"),
        (self.arch != "transformer" or (self.d_model // self.n_heads) % 2 == 0, "RoPE needs an even head dim"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)
    for name in ("param_dtype", "dtype"):
      jnp.dtype(getattr(self, name))  # raises TypeError on an unknown dtype name

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    """From a ConfigDict / dict holding (a subset of) the fields; unknown fields are an error."""
    cfg = dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}; known: {sorted(names)}")
    return cls(**cfg)

  def projection_impl(self, projection: str) -> str:
    """The BitLinear impl of the "down", "o" or "gate" projection (`<projection>_bitlinear`, or `bitlinear`)."""
    return getattr(self, f"{projection}_bitlinear") or self.bitlinear

  @property
  def ff(self) -> int:
    return self.d_ff or glu_width(self.d_model)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)
