"""The recurrence `h_t = a_t * h_{t-1} + b_t` and its VJP as two GPU kernels (Pallas, Triton backend).

Each program owns one batch row and `block_d` channels and walks the time axis in order (the backward in reverse),
`unroll` steps per loop iteration with all of their loads issued before the multiply-adds; the state stays in
registers in the state dtype (float32; float64 for float64 inputs). Every element is read or written once:

  forward   reads a, b; writes h (input dtype) and h_T                               3 passes over [B, T, D]
  backward  lam_t = g_t + a_{t+1} lam_{t+1} (lam_T's carry-in: the final state's cotangent);
            reads a, h, g; writes da_t = lam_t h_{t-1}, db_t = lam_t, dh0 = a_1 lam_1   5 passes

so both are bound by memory traffic, not by the length of the sequential walk, as long as enough programs are in
flight (B * D / block_d of them). The arithmetic is the sequential reference's, step for step, in the state dtype;
the backward reads the saved output in the input dtype, as `recurrence._parallel_bwd` does.

Off GPUs the kernels run in Pallas' interpret mode (tests). Under a mesh (`jax.set_mesh` with the models' logical
axis rules) the call is wrapped in `shard_map` over the activations' batch and channel axes: each device runs the
kernels on its own rows and channels, and a time axis sharded by the rules is gathered first.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.layers import pallas_util

BLOCK_D = 64  # channels per program (the largest power of two <= this dividing D)
# A grid of fewer than SMALL_GRID programs (B x D / BLOCK_D: under 2 per SM on an H100; the 1.3B step's micro-batches
# of 4 rows give 128) takes blocks of SMALL_GRID_BLOCK_D channels instead: more walks in flight (log item 53).
SMALL_GRID = 256
SMALL_GRID_BLOCK_D = 16
UNROLL = 32  # time steps per loop iteration (the largest power of two <= this dividing T)
NUM_WARPS = 1
PREFETCH = True  # load the next block of time steps while computing the current one
SEQ_AXES = ("act_batch", None, "act_heads")  # the time axis whole on each device
STATE_AXES = ("act_batch", "act_heads")


def _walk(n_blocks, load, step, init):
  return pallas_util.walk(n_blocks, load, step, init, prefetch=PREFETCH)


def _forward_kernel(a_ref, b_ref, h0_ref, o_ref, last_ref, *, unroll):
  state = h0_ref.dtype

  def load(c):
    t0 = c * unroll
    return [a_ref[t0 + u] for u in range(unroll)], [b_ref[t0 + u] for u in range(unroll)]

  def step(h, c, rows):
    a, b = rows
    for u in range(unroll):
      h = a[u].astype(state) * h + b[u].astype(state)
      o_ref[c * unroll + u] = h.astype(o_ref.dtype)
    return h

  last_ref[...] = _walk(a_ref.shape[0] // unroll, load, step, h0_ref[...])


def _backward_kernel(a_ref, o_ref, g_ref, h0_ref, glast_ref, da_ref, db_ref, dh0_ref, *, unroll):
  state = h0_ref.dtype
  n_blocks = a_ref.shape[0] // unroll
  h0 = h0_ref[...]

  def load(c):  # block c counts from the end
    t0 = (n_blocks - 1 - c) * unroll
    h_prev = [o_ref[jnp.maximum(t0 - 1, 0)]] + [o_ref[t0 + u - 1] for u in range(1, unroll)]
    return [a_ref[t0 + u] for u in range(unroll)], [g_ref[t0 + u] for u in range(unroll)], h_prev

  def step(carry, c, rows):
    lam, a_next = carry
    a, g, h_prev = rows
    t0 = (n_blocks - 1 - c) * unroll
    for u in reversed(range(unroll)):
      lam = g[u].astype(state) + a_next * lam
      hp = jnp.where(t0 == 0, h0, h_prev[0].astype(state)) if u == 0 else h_prev[u].astype(state)
      da_ref[t0 + u] = (lam * hp).astype(da_ref.dtype)
      db_ref[t0 + u] = lam.astype(db_ref.dtype)
      a_next = a[u].astype(state)
    return lam, a_next

  lam, a_first = _walk(n_blocks, load, step, (glast_ref[...], jnp.ones_like(h0)))
  dh0_ref[...] = a_first * lam


def block_d(b: int, d: int) -> int:
  """Channels per program for `b` rows of `d` channels."""
  bd = pallas_util.pow2_divisor(d, BLOCK_D)
  return pallas_util.pow2_divisor(d, SMALL_GRID_BLOCK_D) if b * (d // bd) < SMALL_GRID else bd


def _call(kernel, inputs, outputs, t_len: int, d: int):
  """`kernel` over the grid (batch rows, channel blocks); `outputs`: ShapeDtypeStructs, [B, T, D] or [B, D]."""
  bd = block_d(inputs[0].shape[0], d)
  seq = pl.BlockSpec((None, t_len, bd), lambda i, j: (i, 0, j))
  vec = pl.BlockSpec((None, bd), lambda i, j: (i, j))
  spec = lambda x: seq if x.ndim == 3 else vec
  return pl.pallas_call(
      functools.partial(kernel, unroll=pallas_util.pow2_divisor(t_len, UNROLL)),
      name="recurrence" + kernel.__name__.removesuffix("_kernel"),  # recurrence_forward / _backward in profiles
      out_shape=outputs,
      grid=(inputs[0].shape[0], d // bd),
      in_specs=[spec(x) for x in inputs],
      out_specs=[spec(x) for x in outputs],
      interpret=pallas_util.interpret(),
      compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS),
  )(*inputs)


def _forward(a, b, h0):
  _, t_len, d = b.shape
  out = jax.ShapeDtypeStruct(b.shape, b.dtype)
  last = jax.ShapeDtypeStruct(h0.shape, h0.dtype)
  return tuple(_call(_forward_kernel, (a, b, h0), (out, last), t_len, d))


def _backward(a, out, h0, d_out, d_last):
  _, t_len, d = out.shape
  shapes = (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(out.shape, out.dtype),
            jax.ShapeDtypeStruct(h0.shape, h0.dtype))
  return tuple(_call(_backward_kernel, (a, out, d_out.astype(out.dtype), h0, d_last.astype(h0.dtype)),
                     shapes, t_len, d))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scan(a, b, h0, output_name):
  del output_name
  return _forward(a, b, h0)


def _scan_fwd(a, b, h0, output_name):
  out, last = _forward(a, b, h0)
  if output_name is not None:
    out = checkpoint_name(out, output_name)
  return (out, last), (a, out, h0)


def _scan_bwd(output_name, res, cts):
  del output_name
  a, out, h0 = res
  d_out, d_last = cts
  return _backward(a, out, h0, d_out, d_last)


_scan.defvjp(_scan_fwd, _scan_bwd)


def linear_scan(a, b, h0, output_name: str | None = None):
  """`(h [B, T, D] in b's dtype, h_T [B, D] in h0's dtype)` of `h_t = a_t h_{t-1} + b_t` (resets already folded
  into `a`); `h0 [B, D]` in the state dtype. `output_name`: `checkpoint_name` of `h` for remat policies."""
  if a.shape != b.shape or a.ndim != 3 or h0.shape != (b.shape[0], b.shape[2]):
    raise ValueError(f"recurrence kernel: expected a, b [B, T, D] and h0 [B, D]; got {a.shape}, {b.shape}, "
                     f"{h0.shape}")
  fn = lambda a_, b_, h0_: _scan(a_, b_, h0_, output_name)
  return pallas_util.per_device(fn, (SEQ_AXES, SEQ_AXES, STATE_AXES), (SEQ_AXES, STATE_AXES))(a, b, h0)
