"""The MLGRU gates' backward passes as GPU kernels (Pallas, Triton backend): one read of each input.

Input gates (`input_gates_backward`): for f = lb + (1 - lb) s_f, s_f = sigmoid(f_raw), i = silu(i_raw) (1 - f),
with f zeroed at resets, `mlgru_gates._input_gates_bwd`'s formulas per element (df zeroed at resets):
  df' = df - di i_raw s_i,  d_f_raw = df' (1 - lb) s_f (1 - s_f),  d_i_raw = di (1 - f) s_i (1 + i_raw (1 - s_i)),
  d_lb = sum over rows of df' (1 - s_f).
XLA wrote sigmoid(f_raw) in float32 for this (the reduction for d_lb and the outputs both use it) and read it
back; here one pass reads f_raw, i_raw and the two cotangents and writes the two outputs.

Output gate (`output_gate_backward`):

For rows of `g_raw`, `h` and the cotangent `do` of o = rms_normalize(g_raw) * scale * silu(h) (float32 math;
float64 for float64 inputs), `mlgru_gates._output_gate_bwd`'s formulas:
  rstd = rsqrt(mean(g^2) + eps),  ghat = g * rstd,  s = sigmoid(h)
  dh = do * ghat * scale * s * (1 + h (1 - s)),   dghat = do * h s * scale,   d_scale = sum over rows of do h s ghat
  dg = rstd * (dghat - ghat * mean(dghat * ghat))
XLA spends these in three passes over the rows (two row reductions, then the element-wise outputs) plus a float32
copy of `do`; here each program walks its rows in whole-row tiles (`bitlinear_kernel`'s tiling), reading each
element once and writing dg and dh once; d_scale is summed per program and over programs by XLA.

Off GPUs the kernels run in Pallas' interpret mode (tests); under a mesh each device runs them on its rows, the
width whole, and the per-program sums leave the devices as rows, summed over all of them outside.
"""

# pylint: disable=protected-access
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.layers import bitlinear_kernel as bk  # its row tiling and helpers
from mmfree_jax.layers import dtypes
from mmfree_jax.layers import pallas_util


def _kernel(g_ref, h_ref, do_ref, w_ref, dg_ref, dh_ref, dw_ref, *, eps):
  n_rows, k = g_ref.shape
  pieces = bk._pieces(k)
  w = [w_ref[pl.ds(o, m)] for o, m in pieces]

  def visit(dw, r0, rows):
    g, h, do = (bk._load(ref, r0, rows, pieces) for ref in (g_ref, h_ref, do_ref))
    ghat, rstd = bk._stats(g, k, eps)
    s = [bk._sigmoid(v) for v in h]
    dgn = [d * v * u for d, v, u in zip(do, h, s)]  # do * silu(h)
    dghat = [a * c[None] for a, c in zip(dgn, w)]
    mean = bk._row_sum([a * b for a, b in zip(dghat, ghat)]) / k
    for (o, m), a, b, d, v, u, c in zip(pieces, dghat, ghat, do, h, s, w):
      dg_ref[pl.ds(r0, rows), pl.ds(o, m)] = (rstd * (a - b * mean)).astype(dg_ref.dtype)
      dh_ref[pl.ds(r0, rows), pl.ds(o, m)] = (d * b * c[None] * u * (1.0 + v * (1.0 - u))).astype(dh_ref.dtype)
    return [acc + jnp.sum(a * b, axis=0) for acc, a, b in zip(dw, dgn, ghat)]

  dw = bk._walk_tiles(n_rows, k, visit, [jnp.zeros((m,), w_ref.dtype) for _, m in pieces])
  for (o, m), v in zip(pieces, dw):
    dw_ref[pl.program_id(0), pl.ds(o, m)] = v


def _input_kernel(fr_ref, ir_ref, df_ref, di_ref, lb_ref, keep_ref, dfr_ref, dir_ref, dlb_ref):
  n_rows, k = fr_ref.shape
  pieces = bk._pieces(k)
  lb = [lb_ref[pl.ds(o, m)][None] for o, m in pieces]

  def visit(dlb, r0, rows):
    fr, ir, df, di = (bk._load(r, r0, rows, pieces) for r in (fr_ref, ir_ref, df_ref, di_ref))
    keep = keep_ref[pl.ds(r0, rows)].astype(fr[0].dtype)[:, None]
    out = []
    for (o, m), a, b, d, e, w, acc in zip(pieces, fr, ir, df, di, lb, dlb):
      sf, si = bk._sigmoid(a), bk._sigmoid(b)
      d = d * keep - e * (b * si)
      dfr_ref[pl.ds(r0, rows), pl.ds(o, m)] = (d * (1.0 - w) * sf * (1.0 - sf)).astype(dfr_ref.dtype)
      f = w + (1.0 - w) * sf
      dir_ref[pl.ds(r0, rows), pl.ds(o, m)] = (e * (1.0 - f) * si * (1.0 + b * (1.0 - si))).astype(dir_ref.dtype)
      out.append(acc + jnp.sum(d * (1.0 - sf), axis=0))
    return out

  dlb = bk._walk_tiles(n_rows, k, visit, [jnp.zeros((m,), lb_ref.dtype) for _, m in pieces])
  for (o, m), v in zip(pieces, dlb):
    dlb_ref[pl.program_id(0), pl.ds(o, m)] = v


