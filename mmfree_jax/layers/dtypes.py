"""Dtype helpers shared by the layers."""

import jax.numpy as jnp


def accum(dtype) -> jnp.dtype:
  """The dtype for reductions and quantizer arithmetic: float32, or float64 when the input is float64."""
  return jnp.promote_types(dtype, jnp.float32)


def resolve(name) -> jnp.dtype:
  """A dtype from a config string ("bfloat16", "float32", ...) or a dtype."""
  return jnp.dtype(name)
