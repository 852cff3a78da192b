"""The MatMul-free LM for inference: the same arithmetic as `models.hgrn_bit`, over a constant-size state.

A functional forward over the parameter tree (any BitLinear form of `inference.packed`), so that one code path
serves latent training checkpoints and packed export checkpoints. Tokens where `valid` is False are identity
elements of the recurrence (`a = 1, b = 0`): they leave the state untouched, so rows padded on either side
carry exactly the state of their real tokens. The prompt is processed by the parallel scan (`cfg.scan_impl`),
decoding by the same code on one token.

Cache: `{'h': [L, B, d] float32}`, the state before the next token.
"""

import jax
import jax.numpy as jnp
from jax import lax

from mmfree_jax.inference import ternary_kernel
from mmfree_jax.inference.packed import (as_group, is_bitlinear, map_bitlinears, ternary_linear, ternary_linear_group,
                                         to_packed, to_ternary)
from mmfree_jax.layers import dtypes
from mmfree_jax.layers.norm import rms_normalize
from mmfree_jax.layers.recurrence import linear_scan
from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models.hgrn_bit import layer_lower_bounds


FIG = ("f_proj", "i_proj", "g_proj")  # the token mixer's projections of the same input


def prepare(cfg: ModelConfig, params: dict) -> dict:
  """Quantizes latent BitLinear weights once (int8 ternary + 1/s_w); packed weights stay packed.

  Where the decode kernel is enabled (`ternary_kernel.MODE`: on GPUs by default), every BitLinear is packed
  instead, rows padded for the kernel, and each layer's f, i and g projections are stacked into one `fig` node
  (one launch per token).
  """
  del cfg
  if not ternary_kernel.enabled():
    return map_bitlinears(lambda n, s: n if "packed" in n else to_ternary(n, s), params)

  def kernel_layout(node, stacked):
    node = to_packed(node, stacked)
    k_in = node["norm_scale"].shape[-1]
    return dict(node, packed=ternary_kernel.pad_rows(node["packed"], axis=int(stacked), k_in=k_in))

  w = map_bitlinears(kernel_layout, params)
  attn = dict(w["layers"]["attn"])
  projs = [attn.pop(name) for name in FIG]
  attn["fig"] = {k: jnp.stack([p[k] for p in projs], axis=1) for k in ("packed", "norm_scale", "inv_sw")}
  return dict(w, layers=dict(w["layers"], attn=attn))


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
  del max_len
  return {"h": jnp.zeros((cfg.n_layers, batch, cfg.d_model), dtypes.accum(cfg.compute_dtype))}


def _norm(x, scale, eps, dtype):
  return (rms_normalize(x, eps) * scale.astype(dtypes.accum(x.dtype))).astype(dtype)


def _block(cfg: ModelConfig, x, p, lb, h0, valid_BT):
  cdt, acc, eps = cfg.compute_dtype, dtypes.accum(cfg.compute_dtype), cfg.norm_eps
  lin = lambda v, node: ternary_linear(v.astype(cdt), node, eps=eps)
  a, m = p["attn"], p["mlp"]
  whole = "fig" in a  # kernel layout: the kernels read whole stacks; `PROLOGUES` run in their launches
  pro = ternary_kernel.PROLOGUES if whole else ()
  if "norm" in pro:
    fig = ternary_linear_group(x, a["fig"], eps=eps, pre="norm", pre_scale=p["attn_norm_stack"], dtype=cdt, raw=True,
                               stacked=True)
  else:
    u = _norm(x, p["attn_norm"]["scale"], eps, cdt)
    fig = (ternary_linear_group(u, a["fig"], eps=eps, raw=True, stacked=True) if whole else
           [lin(u, a[name]) for name in FIG])
  f_lin, i_lin, g_lin = (v.astype(cdt) for v in fig)
  f = jax.nn.sigmoid(f_lin.astype(acc))
  lb = lb.astype(acc)
  f = lb + (1.0 - lb) * f
  i = jax.nn.silu(i_lin.astype(acc)) * (1.0 - f)
  f, i = f.astype(cdt), i.astype(cdt)
  if valid_BT is not None:
    f = jnp.where(valid_BT[..., None], f, jnp.ones_like(f))
    i = jnp.where(valid_BT[..., None], i, jnp.zeros_like(i))
  h, h_last = linear_scan(f, i, h0, None, impl=cfg.scan_impl, chunk=cfg.scan_chunk)
  if "gnorm" in pro:  # the output gate in o's launch, from the group's raw outputs (no slice copied)
    o_out = ternary_linear_group(fig, as_group(a["o_proj"]), eps=eps, pre="gnorm", x_index=2,
                                 pre_scale=p["g_norm_stack"], extra=h, dtype=cdt)[0]
  else:
    g = _norm(g_lin, a["g_norm"]["scale"], eps, acc)
    o_out = lin((g * jax.nn.silu(h.astype(acc))).astype(cdt), a["o_proj"])
  r = x + o_out
  if "norm" in pro:
    gu = ternary_linear_group(r, as_group(m["gate_proj"]), eps=eps, pre="norm", pre_scale=p["mlp_norm_stack"],
                              dtype=cdt, raw=True)[0]
  else:
    gu = lin(_norm(r, p["mlp_norm"]["scale"], eps, cdt), m["gate_proj"])
  if "glu" in pro:
    return r + ternary_linear_group(gu, as_group(m["down_proj"]), eps=eps, pre="glu", dtype=cdt)[0], h_last
  hid = (jax.nn.silu(gu[..., 0, :].astype(cdt).astype(acc)) * gu[..., 1, :].astype(cdt)).astype(cdt)
  return r + lin(hid, m["down_proj"]), h_last


