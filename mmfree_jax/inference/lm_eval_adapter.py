"""lm-evaluation-harness model: `MMFreeLM` implements its `LM` interface over our inference code.

lm_eval is an optional extra, imported lazily: without it the class is a plain object with the same methods
(requests need only an `args` tuple), so the adapter is usable and testable either way.

  from mmfree_jax.inference.lm_eval_adapter import MMFreeLM, register
  register()   # then: lm_eval --model mmfree_jax --model_args directory=WORKDIR --tasks arc_easy
"""

from typing import Any, Sequence

from mmfree_jax.inference.evaluate import Scorer, encode_pair
from mmfree_jax.inference.generation import generate
from mmfree_jax.inference.loading import Loaded, load


def _lm_base() -> type:
  try:
    from lm_eval.api.model import LM  # pylint: disable=g-import-not-at-top
    return LM
  except ImportError:
    return object


class MMFreeLM(_lm_base()):
  """A workdir or packed export as an lm-eval `LM` (loglikelihood, loglikelihood_rolling, generate_until)."""

  def __init__(self, directory: str | None = None, loaded: Loaded | None = None, batch_size: int = 8,
               max_length: int = 2048, max_gen_toks: int = 256, **kwargs: Any):
    if _lm_base() is not object:
      super().__init__()
    del kwargs
    if loaded is None:
      if directory is None:
        raise ValueError("MMFreeLM needs directory= (a workdir or an export) or loaded=")
      loaded = load(directory)
    self.loaded = loaded
    self.tok = loaded.tokenizer
    self.max_length = int(max_length)
    self.max_gen_toks = int(max_gen_toks)
    self.batch_size = int(batch_size)
    self.scorer = Scorer(loaded.model_cfg, loaded.params, batch_size=int(batch_size), max_len=self.max_length,
                         pad_id=self.tok.pad_id)

  def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    del disable_tqdm
    pairs = [encode_pair(self.tok, *req.args[:2]) for req in requests]
    return self.scorer.loglikelihood(pairs)

  def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
    """Total log-probability of each whole string (after bos), in disjoint windows of `max_length`
    predicted tokens, each conditioned on as much preceding text as fits."""
    del disable_tqdm
    results = []
    for req in requests:
      toks = [self.tok.bos_id] + self.tok.encode(req.args[0])
      pairs = []
      for p in range(1, len(toks), self.max_length):
        end = min(p + self.max_length, len(toks))
        pairs.append((toks[max(0, end - self.max_length - 1):p], toks[p:end]))
      results.append(float(sum(ll for ll, _ in self.scorer.loglikelihood(pairs))) if pairs else 0.0)
    return results

  def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    out = []
    for req in requests:
      context, kw = req.args[0], dict(req.args[1]) if len(req.args) > 1 else {}
      until = kw.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
      max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
      prompt = ([self.tok.bos_id] + self.tok.encode(context))[-(self.max_length - max_new):]
      ids = generate(self.loaded.model_cfg, self.loaded.params, [prompt], max_new_tokens=max_new,
                     temperature=temperature, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)[0]
      text = self.tok.decode(ids)
      for stop in until:
        if stop and stop in text:
          text = text[:text.index(stop)]
      out.append(text)
    return out


def register(name: str = "mmfree_jax") -> None:
  """Registers `MMFreeLM` with lm-eval under `name` (needs lm_eval installed)."""
  from lm_eval.api.registry import register_model  # pylint: disable=g-import-not-at-top
  register_model(name)(MMFreeLM)
