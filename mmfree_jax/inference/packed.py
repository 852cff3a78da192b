"""Ternary weights for inference: quantize once, pack 4 per byte, multiply with int8 activations.

A BitLinear appears in three forms; `ternary_linear` takes any of them:

  latent    {'kernel' [in, *out] float, 'norm_scale' [in]}              (training checkpoints)
  ternary   {'q' [in, *out] int8 in {-1,0,1}, 'inv_sw' [], 'norm_scale'}  (latent quantized once per call)
  packed    {'packed' [ceil(in/4), *out] uint8, 'inv_sw' [], 'norm_scale'} (export checkpoints)

Packing: the code of a weight is `q + 1` in {0, 1, 2} (2 bits). With `n = ceil(in / 4)` and the input axis
padded to 4n with zeros, byte `r` holds rows `r, r + n, r + 2n, r + 3n` in bits 0-1, 2-3, 4-5, 6-7, so unpacking
is four shifts along a new leading axis of four (`codes`), done inside the compiled step where the product that
reads them fuses them; the activations are split the same way (`[..., 4, n]`).

`inv_sw = 1/s_w = max(mean|W|, 1e-5)` is kept from the quantization of the latent weight. Quantization is not
idempotent: quantizing already-ternary values again keeps their signs but changes the scale to the fraction of
non-zeros, so a packed checkpoint is never re-quantized; its `inv_sw` is used as stored.

The matmul multiplies the int8 activation codes by the ternary codes and accumulates exactly, then rescales once
by `1/s_x * 1/s_w`, the same arithmetic as BitLinear's `int8` implementation. `PRODUCT` picks the instruction:
`int8` is `lax.dot_general(int8, int8, preferred_element_type=int32)`; `bf16` multiplies the same codes held in
bfloat16 (exact: |codes| <= 127) with float32 accumulation, which is exact while |sum| < 2^24 (127 * in < 2^24,
in < 132k), so both give the same accumulators bit for bit; `bf16` reaches the GPU's float GEMM/GEMV kernels.
The default (`PRODUCT = None`) is `bf16` on GPUs and `int8` elsewhere: on the H100 (jax 0.11.2), XLA's int8
product gave wrong accumulators for the tiny test model's single-row decoding steps, where `bf16` (and XLA on the
CPU) agree (`python -m benchmarks.decode_parity`).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mmfree_jax.inference import ternary_kernel
from mmfree_jax.layers import dtypes
from mmfree_jax.layers.bitlinear import quantize_activations, quantize_weight
from mmfree_jax.layers.norm import rms_normalize

FORMAT = "packed-ternary-v1"
PRODUCTS = ("int8", "bf16")
PRODUCT = None  # module default of `ternary_linear(product=None)`; None: `default_product()`


def default_product() -> str:
  """`PRODUCT`, or where it is None the platform's: bf16 on GPUs (see the module docstring), int8 elsewhere."""
  if PRODUCT is not None:
    return PRODUCT
  return "bf16" if jax.default_backend() == "gpu" else "int8"


def is_bitlinear(node: Any) -> bool:
  """A parameter dict of one BitLinear in any of the three forms."""
  return isinstance(node, dict) and "norm_scale" in node and any(k in node for k in ("kernel", "q", "packed"))


