"""Zero-shot multiple-choice evaluation by log-likelihood, as lm-evaluation-harness scores the paper's tasks.

Each example is a list of (context, continuation) choices and a label. A choice's score is the summed
log-probability of its continuation tokens given `[bos] + context`; `acc` picks the highest score, `acc_norm`
the highest score per byte of the continuation (lm-eval's length normalization). Requests are sorted by length,
right-padded to power-of-two lengths and scored in fixed-size batches by one compiled function per shape.

Local JSONL files with the Hugging Face datasets' field names:
  arc         question, choices{text,label}, answerKey               "Question: q\\nAnswer:" + " choice"
  openbookqa  question_stem, choices{text,label}, answerKey          "q" + " choice"
  hellaswag   activity_label, ctx_a, ctx_b, endings, label           "label: ctx_a Ctx_b" + " ending"
  piqa        goal, sol1, sol2, label                                "Question: goal\\nAnswer:" + " sol"
  winogrande  sentence (with one "_"), option1, option2, answer      partial scoring: the option fills the
                                                                     blank in the context, score the suffix
  generic     context, choices (list of str), label (int)            "context" + " choice"
"""

import dataclasses
import functools
import json
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax.data.tokenizers import Tokenizer
from mmfree_jax.inference.generation import bucket, family, unwrap
from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models import model_config

FORMATS = ("arc", "hellaswag", "piqa", "winogrande", "openbookqa", "generic")


@dataclasses.dataclass
class Example:
  pairs: list[tuple[str, str]]  # (context, continuation) per choice
  label: int


def _letter_label(choices: dict, key: str) -> int:
  labels = [str(x) for x in choices["label"]]
  return labels.index(str(key))


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def parse(doc: dict, fmt: str) -> Example:
  """One JSONL record of a task format -> an Example."""
  if fmt == "arc":
    ctx = f"Question: {doc['question']}\nAnswer:"
    return Example([(ctx, " " + c) for c in doc["choices"]["text"]], _letter_label(doc["choices"], doc["answerKey"]))
  if fmt == "openbookqa":
    ctx = doc["question_stem"]
    return Example([(ctx, " " + c) for c in doc["choices"]["text"]], _letter_label(doc["choices"], doc["answerKey"]))
  if fmt == "hellaswag":
    ctx = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return Example([(ctx, " " + _hellaswag_clean(e)) for e in doc["endings"]], int(doc["label"]))
  if fmt == "piqa":
    ctx = f"Question: {doc['goal']}\nAnswer:"
    return Example([(ctx, " " + doc["sol1"]), (ctx, " " + doc["sol2"])], int(doc["label"]))
  if fmt == "winogrande":
    s = doc["sentence"]
    i = s.index("_")
    suffix = " " + s[i + 1:].strip()
    return Example([(s[:i] + doc["option1"], suffix), (s[:i] + doc["option2"], suffix)], int(doc["answer"]) - 1)
  if fmt == "generic":
    return Example([(doc["context"], " " + c) for c in doc["choices"]], int(doc["label"]))
  raise ValueError(f"unknown task format {fmt!r}; expected one of {FORMATS}")


def guess_format(path: str) -> str:
  name = path.lower()
  for fmt in ("arc", "hellaswag", "piqa", "winogrande", "openbookqa"):
    if fmt in name:
      return fmt
  return "generic"


