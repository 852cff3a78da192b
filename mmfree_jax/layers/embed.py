"""Token embedding whose gradient is computed without contended low-precision scatters.

`jnp.take` on a table cast to bf16 differentiates into a scatter-add of bf16 rows into a bf16 table. On real
text the rows of frequent tokens collide (every occurrence of a byte or word piece adds into the same row) and
on an H100 that scatter serializes: 98.7 ms for 16k byte-text ids, 52.5 ms for 32k Zipf-distributed ids of
a 32000-token vocabulary, but 0.6 ms for as many uniformly random ids, which is all a random-token benchmark
sees (`benchmarks/embedding_grad.py`). Here the gradient accumulates in
float32: on accelerators, for vocabularies up to `ONE_HOT_MAX_VOCAB`, as a one-hot product
(`one_hot(ids)^T @ g`: no scatter at all, exact since the one-hot operand is 0/1); otherwise (and on CPUs,
where the product is the slower of the two) as a float32 scatter-add (0.12-0.3 ms on the H100 either way).
The forward pass and the parameter are those of `flax.linen.Embed`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

ONE_HOT_MAX_VOCAB = 1024


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def lookup(table_VD, ids, dtype, one_hot_max_vocab: int | None = None):
  """`table[ids]` in `dtype`; its gradient as described in the module docstring (`one_hot_max_vocab`: the
  largest vocabulary whose gradient is a one-hot product; None: `ONE_HOT_MAX_VOCAB`, 0 on CPUs)."""
  return jnp.take(table_VD.astype(dtype), ids, axis=0)


def _fwd(table_VD, ids, dtype, one_hot_max_vocab):
  return lookup(table_VD, ids, dtype, one_hot_max_vocab), (table_VD, ids)


def _bwd(dtype, one_hot_max_vocab, res, g):
  del dtype
  table_VD, ids = res
  v, d = table_VD.shape
  acc = jnp.promote_types(g.dtype, jnp.float32)
  g_ND = g.reshape(-1, d)
  ids_N = ids.reshape(-1)
  if one_hot_max_vocab is None:
    one_hot_max_vocab = 0 if jax.default_backend() == "cpu" else ONE_HOT_MAX_VOCAB
  if v <= one_hot_max_vocab:
    one_hot_NV = jax.nn.one_hot(ids_N, v, dtype=g.dtype)
    grad = jnp.einsum("nv,nd->vd", one_hot_NV, g_ND, preferred_element_type=acc)
  else:
    grad = jnp.zeros((v, d), acc).at[ids_N].add(g_ND.astype(acc))
  return grad.astype(table_VD.dtype), None


lookup.defvjp(_fwd, _bwd)


class Embed(nn.Embed):
  """`flax.linen.Embed` (same parameter, same `attend`) with the float32 gradient of `lookup`."""

  def __call__(self, inputs):
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"token ids must be integers, got {inputs.dtype}")
    dtype = self.dtype or self.embedding.dtype
    return lookup(self.embedding, inputs, jnp.dtype(dtype))