def _input_rows(fr, ir, df, di, lb, keep):
  n_rows, k = fr.shape
  n_prog = bk._geometry(n_rows, k)[2]
  acc = dtypes.accum(fr.dtype)
  shapes = (jax.ShapeDtypeStruct(fr.shape, fr.dtype), jax.ShapeDtypeStruct(ir.shape, ir.dtype),
            jax.ShapeDtypeStruct((n_prog, k), acc))
  return pl.pallas_call(
      _input_kernel, out_shape=shapes, grid=(n_prog,), name="input_gates_backward",
      in_specs=[pl.BlockSpec()] * 6, out_specs=[pl.BlockSpec()] * 3,  # whole arrays: programs index their rows
      interpret=pallas_util.interpret(),
      compiler_params=plgpu.CompilerParams(num_warps=bk._num_warps(k, 2)),
  )(fr, ir, df.astype(fr.dtype), di.astype(fr.dtype), lb.astype(acc), keep.astype(acc))


def input_gates_backward(f_raw, i_raw, lb, df, di, keep=None):
  """`(d_f_raw, d_i_raw, d_lb)` of the input gates (`mlgru_gates.input_gates`) for `f_raw, i_raw` and the
  cotangents `df, di [..., D]` of (f, i), `lb [D]`, `keep [...]` (False where a document starts; None: nowhere):
  the raw projections' cotangents in their dtype, lb's in its dtype (see the module docstring)."""
  k = f_raw.shape[-1]
  if any(x.shape != f_raw.shape for x in (i_raw, df, di)) or lb.shape != (k,) or (
      keep is not None and keep.shape != f_raw.shape[:-1]):
    raise ValueError(f"input gates kernel: f_raw, i_raw, df, di [..., D], lb [D] and keep [...] expected; got "
                     f"{f_raw.shape}, {i_raw.shape}, {df.shape}, {di.shape}, {lb.shape}, "
                     f"{None if keep is None else keep.shape}")
  keep = jnp.ones(f_raw.shape[:-1], bool) if keep is None else keep
  rows = lambda x: x.reshape(-1, k)
  d_fr, d_ir, d_lb = pallas_util.per_device(
      _input_rows, (bk.ROW_AXES,) * 4 + ((None,), bk.ROW_AXES[:1]), (bk.ROW_AXES,) * 3)(
          rows(f_raw), rows(i_raw), rows(df), rows(di), lb, keep.reshape(-1))
  return d_fr.reshape(f_raw.shape), d_ir.reshape(i_raw.shape), jnp.sum(d_lb, axis=0).astype(lb.dtype)


def _backward_rows(g, h, do, scale, eps):
  n_rows, k = g.shape
  n_prog = bk._geometry(n_rows, k)[2]
  acc = dtypes.accum(g.dtype)
  shapes = (jax.ShapeDtypeStruct(g.shape, g.dtype), jax.ShapeDtypeStruct(h.shape, h.dtype),
            jax.ShapeDtypeStruct((n_prog, k), acc))
  dg, dh, dw = pl.pallas_call(
      functools.partial(_kernel, eps=eps), out_shape=shapes, grid=(n_prog,), name="output_gate_backward",
      in_specs=[pl.BlockSpec()] * 4, out_specs=[pl.BlockSpec()] * 3,  # whole arrays: programs index their rows
      interpret=pallas_util.interpret(),
      compiler_params=plgpu.CompilerParams(num_warps=bk._num_warps(k, 2)),
  )(g, h, do.astype(g.dtype), scale.astype(acc))
  return dg, dh, dw


def output_gate_backward(g_raw, h, do, scale, eps: float):
  """`(dg_raw, dh, d_scale)` of o = rms_normalize(g_raw) * scale * silu(h) for `g_raw, h, do [..., D]`, `scale
  [D]`: dg_raw and dh in g_raw's / h's dtype, d_scale in the accumulation dtype (see the module docstring)."""
  k = g_raw.shape[-1]
  if h.shape != g_raw.shape or do.shape != g_raw.shape or scale.shape != (k,):
    raise ValueError(f"output gate kernel: g_raw, h, do [..., D] and scale [D] expected; got {g_raw.shape}, "
                     f"{h.shape}, {do.shape}, {scale.shape}")
  rows = lambda x: x.reshape(-1, k)
  fn = lambda g_, h_, do_, w_: _backward_rows(g_, h_, do_, w_, eps)
  dg, dh, dw = pallas_util.per_device(fn, (bk.ROW_AXES,) * 3 + ((None,),), (bk.ROW_AXES,) * 3)(
      rows(g_raw), rows(h), rows(do), scale)
  return dg.reshape(g_raw.shape), dh.reshape(h.shape), jnp.sum(dw, axis=0)
