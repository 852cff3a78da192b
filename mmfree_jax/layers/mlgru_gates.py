"""The MLGRU's element-wise gates, each with a VJP that keeps only its compute-dtype inputs.

  input gates   (f_raw, i_raw, lb) -> (f, i):  f = lb + (1 - lb) * sigmoid(f_raw),  i = silu(i_raw) * (1 - f)
  output gate   (g_raw, h, scale)  -> o:       o = rms_normalize(g_raw) * scale * silu(h)

Both compute in float32 (float64 for float64 inputs) and return the compute dtype, as the plain formulas
(`input_gates_reference`, `output_gate_reference`) differentiated by autodiff do. Autodiff keeps float32
intermediates for its backward pass (sigmoid(f_raw), f, silu(i_raw), the normalized g, silu(h): each twice the
size of a compute-dtype activation) and its backward writes float32 cotangents between fusions. These VJPs keep
the raw projections (compute dtype; `h` is the recurrence's output, which the recurrence keeps anyway) and
recompute the rest in one element-wise pass per direction, behind an optimization barrier: without it XLA merged
the recomputed float32 f with the forward's and kept it, 2 bytes per element more than the VJP's residuals
(benchmarks/README.md, log item 44). The output gate's backward, two row reductions and the element-wise
outputs, takes three passes in XLA's fusions; `output_gate(..., kernel=True)` runs it as one GPU kernel
(`gate_kernel`; item 45), and `input_gates(..., kernel=True)` the input gates' backward (item 47). Same
values as the references up to float32 rounding order (`tests/layers/test_mlgru_gates.py`).
"""

import functools

import jax
import jax.numpy as jnp

from mmfree_jax.layers import dtypes
from mmfree_jax.layers import gate_kernel
from mmfree_jax.layers.norm import rms_normalize


def _f32(*xs):
  return tuple(x.astype(dtypes.accum(x.dtype)) for x in xs)


def _after(res, cts):
  """The residuals as new values that depend on the cotangents (an optimization barrier, as in
  `bitlinear._kernel_recompute_bwd`): XLA can then not merge the backward's recomputation with the forward pass's
  identical formulas (CSE), which kept float32 f as a residual. The cotangents themselves are used as they are,
  so that the element-wise work producing them still fuses into the backward's fusion."""
  return jax.lax.optimization_barrier((res, cts))[0]


def input_gates_reference(f_raw, i_raw, lb):
  f_raw, i_raw = _f32(f_raw, i_raw)
  lb = lb.astype(f_raw.dtype)
  f = lb + (1.0 - lb) * jax.nn.sigmoid(f_raw)
  return f, jax.nn.silu(i_raw) * (1.0 - f)


def output_gate_reference(g_raw, h, scale, eps):
  g, h = _f32(g_raw, h)
  return rms_normalize(g, eps) * scale.astype(g.dtype) * jax.nn.silu(h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def input_gates(f_raw, i_raw, lb, resets=None, kernel=False):
  """(f, i) in f_raw's dtype for the recurrence `h_t = f_t h_{t-1} + i_t`; `lb [D]` the layer's lower bound.
  `resets [B, T]` (True where a document starts): f is zeroed there (the recurrence's state reset, as
  `recurrence.linear_scan(..., resets)` does). `kernel`: the backward as one GPU kernel
  (`gate_kernel.input_gates_backward`; interpret mode off GPUs)."""
  del kernel
  f, i = input_gates_reference(f_raw, i_raw, lb)
  f = f.astype(f_raw.dtype)
  if resets is not None:
    f = jnp.where(resets[..., None], jnp.zeros((), f.dtype), f)
  return f, i.astype(f_raw.dtype)


def _input_gates_fwd(f_raw, i_raw, lb, resets, kernel):
  return input_gates(f_raw, i_raw, lb, resets, kernel), (f_raw, i_raw, lb, resets)


def _input_gates_bwd(kernel, res, cts):
  f_raw, i_raw, lb, resets = _after(res, cts)
  if kernel:
    keep = None if resets is None else jnp.logical_not(resets)
    return (*gate_kernel.input_gates_backward(f_raw, i_raw, lb, *cts, keep), None)
  df, di = _f32(*cts)
  if resets is not None:
    df = jnp.where(resets[..., None], jnp.zeros((), df.dtype), df)
  fr, ir = _f32(f_raw, i_raw)
  lb32 = lb.astype(fr.dtype)
  s, si = jax.nn.sigmoid(fr), jax.nn.sigmoid(ir)
  f = lb32 + (1.0 - lb32) * s
  df = df - di * (ir * si)  # i = silu(i_raw) * (1 - f)
  d_fr = df * (1.0 - lb32) * s * (1.0 - s)
  d_ir = di * (1.0 - f) * si * (1.0 + ir * (1.0 - si))
  d_lb = jnp.sum((df * (1.0 - s)).reshape(-1, lb.shape[-1]), axis=0)
  return d_fr.astype(f_raw.dtype), d_ir.astype(i_raw.dtype), d_lb.astype(lb.dtype), None


input_gates.defvjp(_input_gates_fwd, _input_gates_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def output_gate(g_raw, h, scale, eps, kernel=False):
  """`rms_normalize(g_raw) * scale * silu(h)` in g_raw's dtype (computed in float32); `scale [D]` the norm's
  scale. `kernel`: the backward as one GPU kernel (`gate_kernel.output_gate_backward`; interpret mode off GPUs),
  which reads the compute-dtype cotangent as it arrives."""
  return output_gate_reference(g_raw, h, scale, eps).astype(g_raw.dtype)


def _output_gate_fwd(g_raw, h, scale, eps, kernel):
  return output_gate(g_raw, h, scale, eps, kernel), (g_raw, h, scale)


def _output_gate_bwd(eps, kernel, res, do):
  g_raw, h, scale = _after(res, do)
  if kernel:
    dg, dh, d_scale = gate_kernel.output_gate_backward(g_raw, h, do, scale, eps)
    return dg, dh, d_scale.astype(scale.dtype)
  g, h32 = _f32(g_raw, h)
  do = do.astype(g.dtype)
  w = scale.astype(g.dtype)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + eps)
  ghat = g * rstd
  sh = jax.nn.sigmoid(h32)
  silu_h = h32 * sh
  dh = do * ghat * w * sh * (1.0 + h32 * (1.0 - sh))
  dgn = do * silu_h
  d_scale = jnp.sum((dgn * ghat).reshape(-1, g.shape[-1]), axis=0)
  dghat = dgn * w
  dg = rstd * (dghat - ghat * jnp.mean(dghat * ghat, axis=-1, keepdims=True))
  return dg.astype(g_raw.dtype), dh.astype(h.dtype), d_scale.astype(scale.dtype)


output_gate.defvjp(_output_gate_fwd, _output_gate_bwd)
