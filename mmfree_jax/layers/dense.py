"""A bias-free dense layer whose kernel is created in its final shape, so logical axis names match its rank.

(`flax.linen.DenseGeneral` initializes a flattened 2-D kernel and reshapes it, which does not combine with
logical partitioning of a kernel with more than two axes.)
"""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name


class Dense(nn.Module):
  """`x[..., *in] @ kernel[*in, *features]`, contracting the last `n_in` axes of x, in the compute dtype.

  The product is requested in the compute dtype (the matrix units accumulate bf16 products in float32
  internally); asking for a float32 result would make the backward pass multiply a float32 cotangent, i.e.
  run float32 (TF32) GEMMs at a fraction of the bf16 rate.
  """
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  n_in: int = 1
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[x.ndim - self.n_in:]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (*in_shape, *self.features), self.param_dtype)
    dims = ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ()))
    out = lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), dims)
    return checkpoint_name(out, "proj")
