"""Compiled functions shared by the model tests, made once per model config.

On the CPU, compiling even these tiny models takes seconds: most of these tests' time. A function here compiles once
per model config and shapes and dtypes of its arguments, however many tests (keys, parameters, batches) call it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mmfree_jax.model_config import IMPLEMENTATION_FIELDS, ModelConfig
from mmfree_jax.models import build_model, model_config
from mmfree_jax.train import step


def _abstract(tree):
  return jax.tree.structure(tree), tuple((v.shape, v.dtype) for v in jax.tree.leaves(tree))


_EXECUTABLES = {}


def _call(fn, *args):
  """`jax.jit(fn)(*args)`, compiled once per `fn` and shapes and dtypes of `args` and held here: jit's own caches are
  bounded, and newer JAX versions drop an executable after some dozens of other compilations (a test module's)."""
  key = (fn, jax.config.jax_enable_x64, *_abstract(args))
  if key not in _EXECUTABLES:
    _EXECUTABLES[key] = jax.jit(fn).lower(*args).compile()
  return _EXECUTABLES[key](*args)


@functools.cache
def _init(cfg: ModelConfig):
  model = build_model(cfg)
  return lambda key, tokens: model.init(key, tokens)


@functools.cache
def _own_init(cfg: ModelConfig, x64: bool):
  """The tree, shapes and dtypes of `cfg`'s own init (traced, not compiled)."""
  del x64  # a key: float64 parameters are float32 without it
  return _abstract(jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


def init(cfg, key):
  """The parameters (boxed, as `init` returns them) of `cfg`'s model, initialized from `key`.

  The implementation fields (`model_config.IMPLEMENTATION_FIELDS`: scan, BitLinear impl, compute dtype, remat, ...)
  choose how a model is computed, not its parameter tree, so one compiled init serves every implementation of a model:
  that of the fields' defaults, computing in the parameters' dtype without remat (checked: `cfg`'s own init gives the
  same tree, shapes and dtypes). Nor does the tree depend on the tokens' length: a row of 8 tokens initializes."""
  cfg = model_config(cfg)
  defaults = {name: getattr(ModelConfig(), name) for name in IMPLEMENTATION_FIELDS}
  canonical = dataclasses.replace(cfg, **dict(defaults, dtype=cfg.param_dtype, remat="none"))
  params = _call(_init(canonical), key, jnp.zeros((1, 8), jnp.int32))
  assert _abstract(params) == _own_init(cfg, jax.config.jax_enable_x64), f"{cfg}: its own init makes another tree"
  return params


@functools.cache
def _loss_and_grads(cfg: ModelConfig):
  model = build_model(cfg)
  return jax.value_and_grad(lambda params, batch: step.loss_sums(model, params, batch)[0])


def loss_and_grads(cfg, params, batch):
  """The training loss sum of `cfg`'s model on `batch` (`train.step.loss_sums`) and its gradient."""
  return _call(_loss_and_grads(model_config(cfg)), params, batch)
