"""The decode kernel (Pallas; interpret mode on the CPU) against the XLA BitLinear of `inference.packed`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.inference import generation as gen
from mmfree_jax.inference import packed, ternary_kernel
from mmfree_jax.layers.bitlinear import quantize_activations
from mmfree_jax.layers.norm import rms_normalize
from mmfree_jax.models import model_config
from tests.inference.helpers import tiny_cfg, tiny_params


@pytest.fixture
def kernel_on(monkeypatch):
  monkeypatch.setattr(ternary_kernel, "MODE", "on")
  jax.clear_caches()  # the mode is read when a function is traced
  yield
  jax.clear_caches()


def _nodes(key, k_in, n_out, groups):
  def one(k):
    kw, kg = jax.random.split(k)
    return packed.to_packed({"kernel": jax.random.normal(kw, (k_in, n_out)),
                             "norm_scale": 1 + 0.3 * jax.random.normal(kg, (k_in,))})
  return [one(k) for k in jax.random.split(key, groups)]


@pytest.mark.parametrize("k_in,n_out,groups,rows", [(64, 32, 1, 1), (90, 48, 3, 2), (256, 64, 2, 5)])
def test_kernel_matches_xla_bitlinear(monkeypatch, k_in, n_out, groups, rows):
  monkeypatch.setattr(ternary_kernel, "MODE", "off")  # the reference: XLA's BitLinear (also on a GPU)
  kx, kw = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))))
  x = jax.random.normal(kx, (rows, k_in), jnp.bfloat16)
  nodes = _nodes(kw, k_in, n_out, groups)
  stack = lambda key: jnp.stack([n[key] for n in nodes])
  p = ternary_kernel.pad_rows(stack("packed"), axis=1, k_in=k_in)
  assert p.shape[1] == ternary_kernel.padded_rows(k_in) >= -(-k_in // 4)
  # The operands are stacks over layers; the kernel reads layer 1 of 2 (layer 0: other weights, scales 0).
  two = lambda a: jnp.stack([jnp.zeros_like(a) if a.dtype != jnp.uint8 else a[::-1], a])
  got = np.asarray(ternary_kernel.ternary_matvec(x, two(p), two(stack("norm_scale")), two(stack("inv_sw")),
                                                 jnp.ones((1,), jnp.int32), eps=1e-6))
  for g, node in enumerate(nodes):
    ref = np.asarray(packed.ternary_linear(x.astype(jnp.float32), node))
    # Both sum the same integer products exactly; the row statistics are float32 sums in another order, so an
    # activation code may round the other way at a .5 tie: one code changes the output by at most
    # 1/s_x * 1/s_w (weights are ternary). Everything else agrees to float32 rounding.
    _, inv_sx = quantize_activations(rms_normalize(x, 1e-6) * node["norm_scale"])
    one_code = np.asarray(inv_sx * node["inv_sw"])
    err = np.abs(got[g] - ref)
    assert np.all(err <= 1e-6 * np.abs(ref).max() + 1.01 * one_code)
    assert np.mean(err <= 1e-5 * np.abs(ref).max()) > 0.95


@pytest.mark.parametrize("pre", ["norm", "glu", "gnorm"])
def test_prologues_match_xla(monkeypatch, pre):
  # The block's RMSNorm ("norm"), the GLU product ("glu") or the MLGRU's output gate ("gnorm", reading its input
  # as row 2 of a stack) in the kernel's launch vs the same step in XLA.
  k_in, n_out, layers = 64, 32, 2
  kx, kw, ks = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 3)
  nodes = _nodes(kw, k_in, n_out, layers)
  stack = lambda key: jnp.stack([n[key] for n in nodes])
  group = {"packed": ternary_kernel.pad_rows(stack("packed"), axis=1, k_in=k_in)[:, None],
           "norm_scale": stack("norm_scale")[:, None], "inv_sw": stack("inv_sw")[:, None],
           "layer": jnp.ones((), jnp.int32)}
  shape = {"glu": (2, 1, 2, k_in), "norm": (2, 1, k_in), "gnorm": (3, 2, 1, k_in)}[pre]
  x = 3 * jax.random.normal(kx, shape, jnp.bfloat16 if pre == "norm" else jnp.float32)
  pre_scale = 1 + 0.3 * jax.random.normal(ks, (layers, k_in)) if pre != "glu" else None
  extra = jax.random.normal(ks, (2, 1, k_in), jnp.bfloat16) if pre == "gnorm" else None
  run = lambda: np.asarray(packed.ternary_linear_group(x, group, eps=1e-6, pre=pre, pre_scale=pre_scale, extra=extra,
                                                       x_index=2 if pre == "gnorm" else None, dtype=jnp.bfloat16,
                                                       raw=True)[0], np.float32)
  monkeypatch.setattr(ternary_kernel, "MODE", "off")
  ref = run()
  monkeypatch.setattr(ternary_kernel, "MODE", "on")
  got = run()
  assert got.shape == ref.shape == (2, 1, n_out)
  # As in the unit test above: float32 rounding, or one activation code at a tie (the reference is rounded
  # to bfloat16 here, so allow its rounding too).
  unit = np.abs(ref).max() / 127 * 1.01
  err = np.abs(got - ref)
  assert np.all(err <= 2 ** -8 * np.abs(ref) + unit)
  assert np.mean(err <= 2 ** -8 * np.abs(ref) + 1e-6 * np.abs(ref).max()) > 0.9


def test_kernel_rejects_unpadded_rows():
  node = _nodes(jax.random.key(0), 90, 32, 1)[0]  # 23 packed rows; the kernel reads 32
  with pytest.raises(ValueError, match="pad_rows"):
    ternary_kernel.ternary_matvec(jnp.ones((1, 90)), node["packed"][None, None], node["norm_scale"][None, None],
                                  node["inv_sw"][None, None], jnp.zeros((1,), jnp.int32), eps=1e-6)


@pytest.mark.parametrize("prologues", [(), ("norm", "glu", "gnorm")])
def test_decoding_with_the_kernel_matches_xla(kernel_on, monkeypatch, prologues):
  monkeypatch.setattr(ternary_kernel, "PROLOGUES", prologues)
  cfg_d = tiny_cfg("hgrn_bit", "float32")
  cfg = model_config(cfg_d)
  params = packed.pack_params(tiny_params(cfg_d, head_gain=5.0), jnp.float32)
  fam = gen.family(cfg)
  w = fam.prepare(cfg, params)
  assert "fig" in w["layers"]["attn"] and w["layers"]["attn"]["fig"]["packed"].shape[1] == 3
  step = jax.make_jaxpr(lambda w, c: fam.hidden(cfg, w, jnp.ones((1, 1), jnp.int32), None, c))
  assert str(step(w, fam.init_cache(cfg, 1, 8))).count("pallas_call") == 4  # fig, o, gate/up, down
  seed = int(np.random.default_rng().integers(1 << 30))
  draws = [jax.random.randint(jax.random.key(seed + i), (2, 12), 3, 97) for i in range(2)]

  @jax.jit
  def teacher_forced(params, tokens):
    """Logits of 4-token prompts (prefill) and of 8 more tokens fed one at a time (decode)."""
    w = fam.prepare(cfg, params)
    first, cache = gen.prefill(cfg, w, tokens[:, :4], jnp.ones((2, 4), bool), 16)

    def one(cache, tok):
      x, cache = fam.hidden(cfg, w, tok[:, None], None, cache)
      return cache, fam.logits(cfg, w, x)[:, 0]

    _, later = jax.lax.scan(one, cache, tokens[:, 4:].T)
    return jnp.concatenate([first[:, None], jnp.swapaxes(later, 0, 1)], axis=1)

  with_kernel = [np.asarray(teacher_forced(params, t)) for t in draws]
  ternary_kernel.MODE = "off"
  jax.clear_caches()
  without = [np.asarray(teacher_forced(params, t)) for t in draws]
  # Equal to float32 rounding, except where an activation code rounds the other way at a tie (see the unit test):
  # such a flip moves a logit by a small fraction of its range, and through the recurrent state every later
  # logit of its row a little. Every logit stays within 2% of the range; in at least one of two independent
  # draws (a flip early in a row happens in a few percent of draws; a systematic error would show in both),
  # 90% of the logits agree to 1e-4 of the range.
  close = []
  for a, b in zip(with_kernel, without):
    scale = np.abs(b).max()
    np.testing.assert_allclose(a, b, atol=2e-2 * scale)
    close.append(np.mean(np.abs(a - b) <= 1e-4 * scale))
  assert max(close) > 0.9, close