def pack(q_in_out: jax.Array) -> jax.Array:
  """Ternary int8 `[in, *out]` -> uint8 `[ceil(in/4), *out]` (see the module docstring)."""
  n_in = q_in_out.shape[0]
  n = -(-n_in // 4)
  codes = (q_in_out.astype(jnp.int32) + 1).astype(jnp.uint8)
  codes = jnp.pad(codes, [(0, 4 * n - n_in)] + [(0, 0)] * (codes.ndim - 1), constant_values=1)
  parts = [codes[k * n:(k + 1) * n] << (2 * k) for k in range(4)]
  return (parts[0] | parts[1] | parts[2] | parts[3]).astype(jnp.uint8)


def codes(packed: jax.Array) -> jax.Array:
  """uint8 `[n, *out]` -> ternary int8 `[4, n, out]`: row `k * n + r` of the weight is `[k, r]` (the input axis
  split in four, no concatenation: the shifts fuse into the product that reads them)."""
  shifts = jnp.arange(0, 8, 2, dtype=jnp.uint8).reshape(4, 1, 1)
  p = packed.reshape(1, packed.shape[0], -1)
  return (((p >> shifts) & 3).astype(jnp.int8) - 1).astype(jnp.int8)


def unpack(packed: jax.Array, n_in: int) -> jax.Array:
  """uint8 `[ceil(in/4) (or more: zero-code padding rows), *out]` -> ternary int8 `[in, *out]`."""
  n = -(-n_in // 4)
  return codes(packed[:n]).reshape(4 * n, *packed.shape[1:])[:n_in]


def quantize_once(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Latent `[in, *out]` -> (ternary int8 `[in, *out]`, 1/s_w in the accumulation dtype): one whole matrix."""
  q, inv_sw = quantize_weight(kernel.reshape(kernel.shape[0], -1))
  return q.reshape(kernel.shape).astype(jnp.int8), inv_sw


def _map_stacked(fn, node: dict, stacked: bool):
  return jax.vmap(fn)(node) if stacked else fn(node)


def to_ternary(node: dict, stacked: bool = False) -> dict:
  """One BitLinear (latent, ternary or packed) -> the ternary form's keys (`q` int8), norm scale unchanged."""
  if "q" in node:
    return node
  if "packed" in node:
    n_in = node["norm_scale"].shape[-1]
    q = (jax.vmap(lambda p: unpack(p, n_in)) if stacked else lambda p: unpack(p, n_in))(node["packed"])
    return {"q": q, "inv_sw": node["inv_sw"], "norm_scale": node["norm_scale"]}
  def one(k):
    return quantize_once(k)
  q, inv_sw = jax.vmap(one)(node["kernel"]) if stacked else one(node["kernel"])
  return {"q": q, "inv_sw": inv_sw, "norm_scale": node["norm_scale"]}


def to_packed(node: dict, stacked: bool = False) -> dict:
  """One BitLinear -> the packed form (`packed` uint8, `inv_sw`, `norm_scale`)."""
  if "packed" in node:
    return node
  t = to_ternary(node, stacked)
  packed = jax.vmap(pack)(t["q"]) if stacked else pack(t["q"])
  return {"packed": packed, "inv_sw": t["inv_sw"], "norm_scale": t["norm_scale"]}


def map_bitlinears(fn, tree: Any, stacked: bool = False) -> Any:
  """Applies `fn(node, stacked)` to every BitLinear dict of a parameter tree (`layers/...` is stacked)."""
  if is_bitlinear(tree):
    return fn(tree, stacked)
  if isinstance(tree, dict):
    return {k: map_bitlinears(fn, v, stacked or k == "layers") for k, v in tree.items()}
  return tree


def _accumulate(qx, w, product: str):
  """Exact `q_x @ q_w`: the last `w.ndim - 1` axes of the int8-valued `qx` against the leading axes of `w`."""
  if product not in PRODUCTS:
    raise ValueError(f"product={product!r}: expected one of {PRODUCTS}")
  k = w.ndim - 1
  dims = ((tuple(range(qx.ndim - k, qx.ndim)), tuple(range(k))), ((), ()))
  if product == "int8":
    return lax.dot_general(qx.astype(jnp.int8), w.astype(jnp.int8), dims, preferred_element_type=jnp.int32)
  return lax.dot_general(qx.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dims, preferred_element_type=jnp.float32)


def _quantized_input(x, node: dict, eps: float):
  """(ternary weight `[in, out]` or, packed, `[4, n, out]`; 1/s_w; activation codes `[..., in]` or
  `[..., 4, n]`; 1/s_x) of a BitLinear."""
  acc = dtypes.accum(x.dtype)
  y = rms_normalize(x, eps) * node["norm_scale"].astype(acc)
  qx, inv_sx = quantize_activations(y)
  if "packed" in node:  # rows past ceil(in/4) (if any) hold zero codes
    n, rows = -(-qx.shape[-1] // 4), node["packed"].shape[0]
    lead = [(0, 0)] * (qx.ndim - 1)
    qx = jnp.pad(qx, lead + [(0, 4 * n - qx.shape[-1])]).reshape(*qx.shape[:-1], 4, n)
    qx = jnp.pad(qx, lead + [(0, 0), (0, rows - n)])
    return codes(node["packed"]), node["inv_sw"], qx, inv_sx
  q, inv_sw = quantize_once(node["kernel"]) if "kernel" in node else (node["q"], node["inv_sw"])
  return q.reshape(q.shape[0], -1), inv_sw, qx, inv_sx


def ternary_linear(x, node: dict, *, eps: float = 1e-6, product: str | None = None):
  """BitLinear of `x[..., in]` (compute dtype) with `node` in any form; output `[..., *out]` in x's dtype.

  Latent weights are quantized here (as in training); ternary and packed weights are used as they are.
  `product`: `int8` or `bf16` (same result; see the module docstring), default `default_product()`. A node with a
  `layer` entry holds the whole stack of layers `[L, ...]` and means its layer `layer` (the decode kernel's layout).
  """
  if "layer" in node:
    return ternary_linear_group(x, as_group(node), eps=eps)[0]
  acc = dtypes.accum(x.dtype)
  q2, inv_sw, qx, inv_sx = _quantized_input(x, node, eps)
  accum = _accumulate(qx, q2, product or default_product())
  out = (accum.astype(acc) * (inv_sx * inv_sw.astype(acc))).astype(x.dtype)
  return out.reshape(*out.shape[:-1], *_out_shape(node))


def as_group(node: dict) -> dict:
  """A stacked single BitLinear `[L, rows, *out]` as a group of one `[L, 1, rows, *out]` (reshapes only)."""
  return {"packed": node["packed"][:, None], "norm_scale": node["norm_scale"][:, None],
          "inv_sw": node["inv_sw"][:, None], "layer": node["layer"]}


def ternary_linear_group(x, group: dict, *, eps: float = 1e-6, pre: str | None = None, pre_scale=None, extra=None,
                         x_index: int | None = None, dtype=None, raw: bool = False, stacked: bool = False):
  """BitLinears that read the same `x`, stacked on the axis after the layers': `packed [L, G, rows, *out]`,
  `norm_scale [L, G, in]`, `inv_sw [L, G]`, and `layer`, the index into L. G outputs `[..., *out]`, from one
  kernel launch where it applies (the whole stacks are its operands: slicing a layer out would copy it).

  `pre` (with `pre_scale`, `extra`): the element-wise step before the BitLinears, in the kernel's launch where it
  applies, else here with XLA (`ternary_kernel.ternary_matvec`): "norm", the block's RMSNorm with the stacked
  scale `pre_scale [L, in]`; "glu", `x [..., 2, in]` holds a GLU's gate and up, the input is `silu(gate) * up`;
  "gnorm", `rms_norm(x) * pre_scale[layer] * silu(extra)`. `x_index`: the input is `x[x_index]`.
  `dtype`: the compute dtype the input is rounded to (default x's). `raw`: the kernel's float32 outputs as they are
  (for a consumer that rounds them itself, as the "glu" prologue does). `stacked`: one array `[G, ..., *out]`
  instead of a list.
  """
  p, layer = group["packed"], group["layer"]
  out_shape = p.shape[3:]
  dtype = jnp.dtype(dtype or x.dtype)
  k_in = group["norm_scale"].shape[-1]
  x_in = x if x_index is None else x[x_index]
  lead = x_in.shape[:-2] if pre == "glu" else x_in.shape[:-1]
  rows = math.prod(lead)
  finish = lambda o: (o if raw else o.astype(dtype)).reshape(*lead, *out_shape)
  if not ternary_kernel.applies(rows, k_in, dtype, p.shape[2:]):
    acc = dtypes.accum(dtype)
    if pre == "norm":
      x_in = (rms_normalize(x_in, eps) * pre_scale[layer].astype(acc)).astype(dtype)
    elif pre == "glu":
      x_in = (jax.nn.silu(x_in[..., 0, :].astype(dtype).astype(acc)) * x_in[..., 1, :].astype(dtype)).astype(dtype)
    elif pre == "gnorm":
      g = rms_normalize(x_in.astype(dtype), eps) * pre_scale[layer].astype(acc)
      x_in = (g * jax.nn.silu(extra.astype(acc))).astype(dtype)
    one = {k: v[layer] for k, v in group.items() if k != "layer"}
    outs = [finish(ternary_linear(x_in.astype(dtype), {k: v[g] for k, v in one.items()}, eps=eps))
            for g in range(p.shape[1])]
    return jnp.stack(outs) if stacked else outs
  xk = x.reshape(rows, -1) if x_index is None else x.reshape(x.shape[0], rows, -1)
  out = ternary_kernel.ternary_matvec(xk, p.reshape(*p.shape[:3], -1), group["norm_scale"], group["inv_sw"],
                                      jnp.reshape(layer, (1,)).astype(jnp.int32), eps=eps, pre=pre,
                                      pre_scale=pre_scale, extra=None if extra is None else extra.reshape(rows, -1),
                                      dtype=dtype, x_index=x_index)
  if stacked:
    return (out if raw else out.astype(dtype)).reshape(out.shape[0], *lead, *out_shape)
  return [finish(o) for o in out]


def _out_shape(node: dict) -> tuple:
  w = node.get("kernel", node.get("q", node.get("packed")))
  return w.shape[1:]


def int_accumulators(x, node: dict, *, eps: float = 1e-6, product: str = "int8"):
  """The accumulators `q_x @ q_w` of `ternary_linear` (int32 for `int8`, float32 for `bf16`; for exactness tests)."""
  q2, _, qx, _ = _quantized_input(x, node, eps)
  return _accumulate(qx, q2, product)


def pack_tree(params: dict, float_dtype=jnp.bfloat16) -> dict:
  """A latent MatMul-free parameter tree -> the packed inference tree (jittable; see `pack_params`)."""
  scale_dtype = jnp.promote_types(float_dtype, jnp.float32)

  def bl(node, stacked):
    out = to_packed(node, stacked)
    return {"packed": out["packed"], "inv_sw": out["inv_sw"].astype(scale_dtype),
            "norm_scale": out["norm_scale"].astype(scale_dtype)}

  def rest(tree):
    if is_bitlinear(tree):
      return tree
    if isinstance(tree, dict):
      return {k: rest(v) for k, v in tree.items()}
    return jnp.asarray(tree).astype(float_dtype)

  return rest(map_bitlinears(bl, params))


def pack_params(params: dict, float_dtype=jnp.bfloat16) -> dict:
  """A latent MatMul-free parameter tree -> the packed inference tree (host arrays).

  BitLinears: `packed` uint8, `inv_sw` per matrix and `norm_scale`, both float32 (float64 when `float_dtype`
  is). Every other float leaf (embeddings, block norms, `g_norm`, final norm, lower bounds) is cast to
  `float_dtype`.
  """
  out = jax.jit(pack_tree, static_argnums=1)(params, jnp.dtype(float_dtype))
  return jax.tree.map(np.asarray, out)


def weight_bytes(tree: Any) -> int:
  """Bytes of all arrays in a parameter tree."""
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
