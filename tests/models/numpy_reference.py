"""An independent, plainly written NumPy float64 MatMul-free LM, straight from the spec (shared/spec/model.md).

Weights use the official PyTorch layout [out, in]; `from_flax` converts our parameters into that layout.
"""

import numpy as np

EPS = 1e-6


def rms(x, w):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def round_half_away(v):
  out = np.empty_like(v)
  for idx, val in np.ndenumerate(v):
    out[idx] = np.sign(val) * np.floor(abs(val) + 0.5)
  return out


def bitlinear(x, weight, norm_w):
  """x [T, in], weight [out, in]."""
  y = rms(x, norm_w)
  y_q = np.empty_like(y)
  for t in range(y.shape[0]):
    s = 127.0 / max(np.max(np.abs(y[t])), 1e-5)
    y_q[t] = np.clip(round_half_away(y[t] * s), -128, 127) / s
  s_w = 1.0 / max(np.mean(np.abs(weight)), 1e-5)
  w_q = np.clip(np.round(weight * s_w), -1, 1) / s_w
  return y_q @ w_q.T


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


def silu(x):
  return x * sigmoid(x)


def forward(p, tokens, n_layers):
  """Logits [T, V] for one sequence of token ids, h_0 = 0."""
  x = p["model.embeddings.weight"][tokens]
  lb = p["model.lower_bounds"]
  soft = np.exp(lb - lb.max(0)) / np.exp(lb - lb.max(0)).sum(0)
  lbs = np.cumsum(soft, axis=0) - soft[0]
  for l in range(n_layers):
    q = lambda name: p[f"model.layers.{l}.{name}"]
    h_in = rms(x, q("attn_norm.weight"))
    proj = lambda n: bitlinear(h_in, q(f"attn.{n}_proj.weight"), q(f"attn.{n}_proj.norm.weight"))
    f = sigmoid(proj("f"))
    if l > 0:
      f = lbs[l] + (1 - lbs[l]) * f
    i = silu(proj("i")) * (1 - f)
    h = np.zeros(x.shape[1])
    hs = []
    for t in range(x.shape[0]):
      h = f[t] * h + i[t]
      hs.append(h)
    o = rms(proj("g"), q("attn.g_norm.weight")) * silu(np.stack(hs))
    r = x + bitlinear(o, q("attn.o_proj.weight"), q("attn.o_proj.norm.weight"))
    m_in = rms(r, q("mlp_norm.weight"))
    gu = bitlinear(m_in, q("mlp.gate_proj.weight"), q("mlp.gate_proj.norm.weight"))
    inter = gu.shape[1] // 2
    gate, up = gu[:, :inter], gu[:, inter:]
    x = r + bitlinear(silu(gate) * up, q("mlp.down_proj.weight"), q("mlp.down_proj.norm.weight"))
  x = rms(x, p["model.norm.weight"])
  return bitlinear(x, p["lm_head.weight"], p["lm_head.norm.weight"])


def from_flax(params, n_layers):
  """Our parameter tree (unboxed) -> the official key names and [out, in] layout, as float64 NumPy."""
  a = lambda v: np.asarray(v, np.float64)
  p = params["params"]
  out = {
      "model.embeddings.weight": a(p["embeddings"]["embedding"]),
      "model.lower_bounds": a(p["lower_bounds"]),
      "model.norm.weight": a(p["norm"]["scale"]),
      "lm_head.weight": a(p["lm_head"]["kernel"]).T,
      "lm_head.norm.weight": a(p["lm_head"]["norm_scale"]),
  }
  lay = p["layers"]
  for l in range(n_layers):
    k = f"model.layers.{l}."
    out[k + "attn_norm.weight"] = a(lay["attn_norm"]["scale"][l])
    out[k + "mlp_norm.weight"] = a(lay["mlp_norm"]["scale"][l])
    for n in "ifgo":
      out[k + f"attn.{n}_proj.weight"] = a(lay["attn"][f"{n}_proj"]["kernel"][l]).T
      out[k + f"attn.{n}_proj.norm.weight"] = a(lay["attn"][f"{n}_proj"]["norm_scale"][l])
    out[k + "attn.g_norm.weight"] = a(lay["attn"]["g_norm"]["scale"][l])
    gu = a(lay["mlp"]["gate_proj"]["kernel"][l])  # [d, 2, I]
    out[k + "mlp.gate_proj.weight"] = np.concatenate([gu[:, 0].T, gu[:, 1].T], axis=0)
    out[k + "mlp.gate_proj.norm.weight"] = a(lay["mlp"]["gate_proj"]["norm_scale"][l])
    out[k + "mlp.down_proj.weight"] = a(lay["mlp"]["down_proj"]["kernel"][l]).T
    out[k + "mlp.down_proj.norm.weight"] = a(lay["mlp"]["down_proj"]["norm_scale"][l])
  return out
