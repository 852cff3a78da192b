"""BitLinear's activation path as two GPU kernels (Pallas, Triton backend): one read of the input per direction.

Forward, per row x (float32 math; float64 for float64 inputs):
  y = x / sqrt(mean(x^2) + eps) * g,   y_q = clip(round(y * s_x), -128, 127) / s_x
with s_x = 127 / max(max|y|, 1e-5), written in x's dtype: the vanilla BitLinear's quantized input (`bitlinear.
_bitlinear_vanilla`), whose product with the ternary weight XLA then runs as a GEMM.
Backward (straight through the quantizer, as the vanilla layer): with dy = the cotangent of y_q,
  dg = sum over rows of dy * xhat,   dx = rstd * (dxhat - xhat * mean(dxhat * xhat)),  dxhat = dy * g,
recomputing rstd and xhat from x. XLA spends each direction in several fusions (a reduction for the norm, another
for the absmax, an element-wise pass, float32 intermediates written out); here each program walks `ROWS_PER_PROGRAM`
rows in tiles of `TILE_ELEMS` elements (whole rows: the reductions stay in the tile), reading each element once and
writing each result once. The backward's dg is accumulated per program and summed over programs by XLA.

A row of any width K is handled as power-of-two pieces (K's binary digits), so no load is masked. Off GPUs the
kernels run in Pallas' interpret mode (tests); under a mesh each device runs them on its rows
(`pallas_util.per_device`), with the width whole.

On the H100 (benchmarks/README.md) it saves memory and is at most a little faster than XLA's fusions in the full
training step (1.3B: +0.7%, -0.56 GiB; 370M: unchanged); `model.bitlinear="auto"` turns it on for GPUs.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.layers import dtypes
from mmfree_jax.layers import pallas_util
from mmfree_jax.layers.bitlinear import SCALE_FLOOR, round_half_away

ROWS_PER_PROGRAM = 8  # (the largest power of two <= this dividing the number of rows)
TILE_ELEMS = 4096  # elements per tile (one loop iteration; K rounded up to a power of two): whole rows
#                   loaded, reduced and stored at once; wide rows take fewer rows per tile, keeping registers
NUM_WARPS = 2  # per TILE_ELEMS: a row wider than a tile takes proportionally more warps (elements per thread fixed)
ROW_AXES = ("act_batch", None)  # [rows, K]: rows over the batch's mesh axes, the width whole


def _pieces(k: int) -> list[tuple[int, int]]:
  """A row of width k as (offset, size) pieces of power-of-two sizes (its binary digits): no masks needed."""
  out, offset = [], 0
  for b in reversed(range(k.bit_length())):
    if k >> b & 1:
      out.append((offset, 1 << b))
      offset += 1 << b
  return out


def _geometry(n_rows: int, k: int):
  """(rows per program, rows per tile, programs)."""
  per_prog = pallas_util.pow2_divisor(n_rows, ROWS_PER_PROGRAM)
  kp = 1 << max(k - 1, 0).bit_length()
  return per_prog, pallas_util.pow2_divisor(per_prog, max(1, TILE_ELEMS // kp)), n_rows // per_prog


def _walk_tiles(n_rows, k, visit, init):
  """`visit(carry, first_row, rows)` over this program's tiles of `rows` rows, one per loop iteration."""
  per_prog, step, _ = _geometry(n_rows, k)
  first = pl.program_id(0) * per_prog
  return lax.fori_loop(0, per_prog // step, lambda c, carry: visit(carry, first + c * step, step), init)


def _load(ref, r0, rows, pieces):
  """A [rows, K] tile as [rows, n] pieces in the accumulation dtype."""
  return [ref[pl.ds(r0, rows), pl.ds(o, n)].astype(dtypes.accum(ref.dtype)) for o, n in pieces]


def _row_sum(vs):
  return sum(jnp.sum(v, axis=1, keepdims=True) for v in vs)


def _stats(x, g, k, eps):
  """(xhat, y, rstd [rows, 1]) of a tile of rows given as pieces, in the accumulation dtype."""
  rstd = lax.rsqrt(_row_sum([v * v for v in x]) / k + eps)
  xhat = [v * rstd for v in x]
  return xhat, [v * w[None] for v, w in zip(xhat, g)], rstd


def _forward_kernel(x_ref, g_ref, o_ref, *, eps):
  n_rows, k = x_ref.shape
  pieces = _pieces(k)
  g = [g_ref[pl.ds(o, n)] for o, n in pieces]

  def visit(carry, r0, rows):
    _, y, _ = _stats(_load(x_ref, r0, rows, pieces), g, k, eps)
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(v), axis=1, keepdims=True) for v in y])
    scale = 127.0 / jnp.maximum(amax, SCALE_FLOOR)
    for (o, n), v in zip(pieces, y):
      q = jnp.clip(round_half_away(v * scale), -128.0, 127.0)
      o_ref[pl.ds(r0, rows), pl.ds(o, n)] = (q * (1.0 / scale)).astype(o_ref.dtype)
    return carry

  _walk_tiles(n_rows, k, visit, 0)


