"""What the layers' Pallas kernels share: interpret mode off GPUs, and running a kernel per device under a mesh."""

import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def interpret() -> bool:
  """Kernels are written for the GPU (Triton backend); elsewhere Pallas interprets them (tests)."""
  return jax.default_backend() != "gpu"


def pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two <= cap dividing n (tile sizes that need no masks)."""
  p = 1
  while p * 2 <= cap and n % (p * 2) == 0:
    p *= 2
  return p


def walk(n_blocks, load, step, init, prefetch: bool = True):
  """`step(carry, block, loaded)` over blocks 0 .. n_blocks - 1 of `load(block)`, inside a kernel. With `prefetch`,
  the next block is loaded before the current one is computed, so that its memory latency overlaps that work (a
  loop iteration otherwise waits for its loads, then computes: log items 16 and 52 of benchmarks/README.md)."""
  if not prefetch:
    return lax.fori_loop(0, n_blocks, lambda c, carry: step(carry, c, load(c)), init)

  def body(c, carry):
    carry, loaded = carry
    nxt = load(jnp.minimum(c + 1, n_blocks - 1))
    return step(carry, c, loaded), nxt

  return lax.fori_loop(0, n_blocks, body, (init, load(0)))[0]


def per_device(fn, in_axes, out_axes):
  """`fn` as is without a mesh of several devices; under one (`jax.set_mesh` and the models' logical axis rules),
  `fn` in `shard_map`, each device running it on its shards. `in_axes` / `out_axes`: per argument / output, a
  tuple of logical axis names, with None for an axis the kernel needs whole (gathered if the rules shard it).
  A logical axis whose size the mesh axes do not divide (e.g. the single row of `model.init`) stays whole."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn

  def call(*args):
    whole = set()
    for arr, names in zip(args, in_axes):
      for dim, name in zip(arr.shape, names):
        if name is None:
          continue
        if dim % math.prod(mesh.shape[a] for a in _as_tuple(_mesh_axes(name))):
          whole.add(name)
    spec = lambda names: P(*(None if n is None or n in whole else _mesh_axes(n) for n in names))
    return jax.shard_map(fn, in_specs=tuple(spec(a) for a in in_axes),
                         out_specs=tuple(spec(a) for a in out_axes), check_vma=False)(*args)

  return call


def _mesh_axes(name: str):
  """The mesh axes (None, a name or a tuple of names) that the active logical rules give one logical axis."""
  return nn.logical_to_mesh_axes((name,))[0]


def _as_tuple(axes) -> tuple:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)
