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
The backward of rows wider than a tile (the GLU's [gate, up] rows) walks column chunks twice instead, row sums then
outputs, so that many rows are in flight per SM (`_backward_two_pass_kernel`).

A row of any width K is handled as power-of-two pieces (K's binary digits), so no load is masked. Off GPUs the
kernels run in Pallas' interpret mode (tests); under a mesh each device runs them on its rows
(`pallas_util.per_device`), with the width whole.

Several norm scales `gs [n, K]` on one input (`quantized_inputs`; the MLGRU's f/i/g, `bitlinear.bitlinear_group`):
the forward normalizes each row once and writes n quantized inputs; the backward reads x once and the n
cotangents, summing the input's cotangent in float32 (dxhat = sum_j dy_j * g_j) before the norm's backward.
A GLU prologue (`glu=True`; the down projection, `BitLinear(glu_input=True)`): rows are [gate, up] and the input is
`glu.swiglu`'s h = silu(gate) * up, rounded to x's dtype as swiglu returns it; the backward rounds h's cotangent
the same way and applies swiglu's backward, writing [d_gate, d_up]: h is never written.

On the H100 (benchmarks/README.md, log items 18, 30-32) it saves memory and is a little faster than XLA's fusions
in the full training step (1.3B: 49.9k tokens/s with XLA's fusions, 51.2k with both kernels, -0.5 GiB);
`model.bitlinear="auto"` turns it on for GPUs, and `"pallas_fused"` saves only the layer input (370M with
micro-batches, the GLU prologue and the weights quantized once: 170.2k tokens/s at 24.3 GiB with the down projection
on `pallas`).
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
FORWARD_ROWS_PER_PROGRAM = 1  # the forward keeps no per-program sums: more programs in flight (log item 52)
TILE_ELEMS = 4096  # elements per tile (one loop iteration; K rounded up to a power of two): whole rows
#                   loaded, reduced and stored at once; wide rows take fewer rows per tile, keeping registers
NUM_WARPS = 2  # per TILE_ELEMS: a row wider than a tile takes proportionally more warps (elements per thread fixed)
# The backward of rows wider than TWO_PASS_WIDTH (as stored: the GLU's [gate, up] rows are 2K wide) walks each
# program's rows in two passes over column chunks: the row sums first, then the outputs (`_backward_two_pass_kernel`).
TWO_PASS_WIDTH = TILE_ELEMS
TWO_PASS_ROWS = 8  # rows per program (the largest power of two <= this dividing the number of rows)
TWO_PASS_CHUNK = 256  # columns per chunk (the largest power of two <= this dividing K)
TWO_PASS_WARPS = 4
ROW_AXES = ("act_batch", None)  # [rows, K]: rows over the batch's mesh axes, the width whole


def _pieces(k: int) -> list[tuple[int, int]]:
  """A row of width k as (offset, size) pieces of power-of-two sizes (its binary digits): no masks needed."""
  out, offset = [], 0
  for b in reversed(range(k.bit_length())):
    if k >> b & 1:
      out.append((offset, 1 << b))
      offset += 1 << b
  return out


def _geometry(n_rows: int, k: int, tiling=None):
  """(rows per program, rows per tile, programs); `tiling`: (rows per program, tile elements) other than this
  module's (`prenorm_kernel`'s own)."""
  rows_per_program, tile_elems = tiling or (ROWS_PER_PROGRAM, TILE_ELEMS)
  per_prog = pallas_util.pow2_divisor(n_rows, rows_per_program)
  kp = 1 << max(k - 1, 0).bit_length()
  return per_prog, pallas_util.pow2_divisor(per_prog, max(1, tile_elems // kp)), n_rows // per_prog


def _walk_tiles(n_rows, k, visit, init, tiling=None, loads=(), pieces=None, prefetch=False):
  """`visit(carry, first_row, rows, *tiles)` over this program's tiles of `rows` rows, one per loop iteration.
  `tiles`: each of `loads` ((ref, column offset) pairs) as the tile's `pieces` in the accumulation dtype; with
  `prefetch` the next tile is loaded before the current one is computed (`pallas_util.walk`)."""
  per_prog, step, _ = _geometry(n_rows, k, tiling)
  first = pl.program_id(0) * per_prog
  row = lambda c: first + c * step
  raw = lambda c: [[ref[pl.ds(row(c), step), pl.ds(off + o, m)] for o, m in pieces] for ref, off in loads]

  def step_fn(carry, c, tiles):
    return visit(carry, row(c), step, *[[v.astype(dtypes.accum(v.dtype)) for v in t] for t in tiles])

  return pallas_util.walk(per_prog // step, raw, step_fn, init, prefetch and bool(loads))


def _load(ref, r0, rows, pieces, offset=0):
  """A [rows, K] tile (columns from `offset`) as [rows, n] pieces in the accumulation dtype."""
  return [ref[pl.ds(r0, rows), pl.ds(offset + o, n)].astype(dtypes.accum(ref.dtype)) for o, n in pieces]


def _sigmoid(v):
  return 1.0 / (1.0 + jnp.exp(-v))


def _input_loads(x_ref, k, glu):
  """`_walk_tiles`' loads of the layer input: x's row, or with `glu` its gate (columns 0..K) and up (K..2K)."""
  return [(x_ref, 0), (x_ref, k)] if glu else [(x_ref, 0)]


def _layer_input(tiles, dtype):
  """(the layer input's tile as pieces in the accumulation dtype, (gate, up) pieces or None), from the tiles of
  `_input_loads`. With two (gate, up), the input is `swiglu`'s h = silu(gate) * up, rounded to x's `dtype` as
  `swiglu` returns it (`layers.glu`)."""
  if len(tiles) == 1:
    return tiles[0], None
  gate, up = tiles
  acc = gate[0].dtype
  h = [(a * _sigmoid(a) * b).astype(dtype).astype(acc) for a, b in zip(gate, up)]
  return h, (gate, up)


def _row_sum(vs):
  return sum(jnp.sum(v, axis=1, keepdims=True) for v in vs)


def _stats(x, k, eps):
  """(xhat, rstd [rows, 1]) of a tile of rows given as pieces, in the accumulation dtype."""
  rstd = lax.rsqrt(_row_sum([v * v for v in x]) / k + eps)
  return [v * rstd for v in x], rstd


def _scales(g_ref, pieces):
  """The norm scales `g [n, K]` as n lists of pieces."""
  return [[g_ref[j, pl.ds(o, m)] for o, m in pieces] for j in range(g_ref.shape[0])]


def store_quantized(xhat, gs, o_refs, r0, rows, pieces):
  """Writes `o_refs[j]`'s rows [r0, r0 + rows): the quantized input of xhat * gs[j], one per norm scale."""
  for g, o_ref in zip(gs, o_refs):
    y = [v * w[None] for v, w in zip(xhat, g)]
    amax = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(v), axis=1, keepdims=True) for v in y])
    scale = 127.0 / jnp.maximum(amax, SCALE_FLOOR)
    for (o, m), v in zip(pieces, y):
      q = jnp.clip(round_half_away(v * scale), -128.0, 127.0)
      o_ref[pl.ds(r0, rows), pl.ds(o, m)] = (q * (1.0 / scale)).astype(o_ref.dtype)


def norm_backward(xhat, rstd, gs, dys, dgs, k):
  """The norm's backward for a tile of rows (pieces): (dx in the accumulation dtype, dgs + this tile's sums of
  dy_j * xhat). The cotangents of xhat add up over the norm scales: dxhat = sum_j dy_j * g_j."""
  dxhat, out = None, []
  for g, dy, dg in zip(gs, dys, dgs):
    d = [u * w[None] for u, w in zip(dy, g)]
    dxhat = d if dxhat is None else [a + b for a, b in zip(dxhat, d)]
    out.append([a + jnp.sum(u * v, axis=0) for a, u, v in zip(dg, dy, xhat)])
  mean = _row_sum([d * v for d, v in zip(dxhat, xhat)]) / k
  return [rstd * (d - v * mean) for d, v in zip(dxhat, xhat)], out


def _forward_kernel(x_ref, g_ref, *o_refs, eps, glu):
  n_rows, width = x_ref.shape
  k = g_ref.shape[1]
  pieces = _pieces(k)
  gs = _scales(g_ref, pieces)

  def visit(carry, r0, rows, *tiles):
    xhat, _ = _stats(_layer_input(tiles, x_ref.dtype)[0], k, eps)
    store_quantized(xhat, gs, o_refs, r0, rows, pieces)
    return carry

  _walk_tiles(n_rows, width, visit, 0, _forward_tiling(), loads=_input_loads(x_ref, k, glu), pieces=pieces)


def _backward_kernel(x_ref, g_ref, *refs, eps, glu):
  *dy_refs, dx_ref, dg_ref = refs
  n_rows, width = x_ref.shape
  k = g_ref.shape[1]
  pieces = _pieces(k)
  gs = _scales(g_ref, pieces)
  inputs = _input_loads(x_ref, k, glu)

  def visit(dgs, r0, rows, *tiles):
    h, gate_up = _layer_input(tiles[:len(inputs)], x_ref.dtype)
    xhat, rstd = _stats(h, k, eps)
    dxs, out = norm_backward(xhat, rstd, gs, tiles[len(inputs):], dgs, k)
    for i, ((o, m), dx) in enumerate(zip(pieces, dxs)):
      dx = dx.astype(dx_ref.dtype)
      if not glu:
        dx_ref[pl.ds(r0, rows), pl.ds(o, m)] = dx
        continue
      # swiglu's backward (`layers.glu`) from the rounded cotangent of h: gate's and up's cotangents.
      gate, up = gate_up[0][i], gate_up[1][i]
      dh, sig = dx.astype(gate.dtype), _sigmoid(gate)
      dx_ref[pl.ds(r0, rows), pl.ds(o, m)] = (dh * up * (sig * (1.0 + gate * (1.0 - sig)))).astype(dx_ref.dtype)
      dx_ref[pl.ds(r0, rows), pl.ds(k + o, m)] = (dh * (gate * sig)).astype(dx_ref.dtype)
    return out

  zeros = [[jnp.zeros((m,), g_ref.dtype) for _, m in pieces] for _ in dy_refs]
  dgs = _walk_tiles(n_rows, width, visit, zeros, loads=inputs + [(r, 0) for r in dy_refs], pieces=pieces)
  for j, dg in enumerate(dgs):
    for (o, m), v in zip(pieces, dg):
      dg_ref[pl.program_id(0), j, pl.ds(o, m)] = v


def _backward_two_pass_kernel(x_ref, g_ref, *refs, eps, glu, rows, chunk):
  """`_backward_kernel`'s results for rows too wide to hold in registers at once: one program's `rows` rows, read
  twice in chunks of `chunk` columns (the second read mostly from L2). Pass 1 sums h^2 and dxhat h per row; with
  xhat = h rstd these give rstd and mean(dxhat xhat) = rstd sum(dxhat h) / K. Pass 2 writes dx (or d_gate, d_up)
  and this program's dg per chunk. A thread holds a few chunk elements, not a row's: many rows are in flight per SM
  (the one-pass kernel, a whole 2 x 5632 row in registers, reached 1.3 TB/s in the 1.3B step; log item 49).
  Loading the next chunk while computing the current one (`pallas_util.walk`) was slower (log item 52)."""
  *dy_refs, dx_ref, dg_ref = refs
  k = g_ref.shape[1]
  program = pl.program_id(0)
  r0 = program * rows
  n_chunks = k // chunk
  at = lambda c: pl.multiple_of(c * chunk, chunk)

  def load(c):  # chunk c of x (gate and up) and of the cotangents, as stored
    o = at(c)
    xs = [x_ref[pl.ds(r0, rows), pl.ds(o + off, chunk)] for off in ((0, k) if glu else (0,))]
    return xs, [dy_ref[pl.ds(r0, rows), pl.ds(o, chunk)] for dy_ref in dy_refs]

  def columns(c, loaded):
    acc = dtypes.accum(x_ref.dtype)
    (h,), gate_up = _layer_input([[v.astype(acc)] for v in loaded[0]], x_ref.dtype)
    dys = [v.astype(acc) for v in loaded[1]]
    o = at(c)
    dxhat = functools.reduce(lambda a, b: a + b, [dy * g_ref[j, pl.ds(o, chunk)][None] for j, dy in enumerate(dys)])
    return o, h, gate_up, dys, dxhat

  def sums(carry, c, loaded):
    _, h, _, _, dxhat = columns(c, loaded)
    return carry[0] + jnp.sum(h * h, axis=1, keepdims=True), carry[1] + jnp.sum(dxhat * h, axis=1, keepdims=True)

  zero = jnp.zeros((rows, 1), dtypes.accum(x_ref.dtype))
  sq, dot = pallas_util.walk(n_chunks, load, sums, (zero, zero), prefetch=False)
  rstd = lax.rsqrt(sq / k + eps)
  mean = dot * rstd / k

  def outputs(carry, c, loaded):
    o, h, gate_up, dys, dxhat = columns(c, loaded)
    xhat = h * rstd
    for j, dy in enumerate(dys):
      dg_ref[program, j, pl.ds(o, chunk)] = jnp.sum(dy * xhat, axis=0)
    dx = (rstd * (dxhat - xhat * mean)).astype(dx_ref.dtype)
    if not glu:
      dx_ref[pl.ds(r0, rows), pl.ds(o, chunk)] = dx
      return carry
    (gate,), (up,) = gate_up
    dh, sig = dx.astype(gate.dtype), _sigmoid(gate)
    dx_ref[pl.ds(r0, rows), pl.ds(o, chunk)] = (dh * up * (sig * (1.0 + gate * (1.0 - sig)))).astype(dx_ref.dtype)
    dx_ref[pl.ds(r0, rows), pl.ds(k + o, chunk)] = (dh * (gate * sig)).astype(dx_ref.dtype)
    return carry

  pallas_util.walk(n_chunks, load, outputs, 0, prefetch=False)


def _num_warps(k: int, n: int = 1, tiling=None) -> int:
  """NUM_WARPS, scaled up for rows wider than a tile (one row per tile) and for n norm scales (n dg accumulators
  per program), so that no thread holds more elements than one scale at TILE_ELEMS does (more spill registers:
  log item 18). `tiling`: (warps, tile elements) other than this module's."""
  warps, tile_elems = tiling or (NUM_WARPS, TILE_ELEMS)
  kp = 1 << max(k - 1, 0).bit_length()
  return warps * max(1, kp // tile_elems) * (1 << max(n - 1, 0).bit_length())


def _forward_tiling():
  return FORWARD_ROWS_PER_PROGRAM, TILE_ELEMS


def _launch(kernel, operands, out_shape, n_programs, num_warps, prefix="bitlinear"):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(n_programs,),
      name=prefix + kernel.func.__name__.removesuffix("_kernel"),  # bitlinear_forward / _backward in profiles
      in_specs=[pl.BlockSpec()] * len(operands),  # whole arrays: programs index their rows
      out_specs=jax.tree.map(lambda _: pl.BlockSpec(), out_shape),
      interpret=pallas_util.interpret(),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps),
  )(*operands)


def _forward(x, gs, eps, glu):
  """The quantized inputs (a tuple, one per row of `gs [n, K]`) of rows `x [rows, K]` (glu: `[rows, 2K]`)."""
  out = tuple(jax.ShapeDtypeStruct((x.shape[0], gs.shape[1]), x.dtype) for _ in range(gs.shape[0]))
  return _launch(functools.partial(_forward_kernel, eps=eps, glu=glu), (x, gs.astype(dtypes.accum(x.dtype))), out,
                 _geometry(*x.shape, _forward_tiling())[2], _num_warps(x.shape[1]))


def _backward(x, gs, dys, eps, glu):
  if x.shape[1] > TWO_PASS_WIDTH:
    rows = pallas_util.pow2_divisor(x.shape[0], TWO_PASS_ROWS)
    n_prog, warps = x.shape[0] // rows, TWO_PASS_WARPS
    kernel = functools.partial(_backward_two_pass_kernel, eps=eps, glu=glu, rows=rows,
                               chunk=pallas_util.pow2_divisor(gs.shape[1], TWO_PASS_CHUNK))
  else:
    n_prog, warps = _geometry(*x.shape)[2], _num_warps(x.shape[1], len(dys))
    kernel = functools.partial(_backward_kernel, eps=eps, glu=glu)
  acc = dtypes.accum(x.dtype)
  shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((n_prog, *gs.shape), acc))
  dx, dg = _launch(kernel, (x, gs.astype(acc), *(dy.astype(x.dtype) for dy in dys)), shapes, n_prog, warps)
  return dx, jnp.sum(dg, axis=0).astype(gs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantized_inputs(x, gs, eps, glu):
  return _forward(x, gs, eps, glu)


def _quantized_inputs_fwd(x, gs, eps, glu):
  return _forward(x, gs, eps, glu), (x, gs)


def _quantized_inputs_bwd(eps, glu, res, dys):
  x, gs = res
  return _backward(x, gs, dys, eps, glu)


_quantized_inputs.defvjp(_quantized_inputs_fwd, _quantized_inputs_bwd)


def quantized_inputs(x, gs, eps: float, glu: bool = False) -> tuple:
  """The quantized inputs `y_q [..., K]` (x's dtype) of `x [..., K]`, one per norm scale `gs[j]` of `gs [n, K]`:
  the BitLinears that read the same input (the MLGRU's f/i/g) in one kernel launch per direction, reading `x`
  once. Differentiable in x and gs (straight through the quantizer); see the module docstring.

  `glu`: `x [..., 2, K]` is the GLU's gate/up projection and the layer input is `glu.swiglu(x)` (the down
  projection's), computed in the kernel: h is never written, and the backward returns x's cotangent directly.
  """
  k = gs.shape[-1]
  if gs.ndim != 2 or x.shape[-1] != k or (glu and (x.ndim < 2 or x.shape[-2] != 2)):
    want = "[..., 2, K]" if glu else "[..., K]"
    raise ValueError(f"bitlinear kernel: x {want} and norm scales [n, K] expected; got {x.shape} and {gs.shape}")
  rows = x.reshape(-1, 2 * k if glu else k)
  fn = lambda r, g_: _quantized_inputs(r, g_, eps, glu)
  outs = pallas_util.per_device(fn, (ROW_AXES, (None, None)), (ROW_AXES,) * gs.shape[0])(rows, gs)
  return tuple(o.reshape(*x.shape[:x.ndim - 2 if glu else -1], k) for o in outs)