def _with_bitlinears(full: dict, rest: dict, index):
  """`rest` (one layer's slice, BitLinears removed) with each BitLinear of `full` as its whole stacked node plus
  `layer=index` (see `packed.ternary_linear`)."""
  if is_bitlinear(full):
    return dict(full, layer=index)
  if isinstance(full, dict):
    return {k: _with_bitlinears(v, rest[k], index) for k, v in full.items()}
  return rest


def hidden(cfg: ModelConfig, w: dict, tokens_BT, valid_BT, cache: dict, unroll: int = 1):
  """(final-normed hidden states [B, T, d] in the compute dtype, new cache). `unroll`: layers per iteration
  of the layer loop (`lax.scan`'s unroll; n_layers writes the layers out in one straight program)."""
  cdt = cfg.compute_dtype
  x = jnp.take(w["embeddings"]["embedding"].astype(cdt), tokens_BT, axis=0)
  lbs = layer_lower_bounds(w["lower_bounds"])

  layers = w["layers"]
  # Kernel layout: BitLinears are not sliced per layer (a kernel's operand slice would be a copy per token);
  # each gets the whole stacked weights and the layer's index, and the kernel reads its layer in place.
  whole = "fig" in layers["attn"]
  rest = map_bitlinears(lambda n, s: None, layers) if whole else layers

  def layer(x, xs):
    p, lb, h0, index = xs
    if whole:  # whole stacks (and the layer index) for the kernels, which read their layer in place
      p = dict(_with_bitlinears(layers, p, index), attn_norm_stack=layers["attn_norm"]["scale"],
               mlp_norm_stack=layers["mlp_norm"]["scale"], g_norm_stack=layers["attn"]["g_norm"]["scale"])
    return _block(cfg, x, p, lb, h0, valid_BT)

  xs = (rest, lbs, cache["h"], jnp.arange(cfg.n_layers, dtype=jnp.int32))
  x, h = lax.scan(layer, x, xs, unroll=unroll)
  return _norm(x, w["norm"]["scale"], cfg.norm_eps, cdt), {"h": h}


def logits(cfg: ModelConfig, w: dict, x_BTD):
  head = w["lm_head"]
  if "fig" in w["layers"]["attn"]:  # kernel layout: the head as a stack of one layer
    head = {k: v[None] for k, v in head.items()} | {"layer": jnp.zeros((), jnp.int32)}
  return ternary_linear(x_BTD.astype(cfg.compute_dtype), head, eps=cfg.norm_eps)


def state_bytes(cfg: ModelConfig, batch: int, max_len: int) -> int:
  """Bytes of the decoding state: independent of the context length."""
  del max_len
  return cfg.n_layers * batch * cfg.d_model * jnp.dtype(dtypes.accum(cfg.compute_dtype)).itemsize
