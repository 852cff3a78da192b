"""A block's RMSNorm (and the residual add before it) inside the BitLinear activation kernel of the projections
it feeds: one read of the residual stream per direction, the normalized input never written.

The MatMul-free block normalizes its residual stream before each token and channel mixer, and every BitLinear
normalizes its input again with its own scale. Per row, with the stream h = x + residual (rounded to x's dtype,
as the block's add is; or h = x without a residual), the forward computes (float32 math, float64 for float64 x):
  n = rms_normalize(h, eps_pre) * w,  rounded to x's dtype     (the block's `RMSNorm`, as the model writes it)
  y_q[j] = `bitlinear_kernel`'s quantized input of n for each norm scale gs[j]
and writes h (with a residual) and the y_q[j]. The backward takes the stream's own cotangent dh_out (the stream's
other reader: the block's residual connection) and the y_q[j]'s cotangents dy[j], and writes
  dn = the BitLinear norm's backward (`bitlinear_kernel.norm_backward`), rounding of n passed straight through
  dh = dh_out + rstd * (dnhat - hhat * mean(dnhat * hhat)),   dnhat = dn * w,   hhat = h * rstd
with dw and dgs summed per program and over programs by XLA. Unfused, XLA spends this in a row reduction plus a
conversion pass forward, two passes backward, and the normalized input and its cotangent are written and read
(benchmarks/README.md, log item 50).

Rows of any width that `bitlinear_kernel` walks in whole-row tiles (up to `bitlinear_kernel.TWO_PASS_WIDTH`; the
MatMul-free LM's d_model); off GPUs the kernels run in Pallas' interpret mode, and under a mesh per device on
its rows (`pallas_util.per_device`).
"""

# pylint: disable=protected-access
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmfree_jax.layers import bitlinear_kernel as bk  # its row tiling and helpers
from mmfree_jax.layers import dtypes
from mmfree_jax.layers import pallas_util

MAX_WIDTH = bk.TWO_PASS_WIDTH
# Tiling (benchmarks/README.md, log items 50 and 52: `python -m benchmarks.prenorm_kernel` and
# `benchmarks.activation_kernels` at 8192 x 2048): rows per program, elements per tile (one 2048-wide row per
# tile), warps per tile in the forward; the backward takes BACKWARD_WARPS per norm scale (rounded up to a power of
# two), which hold the dgs' accumulators. A backward in three walks over column chunks was slower (log item 50).
ROWS_PER_PROGRAM = 16
FORWARD_ROWS_PER_PROGRAM = 4  # the forward has no per-program sums: fewer rows, more programs in flight
TILE_ELEMS = 2048
NUM_WARPS = 2
BACKWARD_WARPS = 2
# Loading the next tile of rows while computing the current one (log item 52): the forward, and the backward with at
# least this many norm scales (its warps scale with them, so a thread holds fewer elements; None: never).
FORWARD_PREFETCH = True
BACKWARD_PREFETCH_SCALES = 2


def _tiles(forward=False):
  return FORWARD_ROWS_PER_PROGRAM if forward else ROWS_PER_PROGRAM, TILE_ELEMS


def _warps(k, n=None):
  """The forward's warps (n None), or the backward's for n norm scales."""
  return bk._num_warps(k, n or 1, (NUM_WARPS if n is None else BACKWARD_WARPS, TILE_ELEMS))


def _backward_prefetch(n_scales):
  return BACKWARD_PREFETCH_SCALES is not None and n_scales >= BACKWARD_PREFETCH_SCALES


def _normed(h, w, k, eps_pre, dtype):
  """(hhat, rstd, n): the block norm of a tile of stream rows (pieces), n rounded to `dtype` as the model's."""
  hhat, rstd = bk._stats(h, k, eps_pre)
  acc = h[0].dtype
  return hhat, rstd, [(v * u[None]).astype(dtype).astype(acc) for v, u in zip(hhat, w)]


