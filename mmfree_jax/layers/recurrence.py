"""The first-order linear recurrence `h_t = a_t * h_{t-1} + b_t` along the time axis, with interchangeable backends.

All backends take `a, b: [B, T, D]`, an optional initial state `h0: [B, D]` (the state before the first token) and
optional `resets: [B, T]` (True where a new document begins: the state is zeroed before that token, i.e. a_t := 0),
carry the state in float32 (float64 under x64 with float64 inputs) and return `(h [B, T, D] in b's dtype,
h_T [B, D] in the state dtype)`.

  sequential   `lax.scan` over time: the obviously-correct reference.
  associative  `lax.associative_scan` with the pair operator (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2).
  chunked      associative scans inside fixed-length chunks (in parallel), a sequential scan across the chunk
               boundaries (T / chunk steps on a [B, D] state), then one fix-up multiply-add.
  pallas       a GPU kernel per direction (`recurrence_kernel`): each program walks time for a block of channels,
               reading and writing every element once (interpret mode off GPUs).
  auto         pallas on GPUs, associative elsewhere.

`sequential` is differentiated by plain autodiff (the reference). The parallel backends carry a custom VJP: the
backward of a linear recurrence is the same recurrence run backwards,
  lam_t = g_t + a_{t+1} lam_{t+1}  (g = the output's cotangent; + the final state's at T),
  db_t = lam_t,   da_t = lam_t h_{t-1},   dh0 = a_1 lam_1,
so it is one more scan of the same backend on time-reversed inputs plus element-wise work, instead of the
transpose of every level of the scan tree. It keeps `a` and the output `h` (in the output dtype, the value the
model keeps anyway; as the official kernel, which reads its saved output in the input dtype).
"""

import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from jax import lax

from mmfree_jax.layers import dtypes
from mmfree_jax.layers import recurrence_kernel

IMPLS = ("sequential", "associative", "chunked", "pallas", "auto")


def resets_from_segments(segment_ids):
  """True where a token starts a new document within its row (position 0 keeps the incoming state)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def _with_h0(scan, a, b, h0):
  """`scan` of `a`, `b` (input dtype) in h0's state dtype, the initial state folded into the first `b`."""
  a = a.astype(h0.dtype)
  return scan(a, b.astype(h0.dtype).at[:, 0].add(a[:, 0] * h0))


def _combine(x, y):
  a1, b1 = x
  a2, b2 = y
  return a1 * a2, a2 * b1 + b2


def _sequential(a, b):
  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h
  _, h = lax.scan(step, jnp.zeros_like(b[:, 0]), (jnp.swapaxes(a, 0, 1), jnp.swapaxes(b, 0, 1)))
  return jnp.swapaxes(h, 0, 1)


def _associative(a, b):
  return lax.associative_scan(_combine, (a, b), axis=1)[1]


def _chunked(a, b, chunk):
  bsz, t, d = b.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:  # identity elements (a=1, b=0) leave the state unchanged
    a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)), constant_values=1)
    b = jnp.pad(b, ((0, 0), (0, pad), (0, 0)))
  a = a.reshape(bsz, n, chunk, d)
  b = b.reshape(bsz, n, chunk, d)
  a_cum, h_local = lax.associative_scan(_combine, (a, b), axis=2)

  def carry_step(h, ab_end):
    a_end, h_end = ab_end
    return a_end * h + h_end, h

  _, h_in = lax.scan(carry_step, jnp.zeros_like(b[:, 0, 0]),
                     (jnp.swapaxes(a_cum[:, :, -1], 0, 1), jnp.swapaxes(h_local[:, :, -1], 0, 1)))
  h = h_local + a_cum * jnp.swapaxes(h_in, 0, 1)[:, :, None]
  return h.reshape(bsz, n * chunk, d)[:, :t]


def _parallel(a, b, impl, chunk):
  return _associative(a, b) if impl == "associative" else _chunked(a, b, chunk)


# Name of the recurrence output for remat policies (`models.stack`): saving it also saves the custom VJP's residual.
OUTPUT_NAME = "scan"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _parallel_scan(a, b, h0, impl, chunk):
  return _parallel_fwd(a, b, h0, impl, chunk)[0]


def _parallel_fwd(a, b, h0, impl, chunk):
  """`a`, `b` in the input dtype (resets already applied to `a`), `h0` [B, D] in the state dtype."""
  h = _with_h0(lambda a_s, b_s: _parallel(a_s, b_s, impl, chunk), a, b, h0)
  out = checkpoint_name(h.astype(b.dtype), OUTPUT_NAME)
  return (out, h[:, -1]), (a, out, h0)


def _parallel_bwd(impl, chunk, res, cts):
  a, out, h0 = res
  d_out, d_last = cts
  state = h0.dtype
  g = d_out.astype(state).at[:, -1].add(d_last)
  a_next = jnp.concatenate([a[:, 1:].astype(state), jnp.zeros_like(h0)[:, None]], axis=1)
  lam = jnp.flip(_parallel(jnp.flip(a_next, 1), jnp.flip(g, 1), impl, chunk), 1)
  h_prev = jnp.concatenate([h0[:, None], out[:, :-1].astype(state)], axis=1)
  return (lam * h_prev).astype(a.dtype), lam.astype(out.dtype), a[:, 0].astype(state) * lam[:, 0]


_parallel_scan.defvjp(_parallel_fwd, _parallel_bwd)


def resolve_impl(impl: str) -> str:
  """`impl` with "auto" resolved for the default backend; raises on an unknown name."""
  if impl not in IMPLS:
    raise ValueError(f"unknown scan impl {impl!r}; expected one of {IMPLS}")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "associative"
  return impl


def linear_scan(a, b, h0=None, resets=None, *, impl: str = "associative", chunk: int = 128):
  """`h_t = a_t * h_{t-1} + b_t`; returns `(h, h_T)`. See the module docstring."""
  impl = resolve_impl(impl)
  state = dtypes.accum(b.dtype)
  if resets is not None:
    a = jnp.where(resets[..., None], jnp.zeros((), a.dtype), a)
  h0 = jnp.zeros((b.shape[0], b.shape[2]), state) if h0 is None else h0.astype(state)
  if impl == "pallas":
    return recurrence_kernel.linear_scan(a, b, h0, output_name=OUTPUT_NAME)
  if impl != "sequential":
    return _parallel_scan(a, b, h0, impl, chunk)
  h = _with_h0(_sequential, a, b, h0)
  return checkpoint_name(h.astype(b.dtype), OUTPUT_NAME), h[:, -1]
