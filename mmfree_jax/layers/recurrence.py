"""The first-order linear recurrence `h_t = a_t * h_{t-1} + b_t` along the time axis, with interchangeable backends.

All backends take `a, b: [B, T, D]`, an optional initial state `h0: [B, D]` (the state before the first token) and
optional `resets: [B, T]` (True where a new document begins: the state is zeroed before that token, i.e. a_t := 0),
carry the state in float32 (float64 under x64 with float64 inputs) and return `(h [B, T, D] in b's dtype,
h_T [B, D] in the state dtype)`.

  sequential   `lax.scan` over time: the obviously-correct reference.
  associative  `lax.associative_scan` with the pair operator (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2).
  chunked      associative scans inside fixed-length chunks (in parallel), a sequential scan across the chunk
               boundaries (T / chunk steps on a [B, D] state), then one fix-up multiply-add.
"""

import jax.numpy as jnp
from jax import lax

from mmfree_jax.layers import dtypes

IMPLS = ("sequential", "associative", "chunked")


def resets_from_segments(segment_ids):
  """True where a token starts a new document within its row (position 0 keeps the incoming state)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def _prepare(a, b, h0, resets):
  state = dtypes.accum(b.dtype)
  a = a.astype(state)
  b = b.astype(state)
  if resets is not None:
    a = jnp.where(resets[..., None], 0, a)
  if h0 is not None:
    b = b.at[:, 0].add(a[:, 0] * h0.astype(state))
  return a, b


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


def linear_scan(a, b, h0=None, resets=None, *, impl: str = "associative", chunk: int = 128):
  """`h_t = a_t * h_{t-1} + b_t`; returns `(h, h_T)`. See the module docstring."""
  if impl not in IMPLS:
    raise ValueError(f"unknown scan impl {impl!r}; expected one of {IMPLS}")
  out_dtype = b.dtype
  a, b = _prepare(a, b, h0, resets)
  if impl == "sequential":
    h = _sequential(a, b)
  elif impl == "associative":
    h = _associative(a, b)
  else:
    h = _chunked(a, b, chunk)
  return h.astype(out_dtype), h[:, -1]