def _forward_kernel(*refs, eps_pre, eps, residual):
  if residual:
    x_ref, res_ref, w_ref, g_ref, h_ref, *o_refs = refs
  else:
    (x_ref, w_ref, g_ref, *o_refs), res_ref, h_ref = refs, None, None
  n_rows, k = x_ref.shape
  pieces = bk._pieces(k)
  gs, w = bk._scales(g_ref, pieces), [w_ref[pl.ds(o, m)] for o, m in pieces]

  def visit(carry, r0, rows, h, *res):
    if residual:  # the block's add, rounded to the stream's dtype
      h = [(a + b).astype(x_ref.dtype) for a, b in zip(h, res[0])]
      for (o, m), v in zip(pieces, h):
        h_ref[pl.ds(r0, rows), pl.ds(o, m)] = v
      h = [v.astype(dtypes.accum(x_ref.dtype)) for v in h]
    _, _, n = _normed(h, w, k, eps_pre, x_ref.dtype)
    bk.store_quantized(bk._stats(n, k, eps)[0], gs, o_refs, r0, rows, pieces)
    return carry

  loads = [(x_ref, 0)] + ([(res_ref, 0)] if residual else [])
  bk._walk_tiles(n_rows, k, visit, 0, _tiles(forward=True), loads=loads, pieces=pieces, prefetch=FORWARD_PREFETCH)


def _backward_kernel(h_ref, w_ref, g_ref, dh_ref, *refs, eps_pre, eps):
  *dy_refs, dx_ref, dw_ref, dg_ref = refs
  n_rows, k = h_ref.shape
  pieces = bk._pieces(k)
  gs, w = bk._scales(g_ref, pieces), [w_ref[pl.ds(o, m)] for o, m in pieces]

  def visit(carry, r0, rows, h, dh, *dys):
    dws, dgs = carry
    hhat, rstd, n = _normed(h, w, k, eps_pre, h_ref.dtype)
    nhat, n_rstd = bk._stats(n, k, eps)
    dn, dgs = bk.norm_backward(nhat, n_rstd, gs, dys, dgs, k)
    dws = [a + jnp.sum(d * v, axis=0) for a, d, v in zip(dws, dn, hhat)]
    dnhat = [d * u[None] for d, u in zip(dn, w)]
    mean = bk._row_sum([d * v for d, v in zip(dnhat, hhat)]) / k
    for (o, m), d, v, s in zip(pieces, dnhat, hhat, dh):
      dx_ref[pl.ds(r0, rows), pl.ds(o, m)] = (s + rstd * (d - v * mean)).astype(dx_ref.dtype)
    return dws, dgs

  zeros = lambda: [jnp.zeros((m,), g_ref.dtype) for _, m in pieces]
  loads = [(h_ref, 0), (dh_ref, 0)] + [(r, 0) for r in dy_refs]
  dws, dgs = bk._walk_tiles(n_rows, k, visit, (zeros(), [zeros() for _ in dy_refs]), _tiles(), loads=loads,
                            pieces=pieces, prefetch=_backward_prefetch(len(dy_refs)))
  for (o, m), v in zip(pieces, dws):
    dw_ref[pl.program_id(0), pl.ds(o, m)] = v
  for j, dg in enumerate(dgs):
    for (o, m), v in zip(pieces, dg):
      dg_ref[pl.program_id(0), j, pl.ds(o, m)] = v


def _forward(x, residual, w, gs, eps_pre, eps):
  """(the stream h, the quantized inputs) of rows `x [rows, K]` (and `residual`, or None)."""
  acc = dtypes.accum(x.dtype)
  outs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for _ in range(gs.shape[0]))
  if residual is not None:
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), *outs)
  operands = (x, *(() if residual is None else (residual.astype(x.dtype),)), w.astype(acc), gs.astype(acc))
  kernel = functools.partial(_forward_kernel, eps_pre=eps_pre, eps=eps, residual=residual is not None)
  outs = bk._launch(kernel, operands, outs, bk._geometry(*x.shape, _tiles(forward=True))[2], _warps(x.shape[1]),
                   prefix="prenorm")
  return (x, outs) if residual is None else (outs[0], outs[1:])


