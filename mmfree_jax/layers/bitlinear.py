"""BitLinear: RMSNorm -> per-token 8-bit activations x per-matrix ternary weights, as the official code computes it.

Forward, per token row x (norm and quantizers in float32, or float64 under x64):
  y   = x / sqrt(mean(x^2) + eps) * g
  s_x = 127 / max(max|y|, 1e-5)            q_x = clip(round_half_away(y * s_x), -128, 127)   (integers)
  s_w = 1 / max(mean|W|, 1e-5)             q_w = clip(round_half_even(W * s_w), -1, 1)      (ternary)
  out = (q_x @ q_w) / (s_x * s_w)          == y_q @ W_q with y_q = q_x / s_x, W_q = q_w / s_w
Backward: straight-through estimators on both quantizers, scales treated as constants:
  dL/dy = dout @ W_q^T,  dL/dW = y_q^T @ dout,  dL/dx through the exact RMSNorm backward.

The implementations (`impl`), identical in value:
  fused    a `jax.custom_vjp` that saves only the layer input (and the parameters it already holds) and recomputes
           the norm and both quantizers in the backward pass: the memory saving of the official fused layer.
           The forward matmul runs on integer-valued operands in the compute dtype (exact in bfloat16: |q| <= 128)
           with float32 accumulation, then rescales.
  int8     as fused, but the forward matmul is a true int8 x int8 -> int32 `lax.dot_general`: MatMul-free
           arithmetic (accumulate ternary-signed int8 activations), then one float rescale.
  vanilla  plain autodiff through `y + stop_gradient(q(y) - y)`: keeps the normalized and quantized activations
           for the backward pass. The reference and the ablation baseline.
  pallas   vanilla with the activation path (norm, absmax, quantize; and its backward) in one GPU kernel per
           direction (`bitlinear_kernel`; interpret mode off GPUs), the product a GEMM as in vanilla.
  pallas_fused
           pallas' values with fused's memory: a `jax.custom_vjp` that saves only the layer input and the
           parameters; its backward reruns the forward kernel for y_q (one read of x) and requantizes the weight,
           so neither y_q nor the bf16 ternary weight stays live between the passes, under any remat policy.
  auto     pallas on GPUs, vanilla elsewhere.

Weights quantized once (`prequantized=True`; the MatMul-free LM's `model.quantize_weights_once`): the caller passes
the kernel already in its forward value `ternary_weight(kernel)` (compute dtype), computed once for the whole
layer stack before the layer loop (`quantize_stacked`), and the layer skips its own weight quantizer. The same
values as quantizing per use under vanilla / pallas / pallas_fused; the gradient reaches the latent float32
kernel through `ternary_weight`'s straight-through estimator.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax.layers import dtypes
from mmfree_jax.layers.norm import PreNorm, rms_normalize

IMPLS = ("fused", "int8", "vanilla", "pallas", "pallas_fused", "auto")
SCALE_FLOOR = 1e-5


def round_half_away(v):
  """Round to nearest, ties away from zero (the activation quantizer's rule)."""
  return jnp.where(v < 0, -jnp.floor(0.5 - v), jnp.floor(v + 0.5))  # a select fuses; a sign() product need not


def quantize_activations(y):
  """Per-row 8-bit absmax quantization: (integer-valued q in y's dtype, 1/s_x with shape [..., 1])."""
  amax = jnp.max(jnp.abs(y), axis=-1, keepdims=True)
  scale = 127.0 / jnp.maximum(amax, SCALE_FLOOR)
  q = jnp.clip(round_half_away(y * scale), -128, 127)
  return q, 1.0 / scale


def quantize_weight(w, batch_dims: int = 0):
  """Per-matrix absmean ternary quantization: (q in {-1, 0, 1} in w's accum dtype, 1/s_w).

  1/s_w is a scalar; with `batch_dims > 0`, `w` is a stack of matrices (its first `batch_dims` axes index them)
  and 1/s_w has one value per matrix, shaped to broadcast against `w`.
  """
  w = w.astype(dtypes.accum(w.dtype))
  mean = jnp.mean(jnp.abs(w), axis=tuple(range(batch_dims, w.ndim)), keepdims=batch_dims > 0)
  scale = 1.0 / jnp.maximum(mean, SCALE_FLOOR)
  return jnp.clip(jnp.round(w * scale), -1, 1), 1.0 / scale


def ternary_weight(w, dtype, batch_dims: int = 0):
  """The straight-through ternary weight `w + stop_gradient(W_q - w)` in `dtype`, the product's operand.

  Its value is W_q up to that sum's rounding (shared by vanilla, pallas and pallas_fused); its gradient passes to
  `w` unchanged.
  `batch_dims`: as in `quantize_weight` (one scale per stacked matrix).
  """
  w32 = w.astype(dtypes.accum(w.dtype))
  qw, inv_sw = quantize_weight(w32, batch_dims)
  return (w32 + lax.stop_gradient(qw * inv_sw - w32)).astype(dtype)


def quantize_stacked(tree, dtype):
  """`tree` (a layer stack's variables, every leaf stacked on a leading layers axis) with each BitLinear kernel
  (a `kernel` next to a `norm_scale`) replaced by `ternary_weight(kernel, dtype, batch_dims=1)`: the weights of
  all layers quantized at once, for BitLinears called with `prequantized=True`. Boxed leaves stay boxed."""
  def weight(k):
    if isinstance(k, nn.meta.AxisMetadata):
      return k.replace_boxed(weight(k.unbox()))
    return ternary_weight(k, dtype, batch_dims=1)

  def visit(node):
    if not isinstance(node, dict):
      return node
    out = {key: visit(value) for key, value in node.items()}
    if "kernel" in node and "norm_scale" in node and not isinstance(node["kernel"], dict):
      out["kernel"] = weight(node["kernel"])
    return out

  return visit(tree)


def _normalize(x, g, eps):
  xhat = rms_normalize(x, eps)
  return xhat, xhat * g.astype(xhat.dtype)


def _matmul(a, b, acc):
  """`a[..., i] @ b[i, o]` with accumulation in `acc`."""
  return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc)


