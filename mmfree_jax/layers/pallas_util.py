"""What the layers' Pallas kernels share: interpret mode off GPUs, and running a kernel per device under a mesh."""

import flax.linen as nn
import jax
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


def per_device(fn, in_axes, out_axes):
  """`fn` as is without a mesh of several devices; under one (`jax.set_mesh` and the models' logical axis rules),
  `fn` in `shard_map`, each device running it on its shards. `in_axes` / `out_axes`: per argument / output, a
  tuple of logical axis names, with None for an axis the kernel needs whole (gathered if the rules shard it)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  spec = lambda names: P(*(None if n is None else nn.logical_to_mesh_axes((n,))[0] for n in names))
  return jax.shard_map(fn, in_specs=tuple(spec(a) for a in in_axes), out_specs=tuple(spec(a) for a in out_axes),
                       check_vma=False)
