"""Decode-time BitLinear in one GPU kernel (Pallas, Triton backend), for a few rows at a time.

At batch 1 every BitLinear of a decode step is a matrix-vector product, and XLA spends it in five or six small
kernels (RMS norm, absmax, quantize, unpack, product, rescale), each bound by launch latency rather than by the
quarter of a megabyte of packed weights it reads. This kernel does all of it in one launch, and serves several
BitLinears that read the same input (the token mixer's f, i and g projections) in that same launch:

  out[g, m, :] = (q_x[m] @ W_g) / s_x[m] / s_w[g],   q_x[m] = int8 absmax codes of rms_norm(x[m]) * norm_scale[g]

Layout: `packed [G, rows, N]` uint8, the export format of `inference.packed` (byte `r` holds input rows
`r, r + n, r + 2n, r + 3n` with `n = ceil(K / 4)`), with rows padded past `n` by zero codes (byte 0b01010101) to
a power of two (`pad_rows`); `norm_scale [G, K]`, `inv_sw [G]`. Grid: (G, M, N / block_n). Each program gathers
its row of x in the four segments of that layout, computes the row statistics, and multiplies by its
`rows x block_n` bytes in one pass (no loop: every load is issued at once), accumulating in float32 (exact:
integer sums below 2^24).

The row statistics are computed in the kernel with the reference's formulas; their float32 reduction order
differs from XLA's, so an activation code can differ by one where `y * s_x` falls within rounding of a .5 tie.
Parity with `packed.ternary_linear` is tested on the CPU in interpret mode; on the H100, the tiny model's prefill +
decode logits with the kernel equal XLA's on the CPU to 2e-7 of their range (`python -m benchmarks.decode_parity`).
On by default on GPUs (`MODE`, below).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.layers import pallas_util
from mmfree_jax.layers.bitlinear import SCALE_FLOOR, round_half_away

MAX_ROWS = 8  # above this many rows (prefill), XLA's GEMMs take over
MIN_PACKED_ROWS = 64  # fewest packed rows per program (rows past ceil(K / 4) hold zero codes)
BLOCK_ELEMS = 8192  # packed bytes per program: rows x block_n (H100: see benchmarks/README.md)
NUM_WARPS = 8
ZERO_BYTE = 0b01010101  # four zero codes
MODES = ("auto", "on", "off")
# auto: on GPUs; on: everywhere (interpret mode off GPUs, for tests); off: never (XLA's BitLinear).
MODE = "auto"
# Element-wise steps the decoder runs in the kernels' launches (`ternary_matvec(pre=...)`): "norm" (the block's
# RMSNorm before f/i/g and gate/up), "glu" (silu(gate) * up before down), "gnorm" (the MLGRU's output gate before
# o). Each saves launches of XLA's kernels per layer and lengthens the kernel's own; on the H100 (370M, 8 warps,
# 8192 bytes) all three together decode fastest (benchmarks/README.md).
PROLOGUES = ("norm", "glu", "gnorm")


def enabled() -> bool:
  if MODE not in MODES:
    raise ValueError(f"ternary_kernel.MODE={MODE!r}: expected one of {MODES}")
  return MODE == "on" or (MODE == "auto" and jax.default_backend() == "gpu")


def padded_rows(k_in: int) -> int:
  """Packed rows the kernel reads for `k_in` inputs: ceil(k_in / 4) rounded up to a power of two, at least
  MIN_PACKED_ROWS."""
  n = -(-k_in // 4)
  return max(MIN_PACKED_ROWS, 1 << (n - 1).bit_length())


def block_n(rows: int, n_out: int) -> int | None:
  """Output columns per program: the largest power of two <= max(16, BLOCK_ELEMS / rows) dividing `n_out`."""
  b = max(16, min(128, BLOCK_ELEMS // rows))
  while b >= 16 and n_out % b:
    b //= 2
  return b if b >= 16 else None


def applies(rows_x: int, k_in: int, dtype, packed_shape: tuple) -> bool:
  """Whether `ternary_matvec` serves `rows_x` rows of `k_in` inputs in `dtype` against packed weights
  `[rows, *out]` (few rows: decoding)."""
  rows, n_out = packed_shape[0], math.prod(packed_shape[1:])
  return (enabled() and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16, jnp.float32) and rows_x <= MAX_ROWS
          and rows == padded_rows(k_in) and block_n(rows, n_out) is not None)


def pad_rows(packed: jax.Array, axis: int, k_in: int) -> jax.Array:
  """Packed weights with their rows (`axis`) padded by zero codes to `padded_rows(k_in)`."""
  extra = padded_rows(k_in) - packed.shape[axis]
  pad = [(0, extra if a == axis else 0) for a in range(packed.ndim)]
  return jnp.pad(packed, pad, constant_values=ZERO_BYTE) if extra else packed


def _kernel(layer_ref, x_ref, s_ref, w_ref, p_ref, *rest, k_in: int, groups: int, rows: int, bn: int, eps: float,
            pre: str | None, dtype, x_offset: int):
  *ins, o_ref = rest
  pre_ref, e_ref = (ins + [None, None])[:2]  # norm: [pre_scale]; gnorm: [pre_scale, extra]; else none
  g, m, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lg = layer_ref[0] * groups + g  # this program's matrix in the stacks
  n = -(-k_in // 4)
  r = jnp.arange(rows)
  # Segment k holds inputs k*n .. k*n + n - 1 (the packing's layout), one gather each of x's row and the scale.
  idx = [k * n + r for k in range(4)]
  valid = [(r < n) & (i < k_in) for i in idx]
  load = lambda ref, base, k: plgpu.load(ref.at[base + idx[k]], mask=valid[k], other=0.0).astype(jnp.float32)
  rounded = lambda v: v.astype(dtype).astype(jnp.float32)  # the compute dtype's rounding of the XLA reference
  if pre == "glu":  # x row m is [gate (k_in), up (k_in)]: the input is silu(gate) * up, as BitGLU computes it
    gates = [rounded(load(x_ref, 2 * m * k_in, k)) for k in range(4)]
    ups = [rounded(load(x_ref, 2 * m * k_in + k_in, k)) for k in range(4)]
    xs = [rounded(a * (1.0 / (1.0 + jnp.exp(-a))) * b) for a, b in zip(gates, ups)]
  else:
    xs = [load(x_ref, x_offset + m * k_in, k) for k in range(4)]
  if pre == "gnorm":  # the token mixer's output gate: rms_norm(round(x)) * scale * silu(extra), as MLGRU computes it
    xs = [rounded(v) for v in xs]
    ps = [load(pre_ref, layer_ref[0] * k_in, k) for k in range(4)]
    hs = [load(e_ref, m * k_in, k) for k in range(4)]
    rstd0 = 1.0 / jnp.sqrt(sum(jnp.sum(v * v) for v in xs) / k_in + eps)
    xs = [rounded(v * rstd0 * p * (h * (1.0 / (1.0 + jnp.exp(-h))))) for v, p, h in zip(xs, ps, hs)]
  if pre == "norm":  # the block's RMSNorm (scale stack [L, k_in]) before the BitLinear's own
    ps = [load(pre_ref, layer_ref[0] * k_in, k) for k in range(4)]
    rstd0 = 1.0 / jnp.sqrt(sum(jnp.sum(v * v) for v in xs) / k_in + eps)
    xs = [rounded(v * rstd0 * p) for v, p in zip(xs, ps)]
  ss = [load(s_ref, lg * k_in, k) for k in range(4)]
  sumsq = sum(jnp.sum(v * v) for v in xs)
  rstd = 1.0 / jnp.sqrt(sumsq / k_in + eps)
  ys = [v * rstd * s for v, s in zip(xs, ss)]
  amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(y)) for y in ys])
  scale = 127.0 / jnp.maximum(amax, SCALE_FLOOR)
  codes = p_ref[layer_ref[0], g, :, pl.ds(j * bn, bn)].astype(jnp.int32)  # [rows, bn]
  acc = jnp.zeros((bn,), jnp.float32)
  for k, y in enumerate(ys):
    q = jnp.clip(round_half_away(y * scale), -128.0, 127.0)
    w = (((codes >> (2 * k)) & 3) - 1).astype(jnp.float32)
    acc = acc + jnp.sum(q[:, None] * w, axis=0)
  o_ref[...] = acc * ((1.0 / scale) * w_ref[lg])  # the grouping of packed.ternary_linear


PRES = (None, "norm", "glu", "gnorm")


@functools.partial(jax.jit, static_argnames=("eps", "pre", "dtype", "x_index"))
def ternary_matvec(x, packed, norm_scale, inv_sw, layer, *, eps: float, pre: str | None = None, pre_scale=None,
                   extra=None, dtype=None, x_index: int | None = None):
  """`x [M, K]` against layer `layer` (int32 `[1]`) of the stacks `packed [L, G, rows, N]` (rows padded, see the
  module docstring), `norm_scale [L, G, K]`, `inv_sw [L, G]` -> `[G, M, N]` float32. The stacks are operands
  whole, so that no slice of them is copied per call.

  `pre`, an element-wise prologue that saves the launches of XLA's kernels before this one (`dtype`: the compute
  dtype whose rounding the reference applies; default x's):
    "norm"  the input is `rms_norm(x) * pre_scale[layer]` rounded to `dtype` (the block's RMSNorm; `pre_scale
            [L, K]`);
    "glu"   `x [M, 2K]` holds a GLU's gate and up halves: the input is `silu(gate) * up`, each rounded to `dtype`
            first and the product after;
    "gnorm" the MLGRU's output gate: `rms_norm(x) * pre_scale[layer] * silu(extra)` with `extra [M, K]` (the
            recurrence output), x rounded to `dtype` first and the product after.
  `x_index`: x is `[n, M, K]` and its row `x_index` is the input (no slice of it is copied).
  """
  if pre not in PRES:
    raise ValueError(f"ternary_matvec: pre={pre!r}: expected one of {PRES}")
  m_rows, k_in = x.shape[-2:]
  x_offset = 0 if x_index is None else x_index * m_rows * k_in
  if pre == "glu":
    k_in //= 2
  _, groups, rows, n_out = packed.shape
  bn = block_n(rows, n_out)
  if bn is None or rows != padded_rows(k_in):
    raise ValueError(f"ternary_matvec: packed {packed.shape} for {k_in} inputs: expected {padded_rows(k_in)} rows "
                     "(pad_rows) and N a multiple of 16")
  kernel = functools.partial(_kernel, k_in=k_in, groups=groups, rows=rows, bn=bn, eps=eps, pre=pre,
                             dtype=jnp.dtype(dtype or x.dtype), x_offset=x_offset)
  operands = [layer, x.reshape(-1), norm_scale.astype(jnp.float32).reshape(-1),
              inv_sw.astype(jnp.float32).reshape(-1), packed]
  if pre in ("norm", "gnorm"):
    operands.append(pre_scale.astype(jnp.float32).reshape(-1))
  if pre == "gnorm":
    operands.append(extra.reshape(-1))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((groups, m_rows, n_out), jnp.float32),
      grid=(groups, m_rows, n_out // bn),
      in_specs=[pl.BlockSpec()] * len(operands),  # whole arrays: programs index their layer, group, row and columns
      out_specs=pl.BlockSpec((None, None, bn), lambda g, m, j: (g, m, j)),
      interpret=pallas_util.interpret(),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
      name="ternary_matvec",
  )(*operands)
