"""Decode-time BitLinear in one GPU kernel (Pallas, Triton backend), for a few rows at a time.

At batch 1 every BitLinear of a decode step is a matrix-vector product, and XLA spends it in five or six small
kernels (RMS norm, absmax, quantize, unpack, product, rescale), each bound by launch latency rather than by the
quarter of a megabyte of packed weights it reads. This kernel does all of it in one launch, and serves several
BitLinears that read the same input (the token mixer's f, i and g projections) in that same launch:

  out[g, m, :] = (q_x[m] @ W_g) / s_x[m] / s_w[g],   q_x[m] = int8 absmax codes of rms_norm(x[m]) * norm_scale[g]

Layout: `packed [G, rows, N]` uint8, the export format of `inference.packed` (byte `r` holds input rows
`r, r + n, r + 2n, r + 3n` with `n = ceil(K / 4)`), with rows padded past `n` by zero codes (byte 0b01010101) to
a multiple of `BLOCK_K`; `norm_scale [G, K]`, `inv_sw [G]`. Grid: (G, M, N / block_n); each program streams its
`rows x block_n` bytes in `BLOCK_K`-row chunks and accumulates in float32 (exact: integer sums below 2^24).

The row statistics are computed in the kernel with the reference's formulas; their float32 reduction order
differs from XLA's, so an activation code can differ by one where `y * s_x` falls within rounding of a .5 tie.
Parity with `packed.ternary_linear` is tested on the CPU in interpret mode.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.layers.bitlinear import round_half_away

BLOCK_K = 64  # packed rows per step of the inner loop (four times as many input features)
MAX_ROWS = 8  # above this many rows (prefill), XLA's GEMMs take over
ZERO_BYTE = 0b01010101  # four zero codes
MODES = ("auto", "on", "off")
MODE = "auto"  # auto: on GPUs; on: everywhere (interpret mode off GPUs, for tests); off: never


def enabled() -> bool:
  if MODE not in MODES:
    raise ValueError(f"ternary_kernel.MODE={MODE!r}: expected one of {MODES}")
  return MODE == "on" or (MODE == "auto" and jax.default_backend() == "gpu")


def block_n(n_out: int) -> int | None:
  """Output columns per program: the largest of 64, 32, 16 that divides `n_out` (None: no kernel)."""
  return next((b for b in (64, 32, 16) if n_out % b == 0), None)


def applies(x: jax.Array, packed: jax.Array) -> bool:
  """Whether `ternary_matvec` serves `x [..., K]` against `packed [rows, *out]` (kernel layout, few rows)."""
  n_out = packed.size // packed.shape[0]
  return (enabled() and x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) and x.size // x.shape[-1] <= MAX_ROWS
          and block_n(n_out) is not None and packed.shape[0] % BLOCK_K == 0)


def pad_rows(packed: jax.Array, axis: int) -> jax.Array:
  """Packed weights with their rows (`axis`) padded by zero codes to a multiple of BLOCK_K."""
  extra = -packed.shape[axis] % BLOCK_K
  pad = [(0, extra if a == axis else 0) for a in range(packed.ndim)]
  return jnp.pad(packed, pad, constant_values=ZERO_BYTE) if extra else packed


def _kernel(x_ref, s_ref, w_ref, p_ref, o_ref, *, k_in: int, n: int, eps: float):
  g, m = pl.program_id(0), pl.program_id(1)
  chunk = 4 * BLOCK_K
  n_chunks = -(-k_in // chunk)

  def row(ref, lead, start, size, valid):
    idx = start + jnp.arange(size)
    return plgpu.load(ref.at[lead, pl.ds(start, size)], mask=valid(idx), other=0.0).astype(jnp.float32)

  inside = lambda idx: idx < k_in
  sumsq = lax.fori_loop(0, n_chunks, lambda c, a: a + jnp.sum(jnp.square(row(x_ref, m, c * chunk, chunk, inside))),
                        jnp.float32(0.0))
  rstd = 1.0 / jnp.sqrt(sumsq / k_in + eps)

  def amax_step(c, a):
    y = row(x_ref, m, c * chunk, chunk, inside) * rstd * row(s_ref, g, c * chunk, chunk, inside)
    return jnp.maximum(a, jnp.max(jnp.abs(y)))

  amax = lax.fori_loop(0, n_chunks, amax_step, jnp.float32(0.0))
  scale = 127.0 / jnp.maximum(amax, 1e-5)

  def step(i, acc):
    codes = p_ref[pl.ds(i * BLOCK_K, BLOCK_K), :].astype(jnp.int32)  # [BLOCK_K, block_n]
    for k in range(4):
      start = k * n + i * BLOCK_K
      valid = lambda idx, k=k, start=start: (idx - k * n < n) & (idx < k_in)
      y = row(x_ref, m, start, BLOCK_K, valid) * rstd * row(s_ref, g, start, BLOCK_K, valid)
      q = jnp.clip(round_half_away(y * scale), -128.0, 127.0)
      w = (((codes >> (2 * k)) & 3) - 1).astype(jnp.float32)
      acc = acc + jnp.sum(q[:, None] * w, axis=0)
    return acc

  rows = p_ref.shape[0]
  acc = lax.fori_loop(0, rows // BLOCK_K, step, jnp.zeros((p_ref.shape[1],), jnp.float32))
  o_ref[...] = acc * ((1.0 / scale) * w_ref[0])  # the grouping of packed.ternary_linear


@functools.partial(jax.jit, static_argnames=("eps",))
def ternary_matvec(x, packed, norm_scale, inv_sw, *, eps: float):
  """`x [M, K]`, `packed [G, rows, N]` (rows padded, see the module docstring), `norm_scale [G, K]`,
  `inv_sw [G]` -> `[G, M, N]` float32."""
  m_rows, k_in = x.shape
  groups, rows, n_out = packed.shape
  n = -(-k_in // 4)
  bn = block_n(n_out)
  if bn is None or rows % BLOCK_K or rows < n:
    raise ValueError(f"ternary_matvec: packed {packed.shape} for {k_in} inputs: rows must cover ceil(K/4)={n} in "
                     f"multiples of {BLOCK_K}, and N must be a multiple of 16")
  kernel = functools.partial(_kernel, k_in=k_in, n=n, eps=eps)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((groups, m_rows, n_out), jnp.float32),
      grid=(groups, m_rows, n_out // bn),
      in_specs=[
          pl.BlockSpec(),  # whole x: each program reads its row in chunks
          pl.BlockSpec(),
          pl.BlockSpec((1,), lambda g, m, j: (g,)),
          pl.BlockSpec((None, rows, bn), lambda g, m, j: (g, 0, j)),
      ],
      out_specs=pl.BlockSpec((None, None, bn), lambda g, m, j: (g, m, j)),
      interpret=jax.default_backend() != "gpu",
      name="ternary_matvec",
  )(x, norm_scale.astype(jnp.float32), inv_sw.astype(jnp.float32), packed)