def _forward(x, g, w, eps, impl):
  acc = dtypes.accum(x.dtype)
  _, y = _normalize(x, g, eps)
  qx, inv_sx = quantize_activations(y)
  qw, inv_sw = quantize_weight(w)
  if impl == "int8":
    out = _matmul(qx.astype(jnp.int8), qw.astype(jnp.int8), jnp.int32).astype(acc)
  else:
    out = _matmul(qx.astype(x.dtype), qw.astype(x.dtype), acc)
  return (out * (inv_sx * inv_sw)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bitlinear_recompute(x, g, w, eps, impl):
  return _forward(x, g, w, eps, impl)


def _recompute_fwd(x, g, w, eps, impl):
  return _forward(x, g, w, eps, impl), (x, g, w)


def _recompute_bwd(eps, impl, res, dout):
  del impl
  x, g, w = res
  acc = dtypes.accum(x.dtype)
  xhat, y = _normalize(x, g, eps)
  qx, inv_sx = quantize_activations(y)
  qw, inv_sw = quantize_weight(w)
  y_q = (qx * inv_sx).astype(x.dtype)
  # dL/dW = y_q^T @ dout (straight through the weight quantizer).
  dw = jnp.einsum("...i,...o->io", y_q, dout, preferred_element_type=acc)
  # dL/dy = dout @ W_q^T (straight through the activation quantizer).
  dy = lax.dot_general(dout, qw.astype(dout.dtype), (((dout.ndim - 1,), (1,)), ((), ())),
                       preferred_element_type=acc) * inv_sw
  dg = jnp.sum((dy * xhat).reshape(-1, xhat.shape[-1]), axis=0)
  dxhat = dy * g.astype(acc)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(acc)), axis=-1, keepdims=True) + eps)
  dx = rstd * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dg.astype(g.dtype), dw.astype(w.dtype)


_bitlinear_recompute.defvjp(_recompute_fwd, _recompute_bwd)


def _quantized_input_xla(x, g, eps, xhat=None):
  if xhat is None:
    xhat = rms_normalize(x, eps)
  y = xhat * g.astype(xhat.dtype)
  qx, inv_sx = quantize_activations(y)
  return y + lax.stop_gradient(qx * inv_sx - y)


def _bitlinear_vanilla(x, g, w, eps, xhat=None, use_kernel=False, prequantized=False, glu=False):
  if use_kernel:
    y_q = _kernel().quantized_inputs(x, g[None], eps, glu)[0]
  else:
    y_q = _quantized_input_xla(x, g, eps, xhat)
  return _ste_product(x, y_q, w, prequantized)


def _ste_product(x, y_q, w, prequantized=False):
  """`y_q @ W_q` in x's dtype, straight through the weight quantizer (autodiff)."""
  w_q = w.astype(x.dtype) if prequantized else ternary_weight(w, x.dtype)
  # Product in the compute dtype: a float32 result would make the backward GEMMs float32 (see layers.dense).
  return _matmul(y_q.astype(x.dtype), w_q, x.dtype)


