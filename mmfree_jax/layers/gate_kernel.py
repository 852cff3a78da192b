"""The MLGRU output gate's backward as one GPU kernel (Pallas, Triton backend): one read of each input.

For rows of `g_raw`, `h` and the cotangent `do` of o = rms_normalize(g_raw) * scale * silu(h) (float32 math;
float64 for float64 inputs), `mlgru_gates._output_gate_bwd`'s formulas:
  rstd = rsqrt(mean(g^2) + eps),  ghat = g * rstd,  s = sigmoid(h)
  dh = do * ghat * scale * s * (1 + h (1 - s)),   dghat = do * h s * scale,   d_scale = sum over rows of do h s ghat
  dg = rstd * (dghat - ghat * mean(dghat * ghat))
XLA spends these in three passes over the rows (two row reductions, then the element-wise outputs) plus a float32
copy of `do`; here each program walks its rows in whole-row tiles (`bitlinear_kernel`'s tiling), reading each
element once and writing dg and dh once; d_scale is summed per program and over programs by XLA. Off GPUs the
kernel runs in Pallas' interpret mode (tests); under a mesh each device runs it on its rows, the width whole.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.layers import bitlinear_kernel as bk
from mmfree_jax.layers import dtypes
from mmfree_jax.layers import pallas_util


def _kernel(g_ref, h_ref, do_ref, w_ref, dg_ref, dh_ref, dw_ref, *, eps):
  n_rows, k = g_ref.shape
  pieces = bk._pieces(k)  # pylint: disable=protected-access
  w = [w_ref[pl.ds(o, m)] for o, m in pieces]

  def visit(dw, r0, rows):
    g, h, do = (bk._load(ref, r0, rows, pieces) for ref in (g_ref, h_ref, do_ref))  # pylint: disable=protected-access
    ghat, rstd = bk._stats(g, k, eps)  # pylint: disable=protected-access
    s = [bk._sigmoid(v) for v in h]  # pylint: disable=protected-access
    dgn = [d * v * u for d, v, u in zip(do, h, s)]  # do * silu(h)
    dghat = [a * c[None] for a, c in zip(dgn, w)]
    mean = bk._row_sum([a * b for a, b in zip(dghat, ghat)]) / k  # pylint: disable=protected-access
    for (o, m), a, b, d, v, u, c in zip(pieces, dghat, ghat, do, h, s, w):
      dg_ref[pl.ds(r0, rows), pl.ds(o, m)] = (rstd * (a - b * mean)).astype(dg_ref.dtype)
      dh_ref[pl.ds(r0, rows), pl.ds(o, m)] = (d * b * c[None] * u * (1.0 + v * (1.0 - u))).astype(dh_ref.dtype)
    return [acc + jnp.sum(a * b, axis=0) for acc, a, b in zip(dw, dgn, ghat)]

  dw = bk._walk_tiles(n_rows, k, visit, [jnp.zeros((m,), w_ref.dtype) for _, m in pieces])  # pylint: disable=protected-access
  for (o, m), v in zip(pieces, dw):
    dw_ref[pl.program_id(0), pl.ds(o, m)] = v


def _backward_rows(g, h, do, scale, eps):
  n_rows, k = g.shape
  n_prog = bk._geometry(n_rows, k)[2]  # pylint: disable=protected-access
  acc = dtypes.accum(g.dtype)
  shapes = (jax.ShapeDtypeStruct(g.shape, g.dtype), jax.ShapeDtypeStruct(h.shape, h.dtype),
            jax.ShapeDtypeStruct((n_prog, k), acc))
  dg, dh, dw = pl.pallas_call(
      functools.partial(_kernel, eps=eps), out_shape=shapes, grid=(n_prog,), name="output_gate_backward",
      in_specs=[pl.BlockSpec()] * 4, out_specs=[pl.BlockSpec()] * 3,  # whole arrays: programs index their rows
      interpret=pallas_util.interpret(),
      compiler_params=plgpu.CompilerParams(num_warps=bk._num_warps(k, 2)),  # pylint: disable=protected-access
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
  # d_scale's per-program sums leave the devices as rows, summed over all of them outside.
  dg, dh, dw = pallas_util.per_device(fn, (bk.ROW_AXES,) * 3 + ((None,),), (bk.ROW_AXES,) * 3)(
      rows(g_raw), rows(h), rows(do), scale)
  return dg.reshape(g_raw.shape), dh.reshape(h.shape), jnp.sum(dw, axis=0)