def load_task(path: str, fmt: str | None = None, limit: int | None = None) -> list[Example]:
  fmt = fmt or guess_format(path)
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        out.append(parse(json.loads(line), fmt))
        if limit and len(out) >= limit:
          break
  return out


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's tokens are
  those of `encode(context + continuation)` after the context's (so merges across the boundary are kept)."""
  n_space = len(context) - len(context.rstrip(" "))
  if n_space:
    continuation = context[-n_space:] + continuation
    context = context[:-n_space]
  ctx = tok.encode(context)
  whole = tok.encode(context + continuation)
  if whole[:len(ctx)] != ctx:
    return [tok.bos_id] + ctx, tok.encode(continuation)
  return [tok.bos_id] + ctx, whole[len(ctx):]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score(params, tokens_BT, targets_BT, weights_BT, valid_BT, *, cfg: ModelConfig):
  fam = family(cfg)
  w = fam.prepare(cfg, params)
  cache = fam.init_cache(cfg, tokens_BT.shape[0], tokens_BT.shape[1])
  x, _ = fam.hidden(cfg, w, tokens_BT, valid_BT, cache)
  logp = jax.nn.log_softmax(fam.logits(cfg, w, x).astype(jnp.float32), axis=-1)
  tgt = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
  greedy = (jnp.argmax(logp, axis=-1) == targets_BT) | (weights_BT == 0)
  return jnp.sum(tgt * weights_BT, axis=1), jnp.all(greedy, axis=1)


class Scorer:
  """Log-likelihoods of token continuations, batched and compiled (latent or packed parameters)."""

  def __init__(self, model_cfg, params, *, batch_size: int = 8, max_len: int = 2048, pad_id: int = 0):
    self.cfg = model_config(model_cfg)
    self.params = jax.tree.map(jnp.asarray, unwrap(params))
    self.batch_size, self.max_len, self.pad_id = batch_size, max_len, pad_id

  def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) per (context, continuation)."""
    rows = []
    for ctx, cont in pairs:
      if not cont:
        raise ValueError("empty continuation")
      seq = (list(ctx) + list(cont))[-(self.max_len + 1):]
      rows.append((seq, min(len(cont), len(seq) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      length = min(bucket(max(len(rows[i][0]) - 1 for i in idx)), self.max_len)
      shape = (self.batch_size, length)
      tokens, targets = np.full(shape, self.pad_id, np.int32), np.zeros(shape, np.int32)
      weights, valid = np.zeros(shape, np.float32), np.zeros(shape, bool)
      for r, i in enumerate(idx):
        seq, n_cont = rows[i]
        n = len(seq) - 1
        tokens[r, :n], targets[r, :n], valid[r, :n] = seq[:-1], seq[1:], True
        weights[r, n - n_cont:n] = 1.0
      ll, greedy = _score(self.params, tokens, targets, weights, valid, cfg=self.cfg)
      ll, greedy = np.asarray(ll), np.asarray(greedy)
      for r, i in enumerate(idx):
        out[i] = (float(ll[r]), bool(greedy[r]))
    return out


def evaluate(scorer: Scorer, tok: Tokenizer, examples: Sequence[Example]) -> dict:
  """acc and acc_norm (by continuation bytes) with their standard errors."""
  pairs, owner = [], []
  for e, ex in enumerate(examples):
    for ctx, cont in ex.pairs:
      pairs.append(encode_pair(tok, ctx, cont))
      owner.append(e)
  scores = [s for s, _ in scorer.loglikelihood(pairs)]
  acc, acc_norm, k = [], [], 0
  for ex in examples:
    ll = np.asarray(scores[k:k + len(ex.pairs)])
    nbytes = np.asarray([max(len(cont.encode("utf-8")), 1) for _, cont in ex.pairs], np.float64)
    k += len(ex.pairs)
    acc.append(float(np.argmax(ll) == ex.label))
    acc_norm.append(float(np.argmax(ll / nbytes) == ex.label))
  n = len(examples)
  stderr = lambda v: float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
  return {"n": n, "acc": float(np.mean(acc)) if n else 0.0, "acc_stderr": stderr(acc),
          "acc_norm": float(np.mean(acc_norm)) if n else 0.0, "acc_norm_stderr": stderr(acc_norm)}


def table(rows: Sequence[dict]) -> str:
  lines = [f"{'task':<24} {'n':>6} {'acc':>8} {'acc_norm':>9}"]
  for r in rows:
    lines.append(f"{r['task']:<24} {r['n']:>6} {r['acc']:>8.4f} {r['acc_norm']:>9.4f}")
  return "\n".join(lines)
