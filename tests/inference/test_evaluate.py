"""Multiple-choice scoring: task formats, lm-eval's context/continuation split, scores against a full forward,
and the lm-evaluation-harness adapter's three methods with request-like objects."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.data.tokenizers import ByteTokenizer
from mmfree_jax.inference import evaluate as ev
from mmfree_jax.inference.lm_eval_adapter import MMFreeLM
from mmfree_jax.inference.loading import Loaded
from mmfree_jax.models import model_config
from tests.inference.helpers import full_forward, tiny_cfg, tiny_params

DOCS = {
    "arc": {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"},
    "openbookqa": {"question_stem": "Sun is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
                   "answerKey": "A"},
    "hellaswag": {"activity_label": "Cooking", "ctx_a": "A man cuts.", "ctx_b": "he", "label": "1",
                  "endings": ["eats [title] it.", "cooks."]},
    "piqa": {"goal": "Open a jar", "sol1": "twist", "sol2": "kick", "label": 0},
    "winogrande": {"sentence": "Tom gave Bob a gift because _ was kind.", "option1": "Tom", "option2": "Bob",
                   "answer": "1"},
    "generic": {"context": "2+2=", "choices": ["4", "5"], "label": 0},
}


def test_formats():
  ex = {f: ev.parse(d, f) for f, d in DOCS.items()}
  assert ex["arc"].pairs[1] == ("Question: Q?\nAnswer:", " b") and ex["arc"].label == 1
  assert ex["openbookqa"].pairs[0] == ("Sun is", " hot") and ex["openbookqa"].label == 0
  assert ex["hellaswag"].pairs[0] == ("Cooking: A man cuts. He", " eats. it.") and ex["hellaswag"].label == 1
  assert ex["piqa"].pairs[1] == ("Question: Open a jar\nAnswer:", " kick")
  assert ex["winogrande"].pairs == [("Tom gave Bob a gift because Tom", " was kind."),
                                    ("Tom gave Bob a gift because Bob", " was kind.")]
  assert ex["winogrande"].label == 0 and ex["generic"].pairs[0] == ("2+2=", " 4")
  assert ev.guess_format("data/ARC-Challenge-test.jsonl") == "arc"
  tok = ByteTokenizer()
  assert ev.encode_pair(tok, "Answer: ", "yes") == ([1] + tok.encode("Answer:"), tok.encode(" yes"))


@pytest.fixture(scope="module")
def loaded():
  cfg = tiny_cfg("hgrn_bit")
  cfg["vocab_size"] = 260
  params = tiny_params(cfg, head_gain=5.0)
  config = types.SimpleNamespace(model=cfg, get=lambda k, d=None: {"data": {"source": "embedded"}}.get(k, d))
  return Loaded(config=config, model_cfg=model_config(cfg), params=params, packed=False, step=0, directory="")


def test_scores_equal_full_forward_and_accuracy(loaded):
  tok = ByteTokenizer()
  scorer = ev.Scorer(loaded.model_cfg, loaded.params, batch_size=4, max_len=64)
  pairs = [ev.encode_pair(tok, "def f(x):", " return x"), ev.encode_pair(tok, "import", " os"),
           ev.encode_pair(tok, "a", "b")]
  got = scorer.loglikelihood(pairs)
  for (ctx, cont), (ll, greedy) in zip(pairs, got):
    seq = np.zeros((1, 32), np.int32)
    seq[0, :len(ctx) + len(cont)] = ctx + cont
    logits = full_forward(loaded.config.model, loaded.params, seq)[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    pos = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    want = logp[pos, np.asarray(cont)]
    np.testing.assert_allclose(ll, want.sum(), rtol=2e-3)
    assert greedy == bool(np.all(np.argmax(logp[pos], -1) == np.asarray(cont)))
  examples = [ev.parse(DOCS["generic"], "generic"), ev.parse(DOCS["piqa"], "piqa")]
  res = ev.evaluate(scorer, tok, examples)
  assert res["n"] == 2 and res["acc"] in (0.0, 0.5, 1.0) and 0 <= res["acc_norm"] <= 1
  assert "acc_norm" in ev.table([dict(task="t", **res)])


def test_lm_eval_adapter_methods(loaded):
  lm = MMFreeLM(loaded=loaded, batch_size=4, max_length=32, max_gen_toks=8)
  req = lambda *args: types.SimpleNamespace(args=args)
  (ll, greedy), = lm.loglikelihood([req("def f(x):", " return x")])
  direct = lm.scorer.loglikelihood([ev.encode_pair(lm.tok, "def f(x):", " return x")])[0]
  assert (ll, greedy) == direct and ll < 0
  text = "x = 1\n" * 12  # 72 bytes: three windows of at most 32 predicted tokens
  rolling, = lm.loglikelihood_rolling([req(text)])
  toks = [1] + lm.tok.encode(text)
  # lm-eval's windows: every scored input is at most max_length tokens, filled with the preceding text.
  parts = lm.scorer.loglikelihood([(toks[:1], toks[1:33]), (toks[32:33], toks[33:65]), (toks[40:65], toks[65:])])
  np.testing.assert_allclose(rolling, sum(p for p, _ in parts), rtol=1e-6)
  out, = lm.generate_until([req("def ", {"until": ["\n"], "max_gen_toks": 8})])
  assert isinstance(out, str) and "\n" not in out and len(out) <= 8
