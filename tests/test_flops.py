"""Parameter and FLOP counts of `mmfree_jax.flops` against hand formulas, the models and XLA's own count."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import base
from mmfree_jax import flops


def _model(arch: str, d: int, layers: int, vocab: int = 32000, heads: int = 4, d_ff: int = 0,
           tie: bool = False):
  m = base.get_base_config().model
  m.arch, m.d_model, m.n_layers, m.vocab_size, m.n_heads, m.d_ff, m.tie_embeddings = (
      arch, d, layers, vocab, heads, d_ff, tie)
  return m


@pytest.mark.parametrize("name,expected", [("370m", 374_108_160), ("1p3b", 1_364_779_008),
                                           ("2p7b", 2_702_357_504)])
def test_mmfree_paper_sizes_exact(name, expected):
  cfg = base.sized(name, "hgrn_bit").model
  counts = flops.param_counts(cfg)
  assert counts["params"] == expected
  assert counts["embedding_params"] == 32000 * cfg.d_model
  assert counts["non_embedding_params"] == expected - 32000 * cfg.d_model


def _tpp_hand(layers, d, ff, vocab, tie):
  # q, k, v, o; fused gate/up [d, 2I]; down [I, d]; two norms per layer; final norm; embeddings; head.
  return layers * (4 * d * d + d * 2 * ff + ff * d + 2 * d) + d + vocab * d + (0 if tie else d * vocab)


@pytest.mark.parametrize("name", ["370m", "1p3b", "2p7b"])
def test_transformer_paper_sizes_hand_formula(name):
  cfg = base.sized(name, "transformer").model
  layers, d = base.SIZES[name][:2]
  ff = 256 * math.ceil(int(d * 8 / 3) / 256)
  counts = flops.param_counts(cfg)
  assert counts["params"] == _tpp_hand(layers, d, ff, 32000, cfg.tie_embeddings)
  assert counts["non_embedding_params"] == counts["params"] - 32000 * d


def test_intermediate_rule_and_override():
  assert [flops.intermediate_size(_model("hgrn_bit", d, 1)) for d in (1024, 2048, 2560)] == [2816, 5632, 6912]
  assert flops.intermediate_size(_model("hgrn_bit", 64, 1, d_ff=96)) == 96


def test_flops_per_token_conventions():
  m = _model("transformer", 256, 2, vocab=384, heads=4)
  f = flops.flops_per_token(m, 128)
  ff = flops.intermediate_size(m)
  dense = 2 * 2 * (4 * 256 ** 2 + 3 * 256 * ff) + 2 * 256 * 384
  assert f["dense_forward"] == dense
  assert f["attention_forward"] == 2 * 2 * 256 * 129
  assert f["attention_forward_full"] == 2 * 4 * 256 * 128
  assert f["train"] == 3 * f["forward"] and f["matmul_train"] == 3 * f["matmul_forward"]
  assert f["six_n"] == 6 * flops.param_counts(m)["non_embedding_params"]
  g = flops.flops_per_token(_model("hgrn_bit", 256, 2, vocab=384), 128)
  assert g["attention_forward"] == 0 and g["dense_forward"] == dense
  assert flops.train_flops(m, 128, 1000) == 1000 * f["train"]


# XLA's count. The models stack their layers with `nn.scan`, and XLA's cost analysis counts a loop body once,
# so the comparison uses one layer (the per-layer formula and the LM head); depth enters the formula linearly.
# No remat, float32, associative scan; widths where the matmuls dominate.
XLA_CASES = [
    ("hgrn_bit", 256, 384, 4, 128),
    ("hgrn_bit", 128, 512, 2, 64),
    ("transformer", 256, 384, 4, 128),
    ("transformer", 192, 300, 3, 256),
]


def _build(arch, d, layers, vocab, heads):
  from mmfree_jax import models  # pylint: disable=import-outside-toplevel
  m = _model(arch, d, layers, vocab=vocab, heads=heads)
  m.remat, m.dtype, m.scan_impl, m.bitlinear = "none", "float32", "associative", "vanilla"
  return m, models.build_model(m)


@pytest.mark.parametrize("arch,d,layers,vocab,heads", [("hgrn_bit", 256, 3, 384, 4), ("hgrn_bit", 128, 2, 512, 2),
                                                       ("transformer", 256, 3, 384, 4),
                                                       ("transformer", 192, 2, 300, 3)])
def test_param_counts_match_model(arch, d, layers, vocab, heads):
  m, module = _build(arch, d, layers, vocab, heads)
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  assert n == flops.param_counts(m)["params"]


@pytest.mark.parametrize("arch,d,vocab,heads,seq", XLA_CASES)
def test_matmul_flops_match_xla(arch, d, vocab, heads, seq):
  m, module = _build(arch, d, 1, vocab, heads)
  batch = 4
  tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((batch, seq), jnp.int32))
  cost = jax.jit(module.apply).lower(params, tokens).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = float(cost["flops"]) / (batch * seq)
  f = flops.flops_per_token(m, seq)
  # XLA computes the full attention square; its count also holds the element-wise work (no loss here).
  assert abs(xla - f["xla_matmul_forward"]) <= 0.10 * xla, (xla, f)
  ours = f["xla_matmul_forward"] + f["elementwise_forward"] - flops.CROSS_ENTROPY * vocab
  assert abs(xla - ours) <= 0.10 * xla, (xla, ours)
