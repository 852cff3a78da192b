"""Parameter and FLOP counts of both model families, from a model ConfigDict (`config.model`).

This module is the one place where parameters and FLOPs are counted; the trainer, the sweep definitions and
the scaling-law fits all use it.

Parameters (exact, matching the models' parameter trees):
  MatMul-free LM (`hgrn_bit`), per layer `4d^2 + 3dI + 8d + I`; total `L*per_layer + 2Vd + 2d + Ld`
  (embeddings [V,d], untied BitLinear LM head [V,d] with its own RMSNorm, final RMSNorm, lower bounds [L,d]).
  Transformer++ (`transformer`), per layer `4d^2 + 3dI + 2d`; total `L*per_layer + Vd + d (+ Vd untied head)`.
  `non_embedding_params` = `params - V*d`: only the input embedding table is excluded. The LM head is a
  matmul and counts as non-embedding when it is untied; a tied head shares the table and is counted once,
  as embedding.

FLOPs per token (conventions):
  * A multiply-add is 2 FLOPs; a ternary accumulate of the MatMul-free LM counts as a multiply-add (the
    paper's convention: every operation of both families counts the same).
  * `dense_forward`: every weight matmul, LM head included: `2 * (matrix parameters)`.
  * `attention_forward`: Transformer++ QK^T and AV with the causal half only (query t sees t keys, so on
    average (T+1)/2): `2 * d * (T+1)` per layer. `attention_forward_full` counts the full square
    (`4 * d * T` per layer), which is what XLA computes and what `cost_analysis()` reports.
  * `matmul_forward` = dense + causal attention. `xla_matmul_forward` = dense + full attention.
  * `elementwise_forward`: RMSNorms, quantizers, gates, activations, the scan, RoPE, the softmax, residual
    adds, a few FLOPs per element each (estimates, see the constants below); per-matrix weight quantization
    is amortized over the batch and left out.
  * Training = forward + backward = 3 x forward (`train`, `matmul_train`, `elementwise_train`). These are
    model FLOPs: recomputation under rematerialization is not counted (as in MFU).
  * `six_n` = 6 x non-embedding parameters, the 6·N·D convention; `train` differs from it by attention and
    the element-wise terms.
"""

import math
from typing import Any

# Element-wise FLOPs per element (forward). Estimates; they only matter for small widths.
RMSNORM = 4  # square, sum, scale by rsqrt, scale by weight
ACT_QUANT = 5  # abs, max, scale, round, clip, unscale (per element, amortized max)
SIGMOID = 4
SILU = 5
SCAN = 4  # h = f*h + i (2), doubled by the associative (parallel) scan
ROPE = 3  # x*cos + rotate(x)*sin
SOFTMAX = 5  # max, subtract, exp, sum, divide (per score)
CROSS_ENTROPY = 4  # per logit: max, subtract, exp, sum (log and pick are per token)


def intermediate_size(model_cfg: Any) -> int:
  """GLU width: `d_ff` if nonzero, else `256 * ceil(int(d * 4 * 2/3) / 256)`."""
  if int(model_cfg.d_ff):
    return int(model_cfg.d_ff)
  d = int(model_cfg.d_model)
  return 256 * math.ceil(int(d * 4 * 2 / 3) / 256)


def _dims(model_cfg: Any) -> tuple[int, int, int, int]:
  return int(model_cfg.n_layers), int(model_cfg.d_model), intermediate_size(model_cfg), int(model_cfg.vocab_size)


def _is_tied(model_cfg: Any) -> bool:
  return model_cfg.arch == "transformer" and bool(model_cfg.get("tie_embeddings", False))


def _check_arch(model_cfg: Any) -> None:
  if model_cfg.arch not in ("hgrn_bit", "transformer"):
    raise ValueError(f"unknown arch {model_cfg.arch!r}")


def param_counts(model_cfg: Any) -> dict[str, int]:
  """Exact parameter counts: `params`, `non_embedding_params`, `embedding_params`, `lm_head_params`."""
  _check_arch(model_cfg)
  n_layers, d, ff, vocab = _dims(model_cfg)
  embedding = vocab * d
  if model_cfg.arch == "hgrn_bit":
    per_layer = 4 * d * d + 3 * d * ff + 8 * d + ff
    lm_head = vocab * d + d  # BitLinear weight + its RMSNorm scale
    total = n_layers * per_layer + embedding + lm_head + d + n_layers * d  # + final norm + lower bounds
  else:
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    lm_head = 0 if _is_tied(model_cfg) else vocab * d
    total = n_layers * per_layer + embedding + lm_head + d
  return dict(params=total, non_embedding_params=total - embedding, embedding_params=embedding,
              lm_head_params=lm_head)


def _elementwise_per_token(model_cfg: Any, seq_len: int) -> float:
  n_layers, d, ff, vocab = _dims(model_cfg)
  block = 2 * RMSNORM * d + 2 * d + (SILU + 1) * ff  # block norms, residual adds, silu(gate) * up
  if model_cfg.arch == "hgrn_bit":
    bitlinear = lambda n: (RMSNORM + ACT_QUANT) * n
    block += 4 * bitlinear(d) + bitlinear(d) + bitlinear(ff)  # i, f, g, o; gate_proj; down_proj
    # sigmoid(f), lower bound (2), silu(i) * (1 - f) (2), scan, g_norm, silu(h), product.
    block += (SIGMOID + 2 + SILU + 2 + SCAN + RMSNORM + SILU + 1) * d
    head = RMSNORM * d + bitlinear(d)
  else:
    keys = (seq_len + 1) / 2  # causal half, as for the attention matmuls
    heads = int(model_cfg.n_heads)
    block += 2 * ROPE * d + d + (SOFTMAX + 1) * heads * keys  # RoPE on q, k; 1/sqrt(hd); softmax + mask
    head = RMSNORM * d
  return n_layers * block + head + CROSS_ENTROPY * vocab


def flops_per_token(model_cfg: Any, seq_len: int) -> dict[str, float]:
  """Forward and training FLOPs per token at sequence length `seq_len` (conventions in the module doc)."""
  _check_arch(model_cfg)
  n_layers, d, ff, vocab = _dims(model_cfg)
  lm_head = 2 * d * vocab
  dense = n_layers * 2 * (4 * d * d + 3 * d * ff) + lm_head
  if model_cfg.arch == "transformer":
    attention = n_layers * 2 * d * (seq_len + 1)
    attention_full = n_layers * 4 * d * seq_len
  else:
    attention = attention_full = 0
  matmul = dense + attention
  elementwise = _elementwise_per_token(model_cfg, seq_len)
  forward = matmul + elementwise
  return dict(
      forward=float(forward),
      train=float(3 * forward),
      matmul_forward=float(matmul),
      matmul_train=float(3 * matmul),
      elementwise_forward=float(elementwise),
      elementwise_train=float(3 * elementwise),
      dense_forward=float(dense),
      lm_head_forward=float(lm_head),
      attention_forward=float(attention),
      attention_forward_full=float(attention_full),
      xla_matmul_forward=float(dense + attention_full),
      six_n=float(six_n(model_cfg)),
  )


def six_n(model_cfg: Any) -> int:
  """6 x non-embedding parameters: training FLOPs per token under the 6·N·D convention."""
  return 6 * param_counts(model_cfg)["non_embedding_params"]


def train_flops(model_cfg: Any, seq_len: int, tokens: float) -> float:
  """Training FLOPs (forward + backward, `flops_per_token(...)["train"]`) for `tokens` tokens."""
  return flops_per_token(model_cfg, seq_len)["train"] * float(tokens)