def _backward(h, w, gs, dh, dys, eps_pre, eps):
  """(the stream's whole cotangent, dw, dgs)."""
  acc = dtypes.accum(h.dtype)
  n_prog = bk._geometry(*h.shape, _tiles())[2]
  kernel = functools.partial(_backward_kernel, eps_pre=eps_pre, eps=eps)
  shapes = (jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct((n_prog, h.shape[1]), acc),
            jax.ShapeDtypeStruct((n_prog, *gs.shape), acc))
  operands = (h, w.astype(acc), gs.astype(acc), dh.astype(h.dtype), *(dy.astype(h.dtype) for dy in dys))
  dx, dw, dg = bk._launch(kernel, operands, shapes, n_prog, _warps(h.shape[1], len(dys)), prefix="prenorm")
  return dx, jnp.sum(dw, axis=0).astype(w.dtype), jnp.sum(dg, axis=0).astype(gs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _prenormed(x, residual, w, gs, eps_pre, eps):
  return _forward(x, residual, w, gs, eps_pre, eps)


def _prenormed_fwd(x, residual, w, gs, eps_pre, eps):
  h, y_qs = _forward(x, residual, w, gs, eps_pre, eps)
  return (h, y_qs), (h, w, gs, residual is not None)


def _prenormed_bwd(eps_pre, eps, res, cts):
  h, w, gs, has_residual = res
  dh_out, dys = cts
  dh, dw, dgs = _backward(h, w, gs, dh_out, dys, eps_pre, eps)
  return dh, (dh if has_residual else None), dw, dgs


_prenormed.defvjp(_prenormed_fwd, _prenormed_bwd)


def prenormed_inputs(x, residual, w, gs, eps_pre: float, eps: float) -> tuple:
  """`(h, y_qs)`: the stream `h = x + residual` (`x` itself when `residual` is None) and the quantized inputs
  `y_q[j] [..., K]` of `RMSNorm(h) * w` (as the block's norm rounds it) for each norm scale `gs[j]` of `gs [n, K]`.
  Differentiable in x, residual, w and gs (straight through the quantizer and the rounding of the norm's output);
  `h`'s own cotangent (its readers besides these BitLinears) is added inside the backward kernel."""
  k = x.shape[-1]
  if gs.ndim != 2 or gs.shape[1] != k or w.shape != (k,) or (residual is not None and residual.shape != x.shape):
    raise ValueError(f"prenorm kernel: x, residual [..., K], w [K] and norm scales [n, K] expected; got {x.shape}, "
                     f"{None if residual is None else residual.shape}, {w.shape} and {gs.shape}")
  if k > MAX_WIDTH:
    raise ValueError(f"prenorm kernel: rows of width {k} > {MAX_WIDTH} are not walked in whole-row tiles")
  rows = lambda v: v.reshape(-1, k)
  flat = lambda h, ys: (h, *ys)
  row_axes = (bk.ROW_AXES,) * (gs.shape[0] + 1)
  if residual is None:  # h is x itself, returned through the kernel's VJP so that its cotangent arrives there
    fn = lambda x_, w_, g_: flat(*_prenormed(x_, None, w_, g_, eps_pre, eps))
    h, *y_qs = pallas_util.per_device(fn, (bk.ROW_AXES, (None,), (None, None)), row_axes)(rows(x), w, gs)
  else:
    fn = lambda x_, r_, w_, g_: flat(*_prenormed(x_, r_, w_, g_, eps_pre, eps))
    h, *y_qs = pallas_util.per_device(fn, (bk.ROW_AXES, bk.ROW_AXES, (None,), (None, None)), row_axes)(
        rows(x), rows(residual), w, gs)
  return h.reshape(x.shape), tuple(y.reshape(x.shape) for y in y_qs)