def _kernel():
  from mmfree_jax.layers import bitlinear_kernel  # pylint: disable=g-import-not-at-top  (it imports this module)
  return bitlinear_kernel


def _weight_operand(w, dtype, prequantized):
  """The product's weight operand: W_q in `dtype` (the forward value of `ternary_weight`)."""
  return w.astype(dtype) if prequantized else ternary_weight(w, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel_recompute(x, gs, ws, eps, prequantized, glu=False):
  """pallas_fused for n BitLinears reading x: norm scales `gs [n, K]`, kernels `ws` (a tuple of n `[K, N_j]`)."""
  return _kernel_recompute_fwd(x, gs, ws, eps, prequantized, glu)[0]


def _kernel_recompute_fwd(x, gs, ws, eps, prequantized, glu=False):
  y_qs = _kernel().quantized_inputs(x, gs, eps, glu)
  outs = tuple(_matmul(y, _weight_operand(w, x.dtype, prequantized), x.dtype) for y, w in zip(y_qs, ws))
  return outs, (x, gs, ws)


def _products_bwd(y_qs, ws, douts, dtype, prequantized):
  """The GEMMs' backward of each `y_q @ W_q`: (dy_q per product, dW per kernel in its dtype, straight through the
  weight quantizer)."""
  dys, dws = [], []
  for y_q, w, dout in zip(y_qs, ws, douts):
    _, product_vjp = jax.vjp(lambda a, b: _matmul(a, b, dtype), y_q, _weight_operand(w, dtype, prequantized))
    dy, dw = product_vjp(dout)
    dys.append(dy)
    dws.append(dw.astype(w.dtype))
  return tuple(dys), tuple(dws)


def _kernel_recompute_bwd(eps, prequantized, glu, res, douts):
  # The barrier makes the recomputation's operands new values that depend on the cotangents: XLA can then
  # neither merge the forward kernel below with the forward pass's (CSE, which would keep y_q live after all)
  # nor run it early.
  (x, gs, ws), douts = lax.optimization_barrier((res, douts))
  # The forward kernel again (y_q), then each product's two GEMMs, then the backward kernel (straight through
  # the activation quantizer): what autodiff of the pallas impl runs, from the input alone.
  y_qs, input_vjp = jax.vjp(lambda x_, g_: _kernel().quantized_inputs(x_, g_, eps, glu), x, gs)
  dys, dws = _products_bwd(y_qs, ws, douts, x.dtype, prequantized)
  dx, dgs = input_vjp(dys)
  return dx, dgs, dws


_kernel_recompute.defvjp(_kernel_recompute_fwd, _kernel_recompute_bwd)


def _prenorm():
  from mmfree_jax.layers import prenorm_kernel  # pylint: disable=g-import-not-at-top  (it imports this module)
  return prenorm_kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _prenorm_recompute(x, residual, w_pre, gs, ws, eps_pre, eps, prequantized):
  """`_kernel_recompute` with the block's norm (and residual add) in the kernel: (stream, outputs); saves only
  the stream, and recomputes the quantized inputs from it in the backward pass."""
  return _prenorm_recompute_fwd(x, residual, w_pre, gs, ws, eps_pre, eps, prequantized)[0]


def _prenorm_recompute_fwd(x, residual, w_pre, gs, ws, eps_pre, eps, prequantized):
  h, y_qs = _prenorm().prenormed_inputs(x, residual, w_pre, gs, eps_pre, eps)
  outs = tuple(_matmul(y, _weight_operand(w, x.dtype, prequantized), x.dtype) for y, w in zip(y_qs, ws))
  return (h, outs), ((h, w_pre, gs, ws), residual is not None)


def _prenorm_recompute_bwd(eps_pre, eps, prequantized, res, cts):
  (h, w_pre, gs, ws), (dh_out, douts) = lax.optimization_barrier((res[0], cts))  # as in _kernel_recompute_bwd
  (_, y_qs), input_vjp = jax.vjp(lambda h_, w_, g_: _prenorm().prenormed_inputs(h_, None, w_, g_, eps_pre, eps),
                                 h, w_pre, gs)
  dys, dws = _products_bwd(y_qs, ws, douts, h.dtype, prequantized)
  dh, dw_pre, dgs = input_vjp((dh_out, dys))
  return dh, (dh if res[1] else None), dw_pre, dgs, dws


_prenorm_recompute.defvjp(_prenorm_recompute_fwd, _prenorm_recompute_bwd)


def resolve(impl: str) -> str:
  """`impl` with "auto" resolved for the default backend; a ValueError for an unknown one."""
  if impl not in IMPLS:
    raise ValueError(f"unknown BitLinear impl {impl!r}; expected one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "vanilla"
  return impl


PREQUANTIZED_IMPLS = ("vanilla", "pallas", "pallas_fused", "auto")
KERNEL_IMPLS = ("pallas", "pallas_fused")  # the activation path in a kernel (`bitlinear_kernel`)


def _check_prequantized(impl: str, prequantized: bool):
  if prequantized and impl not in PREQUANTIZED_IMPLS:
    raise ValueError(f"BitLinear impl {impl!r} quantizes its own weight (its product uses the integer codes); "
                     f"weights quantized once need one of {PREQUANTIZED_IMPLS}")


def bitlinear(x, norm_scale, kernel, *, eps: float = 1e-6, impl: str = "fused", xhat=None,
              prequantized: bool = False, glu_input: bool = False):
  """BitLinear of `x[..., in]` with RMSNorm scale `norm_scale[in]` and latent weight `kernel[in, *out]`.

  `x` is in the compute dtype; the output `[..., *out]` has the same dtype. A kernel with several output axes
  (e.g. the GLU's fused gate/up `[d, 2, I]`) is one matrix: one weight scale over all of it.
  `xhat`, optional: `rms_normalize(x, eps)` computed by the caller, for BitLinears that read the same input
  (the MLGRU's f/i/g): autodiff then sums their cotangents and runs the normalization's backward once. The
  same values; used by `vanilla` only (the recomputing impls save and renormalize `x` themselves, and the
  `pallas` ones read `x` in their kernel).
  `prequantized`: `kernel` is already `ternary_weight(latent kernel)` (module docstring).
  `glu_input`: `x [..., 2, in]` is a GLU's gate/up projection and the layer's input is `glu.swiglu(x)`, computed
  inside the activation kernel (the kernel impls only: `pallas`, `pallas_fused`).
  """
  _check_prequantized(impl, prequantized)
  impl = resolve(impl)
  if glu_input and impl not in KERNEL_IMPLS:
    raise ValueError(f"BitLinear glu_input needs a kernel impl {KERNEL_IMPLS}, not {impl!r}")
  out_shape = kernel.shape[1:]
  kernel = kernel.reshape(kernel.shape[0], -1)
  if impl in ("vanilla", "pallas"):
    out = _bitlinear_vanilla(x, norm_scale, kernel, eps, xhat, use_kernel=impl == "pallas", prequantized=prequantized,
                             glu=glu_input)
  elif impl == "pallas_fused":
    out = _kernel_recompute(x, norm_scale[None], (kernel,), eps, prequantized, glu_input)[0]
  else:
    out = _bitlinear_recompute(x, norm_scale, kernel, eps, impl)
  return out.reshape(*out.shape[:-1], *out_shape)


def bitlinear_group(x, norm_scales, kernels, *, eps: float = 1e-6, impl: str = "fused",
                    prequantized: bool = False) -> tuple:
  """BitLinears that read the same `x [..., in]` (the MLGRU's f/i/g), each with its own norm scale `[in]` and
  kernel `[in, *out_j]`: `tuple(bitlinear(x, g, w) for g, w in ...)`, the same values. The kernel impls make one
  launch per direction for all of them (one read of x); vanilla normalizes x once (`xhat`)."""
  if len(norm_scales) != len(kernels) or not kernels:
    raise ValueError(f"bitlinear_group: one norm scale per kernel expected; got {len(norm_scales)} norm scales "
                     f"and {len(kernels)} kernels")
  _check_prequantized(impl, prequantized)
  impl = resolve(impl)
  if impl not in ("pallas", "pallas_fused"):
    xhat = rms_normalize(x, eps) if impl == "vanilla" else None
    return tuple(bitlinear(x, g, w, eps=eps, impl=impl, xhat=xhat, prequantized=prequantized)
                 for g, w in zip(norm_scales, kernels))
  flat = tuple(w.reshape(w.shape[0], -1) for w in kernels)
  gs = jnp.stack(norm_scales)
  if impl == "pallas":
    outs = tuple(_ste_product(x, y_q, w, prequantized)
                 for y_q, w in zip(_kernel().quantized_inputs(x, gs, eps), flat))
  else:
    outs = _kernel_recompute(x, gs, flat, eps, prequantized)
  return tuple(o.reshape(*o.shape[:-1], *w.shape[1:]) for o, w in zip(outs, kernels))


def prenormed_group(p: PreNorm, norm_scales, kernels, *, eps: float = 1e-6, impl: str = "fused",
                    prequantized: bool = False, dtype=jnp.bfloat16) -> tuple:
  """`(stream, outputs)`: `bitlinear_group` of the block's `RMSNorm` of `p` (`norm.PreNorm`), and the stream
  `p.x + p.residual` in `dtype`. The kernel impls compute the block's norm (and add) inside their activation
  kernel (`prenorm_kernel`), for rows up to `prenorm_kernel.MAX_WIDTH` wide; the others, and wider rows, apply
  `RMSNorm` first. The same values up to the norm's rounding."""
  impl = resolve(impl)
  x = p.x.astype(dtype)
  residual = None if p.residual is None else p.residual.astype(dtype)
  if impl not in KERNEL_IMPLS or x.shape[-1] > _prenorm().MAX_WIDTH:
    h, n = PreNorm(x, p.scale, p.eps, residual).unfused(dtype)
    return h, bitlinear_group(n, norm_scales, kernels, eps=eps, impl=impl, prequantized=prequantized)
  _check_prequantized(impl, prequantized)
  flat = tuple(w.reshape(w.shape[0], -1) for w in kernels)
  gs = jnp.stack(norm_scales)
  if impl == "pallas":
    h, y_qs = _prenorm().prenormed_inputs(x, residual, p.scale, gs, p.eps, eps)
    outs = tuple(_ste_product(x, y_q, w, prequantized) for y_q, w in zip(y_qs, flat))
  else:
    h, outs = _prenorm_recompute(x, residual, p.scale, gs, flat, p.eps, eps, prequantized)
  return h, tuple(o.reshape(*o.shape[:-1], *w.shape[1:]) for o, w in zip(outs, kernels))


def int_accumulators(x, norm_scale, kernel, *, eps: float = 1e-6):
  """The integer part of the int8 path: (int32 `q_x @ q_w`, 1/s_x, 1/s_w). For tests and inference."""
  _, y = _normalize(x, norm_scale, eps)
  qx, inv_sx = quantize_activations(y)
  qw, inv_sw = quantize_weight(kernel)
  return _matmul(qx.astype(jnp.int8), qw.astype(jnp.int8), jnp.int32), inv_sx, inv_sw


class BitLinear(nn.Module):
  """A ternary linear layer with its own RMSNorm (no bias). Parameters: `kernel [in, *features]`, `norm_scale [in]`.

  `axes` are the logical axis names of the kernel (input axis, output axes); the norm scale uses the input's.
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...] = ("embed", "mlp")
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  eps: float = 1e-6
  impl: str = "fused"
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  prequantized: bool = False  # the kernel arrives as `ternary_weight(kernel)` (`quantize_stacked`)
  glu_input: bool = False  # x is [..., 2, in] and the input is swiglu(x), in the kernel (`bitlinear`)

  @nn.compact
  def __call__(self, x):
    """The layer of `x [..., in]`; of a `norm.PreNorm`, `(stream, output)` (`prenormed_group`).
    BitLinears that share an input: `BitLinearParams` and `bitlinear_group`."""
    if isinstance(x, PreNorm):
      if self.glu_input:
        raise ValueError("BitLinear: a GLU input (glu_input) has no block norm before it; got a PreNorm")
      norm_scale, kernel = _declare_params(self, x.x.shape[-1])
      h, (out,) = prenormed_group(x, (norm_scale,), (kernel,), eps=self.eps, impl=self.impl,
                                  prequantized=self.prequantized, dtype=self.dtype)
      return h, checkpoint_name(out, "proj")
    norm_scale, kernel = _declare_params(self, x.shape[-1])
    out = bitlinear(x.astype(self.dtype), norm_scale, kernel, eps=self.eps, impl=self.impl,
                    prequantized=self.prequantized, glu_input=self.glu_input)
    return checkpoint_name(out, "proj")


def _declare_params(module, d_in: int):
  """A BitLinear's parameters in `module`'s scope: (norm_scale [in], kernel [in, *features])."""
  features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
  kernel = module.param("kernel", nn.with_logical_partitioning(module.kernel_init, module.axes),
                        (d_in, *features), module.param_dtype)
  norm_scale = module.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones, module.axes[:1]),
                            (d_in,), module.param_dtype)
  return norm_scale, kernel


class BitLinearParams(nn.Module):
  """A BitLinear's parameters alone (the same names, shapes, axes and initial values), for a caller that applies
  several BitLinears at once (`bitlinear_group`): `BitLinearParams(..., name="f_proj")(d_in)` returns
  `(norm_scale, kernel)`, and the parameter tree is the one `BitLinear(..., name="f_proj")` makes."""
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...] = ("embed", "mlp")
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, d_in: int):
    return _declare_params(self, d_in)
