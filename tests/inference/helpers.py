"""Tiny models with perturbed (non-init) parameters for the inference tests."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax.models import build_model

TINY = dict(vocab_size=97, d_model=32, n_layers=3, d_ff=64, n_heads=4, remat="none")


def tiny_cfg(arch: str, dtype: str = "float32", **kw) -> dict:
  param_dtype = "float64" if dtype == "float64" else "float32"
  return dict(TINY, arch=arch, dtype=dtype, param_dtype=param_dtype, **kw)


def tiny_params(cfg: dict, seed: int = 0, head_gain: float = 1.0) -> dict:
  """Random parameters of the model's shapes, drawn on the host (no compilation): norm scales and lower bounds
  perturbed around their init, kernels normal(0, 0.1), embeddings normal(0, 1); the head scaled by `head_gain`.

  BitLinear outputs do not depend on the latent weight's scale, so the MatMul-free head gain scales the head's
  norm scale instead.
  """
  return _tiny_params(tuple(sorted(cfg.items())), seed, head_gain)


@functools.lru_cache(maxsize=None)
def _tiny_params(cfg_items: tuple, seed: int, head_gain: float) -> dict:
  cfg = dict(cfg_items)
  model = build_model(cfg)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "scale" in name or "lower_bounds" in name:
      v = 1.0 + 0.3 * rng.normal(size=a.shape)
    elif "embedding" in name:
      v = rng.normal(size=a.shape)
    else:
      v = 0.1 * rng.normal(size=a.shape)
    if "lm_head" in name and ("norm_scale" in name or cfg["arch"] == "transformer"):
      v = v * head_gain
    return jnp.asarray(v, a.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)["params"]


def write_hf_checkpoint(directory, *, hidden: int = 32, layers: int = 2, vocab: int = 300, inter: int | None = 64,
                        shards: int = 1, dtype=None, seed: int = 0) -> dict:
  """A synthetic released-style checkpoint (official names, [out, in] layout); returns the tensors written."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  dtype = dtype or ml_dtypes.bfloat16
  rng = np.random.default_rng(seed)
  i_size = inter or 256 * -(-int(hidden * 4 * 2 / 3) // 256)
  mat = lambda o, i: rng.normal(0, 0.02, (o, i))
  vec = lambda n: 1 + 0.3 * rng.normal(size=n)
  t = {"model.embeddings.weight": rng.normal(0, 1.0, (vocab, hidden)),
       "model.lower_bounds": rng.normal(0, 1.0, (layers, hidden)),
       "model.norm.weight": vec(hidden), "lm_head.weight": mat(vocab, hidden), "lm_head.norm.weight": 5 * vec(hidden)}
  for l in range(layers):
    k = f"model.layers.{l}."
    t[k + "attn_norm.weight"], t[k + "mlp_norm.weight"] = vec(hidden), vec(hidden)
    for n in "ifgo":
      t[k + f"attn.{n}_proj.weight"], t[k + f"attn.{n}_proj.norm.weight"] = mat(hidden, hidden), vec(hidden)
    t[k + "attn.g_norm.weight"] = vec(hidden)
    t[k + "mlp.gate_proj.weight"], t[k + "mlp.gate_proj.norm.weight"] = mat(2 * i_size, hidden), vec(hidden)
    t[k + "mlp.down_proj.weight"], t[k + "mlp.down_proj.norm.weight"] = mat(hidden, i_size), vec(i_size)
  t = {k: v.astype(dtype) for k, v in t.items()}
  os.makedirs(directory, exist_ok=True)
  names = sorted(t)
  if shards == 1:
    save_file(t, os.path.join(directory, "model.safetensors"))
  else:
    weight_map = {}
    for s in range(shards):
      fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: t[n] for n in names[s::shards]}
      save_file(part, os.path.join(directory, fname))
      weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
  cfg = {"model_type": "hgrn_bit", "hidden_size": hidden, "num_hidden_layers": layers, "vocab_size": vocab,
         "rms_norm_eps": 1e-6, "hidden_ratio": 4, "intermediate_size": inter, "use_lower_bound": True,
         "tie_word_embeddings": False, "num_heads": 1, "expand_ratio": 1, "use_short_conv": False,
         "bos_token_id": 1, "eos_token_id": 2}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f)
  return t


def full_forward(cfg: dict, params: dict, tokens) -> np.ndarray:
  """Logits of one full forward pass of the Flax model (one compiled function per config and shape)."""
  return np.asarray(_jitted_apply(tuple(sorted(cfg.items())))({"params": params}, tokens))


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg_items: tuple):
  return jax.jit(build_model(dict(cfg_items)).apply)