def _backward_kernel(x_ref, g_ref, dy_ref, dx_ref, dg_ref, *, eps):
  n_rows, k = x_ref.shape
  pieces = _pieces(k)
  g = [g_ref[pl.ds(o, n)] for o, n in pieces]

  def visit(dg, r0, rows):
    xhat, _, rstd = _stats(_load(x_ref, r0, rows, pieces), g, k, eps)
    dy = _load(dy_ref, r0, rows, pieces)
    dxhat = [d * w[None] for d, w in zip(dy, g)]
    mean = _row_sum([d * v for d, v in zip(dxhat, xhat)]) / k
    for (o, n), d, v in zip(pieces, dxhat, xhat):
      dx_ref[pl.ds(r0, rows), pl.ds(o, n)] = (rstd * (d - v * mean)).astype(dx_ref.dtype)
    return [a + jnp.sum(d * v, axis=0) for a, d, v in zip(dg, dy, xhat)]

  dg = _walk_tiles(n_rows, k, visit, [jnp.zeros((n,), g_ref.dtype) for _, n in pieces])
  for (o, n), v in zip(pieces, dg):
    dg_ref[pl.program_id(0), pl.ds(o, n)] = v


def _num_warps(k: int) -> int:
  """NUM_WARPS, scaled up for rows wider than a tile (one row per tile), so that no thread holds more elements
  than at TILE_ELEMS (more spill registers: log item 18)."""
  kp = 1 << max(k - 1, 0).bit_length()
  return NUM_WARPS * max(1, kp // TILE_ELEMS)


def _launch(kernel, operands, out_shape, n_programs):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(n_programs,),
      name="bitlinear" + kernel.func.__name__.removesuffix("_kernel"),  # bitlinear_forward / _backward in profiles
      in_specs=[pl.BlockSpec()] * len(operands),  # whole arrays: programs index their rows
      out_specs=jax.tree.map(lambda _: pl.BlockSpec(), out_shape),
      interpret=pallas_util.interpret(),
      compiler_params=plgpu.CompilerParams(num_warps=_num_warps(operands[0].shape[1])),
  )(*operands)


def _forward(x, g, eps):
  out = jax.ShapeDtypeStruct(x.shape, x.dtype)
  return _launch(functools.partial(_forward_kernel, eps=eps), (x, g.astype(dtypes.accum(x.dtype))), out,
                 _geometry(*x.shape)[2])


def _backward(x, g, dy, eps):
  n_prog = _geometry(*x.shape)[2]
  acc = dtypes.accum(x.dtype)
  shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((n_prog, x.shape[1]), acc))
  dx, dg = _launch(functools.partial(_backward_kernel, eps=eps), (x, g.astype(acc), dy.astype(x.dtype)), shapes,
                   n_prog)
  return dx, jnp.sum(dg, axis=0).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantized_input(x, g, eps):
  return _forward(x, g, eps)


def _quantized_input_fwd(x, g, eps):
  return _forward(x, g, eps), (x, g)


def _quantized_input_bwd(eps, res, dy):
  x, g = res
  return _backward(x, g, dy, eps)


_quantized_input.defvjp(_quantized_input_fwd, _quantized_input_bwd)


def quantized_input(x, g, eps: float):
  """BitLinear's quantized input `y_q [..., K]` (x's dtype) of `x [..., K]` with norm scale `g [K]`; see the
  module docstring. Differentiable in x and g (straight through the quantizer)."""
  if x.shape[-1] != g.shape[-1] or g.ndim != 1:
    raise ValueError(f"bitlinear kernel: x [..., K] and g [K] expected; got {x.shape} and {g.shape}")
  rows = x.reshape(-1, x.shape[-1])
  fn = lambda r, g_: (_quantized_input(r, g_, eps),)
  (out,) = pallas_util.per_device(fn, (ROW_AXES, (None,)), (ROW_AXES,))(rows, g)
  return out.reshape(x.shape)
