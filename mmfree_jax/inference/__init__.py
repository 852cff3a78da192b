"""Inference: compiled generation for both families, packed ternary checkpoints, checkpoint import, evaluation.

  generate(model_cfg, params, prompts_tokens, max_new_tokens=..., ...)   batched, whole decode loop compiled
  sample_text(config, model, params, prompt, n_tokens)                    greedy text sample (the trainer's)
  load(directory)                                                         workdir / export -> Loaded
"""

from mmfree_jax.inference.generation import Sampling, generate, sample_text
from mmfree_jax.inference.loading import Loaded, load

__all__ = ["Loaded", "Sampling", "generate", "load", "sample_text"]
