"""The layers' gradients of all micro-batches summed in float32 and stacked on a leading layers axis.

`sum_and_stack(per_layer, dtype)`: `per_layer` holds, for each layer, its gradients of the A micro-batches as one
array [A, ...] (what the micro-batch scan returns); the result is [L, ...] in `dtype`, each layer's slice
`g[0] + g[1] + ...` added in that order in `dtype` (the bits of adding each micro-batch to a zero accumulator).

XLA writes this as one concatenation with the sums fused in, which it runs at about half the GPU's memory
bandwidth (log item 54 of benchmarks/README.md). On one GPU, a Pallas kernel per layer writes that layer's slice of
the stack in place instead: the first call allocates the stack (its other slices are written by the calls after
it, which take it as an aliased input), so the pass reads each gradient once and writes each sum once. Off GPUs
(Pallas' interpret mode, tests), under a mesh of several devices, or for a shape the tiling does not divide,
XLA's `jnp.stack` computes the same values.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.layers import pallas_util

KERNEL = 1  # 0: XLA's stack everywhere (A/B runs: `benchmarks.train_step --set=grad_stack.KERNEL=0`)
UNINITIALIZED = 1  # 0: `uninitialized` gives zeros everywhere
WIDTH = 1024  # elements per tile row: each layer's slice is read as [N / WIDTH, WIDTH]
ROWS_PER_PROGRAM = 8
NUM_WARPS = 4


def _kernel(parts_ref, *refs, n_parts):
  out_ref = refs[-1]  # refs[0] is the stack being filled, when aliased: only written through out_ref
  total = parts_ref[0].astype(out_ref.dtype)
  for a in range(1, n_parts):
    total = total + parts_ref[a].astype(out_ref.dtype)
  out_ref[...] = total


def _write_layer(stack, parts, layer: int, n_layers: int, dtype, interpret: bool):
  """`stack` (None: a new one) with slice `layer` set to the in-order sum of `parts [A, R, WIDTH]`."""
  n_parts, rows, width = parts.shape
  block = pallas_util.pow2_divisor(rows, ROWS_PER_PROGRAM)
  out = jax.ShapeDtypeStruct((n_layers, rows, width), dtype)
  in_specs = [pl.BlockSpec((n_parts, block, width), lambda i: (0, i, 0))]
  args = (parts,)
  if stack is not None:
    in_specs.append(pl.BlockSpec((None, block, width), lambda i: (layer, i, 0)))
    args += (stack,)
  return pl.pallas_call(
      functools.partial(_kernel, n_parts=n_parts), out_shape=out, grid=(rows // block,), name="grad_stack",
      in_specs=in_specs, out_specs=pl.BlockSpec((None, block, width), lambda i: (layer, i, 0)),
      input_output_aliases={} if stack is None else {1: 0}, interpret=interpret,
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
  )(*args)


def _one_gpu() -> bool:
  """On a GPU, and one device: a mesh of one, or no mesh and one device in all (the kernels are not partitioned)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not pallas_util.interpret() and (jax.device_count() == 1 if mesh.empty else mesh.size == 1)


def uninitialized(shape, dtype):
  """An array whose elements are undefined until written: the buffers that the micro-batch loop writes each
  micro-batch's gradients into, every element before it is read. XLA would zero-fill the outputs of a scan
  (~3 ms per step at 1.3B, log item 54); on one GPU, a kernel that writes nothing allocates them instead.
  Elsewhere, zeros."""
  if not (UNINITIALIZED and _one_gpu()):
    return jnp.zeros(shape, dtype)
  ones = (1,) * len(shape)
  return pl.pallas_call(lambda out_ref: None, out_shape=jax.ShapeDtypeStruct(shape, dtype), grid=(1,),
                        out_specs=pl.BlockSpec(ones, lambda i: (0,) * len(shape)), name="uninitialized",
                        interpret=pallas_util.interpret())()


def sum_and_stack(per_layer, dtype, kernel: bool | None = None):
  """[L, ...] in `dtype` from L arrays [A, ...] (see the module docstring). `kernel`: None decides by the
  backend, the mesh and the shapes; True runs the kernel (interpreted off GPUs: tests)."""
  per_layer = list(per_layer)
  shape = per_layer[0].shape
  if any(p.shape != shape for p in per_layer):
    raise ValueError(f"sum_and_stack: every layer's gradients must have one shape; got {[p.shape for p in per_layer]}")
  n = per_layer[0].size // shape[0]
  if kernel is None:
    kernel = bool(KERNEL) and _one_gpu() and n % WIDTH == 0
  if not kernel:
    return jnp.stack([_sum_in_order(p, dtype) for p in per_layer])
  if n % WIDTH:
    raise ValueError(f"sum_and_stack: a layer's {n} elements are not a multiple of WIDTH={WIDTH}")
  stack = None
  for layer, p in enumerate(per_layer):
    stack = _write_layer(stack, p.reshape(shape[0], n // WIDTH, WIDTH), layer, len(per_layer), dtype,
                         pallas_util.interpret())
  return stack.reshape((len(per_layer),) + shape[1:])


def _sum_in_order(stacked, dtype):
  """`stacked[0] + stacked[1] + ...` in `dtype`, in order: the bits of adding each to a zero accumulator."""
  total = stacked[0].astype(dtype)
  for i in range(1, stacked.shape[0]):
    total = total + stacked[i].astype(dtype)
  return total
