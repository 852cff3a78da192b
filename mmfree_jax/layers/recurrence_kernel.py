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

`gated_linear_scan`: the MLGRU's input gates computed in the same two kernels (`mlgru_gates.input_gates`:
a = lb + (1 - lb) sigmoid(f_raw), b = silu(i_raw) (1 - a), each rounded to the input dtype as `input_gates`
returns them, a zeroed at resets). The forward reads the raw projections instead of a and b; the backward reads
them again with h and its cotangent and writes the raw projections' cotangents (and lb's, summed per program):
a, b and their cotangents are never written (8 passes over [B, T, D] fewer per layer than the gates in XLA's
fusions, which also wrote float32 temporaries; benchmarks/README.md, log item 44).

Off GPUs the kernels run in Pallas' interpret mode (tests). Under a mesh (`jax.set_mesh` with the models' logical
axis rules) the call is wrapped in `shard_map` over the activations' batch and channel axes: each device runs the
kernels on its own rows and channels, and a time axis sharded by the rules is gathered first.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mmfree_jax.layers import pallas_util

BLOCK_D = 64  # channels per program (the largest power of two <= this dividing D)
UNROLL = 32  # time steps per loop iteration (the largest power of two <= this dividing T)
NUM_WARPS = 1
PREFETCH = True  # load the next block of time steps while computing the current one
SEQ_AXES = ("act_batch", None, "act_heads")  # the time axis whole on each device
STATE_AXES = ("act_batch", "act_heads")


def _walk(n_blocks, load, step, init):
  """`step(carry, block, rows)` over blocks 0 .. n_blocks - 1 of `load(block)`; with PREFETCH the next block's rows
  are loaded (in the input dtype) before the current block is computed, so their latency overlaps its work."""
  if not PREFETCH:
    return lax.fori_loop(0, n_blocks, lambda c, carry: step(carry, c, load(c)), init)

  def body(c, carry):
    carry, rows = carry
    nxt = load(jnp.minimum(c + 1, n_blocks - 1))
    return step(carry, c, rows), nxt

  return lax.fori_loop(0, n_blocks, body, (init, load(0)))[0]


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


def _sigmoid(v):
  return 1.0 / (1.0 + jnp.exp(-v))  # as XLA expands `jax.nn.sigmoid`


def _gates(fr, ir, lb, state, dtype):
  """(sigmoid(f_raw), sigmoid(i_raw), f, a, b) of one time step in the state dtype: f = lb + (1 - lb) s_f, and
  a = f and b = silu(i_raw) (1 - f) rounded to the input dtype, as `mlgru_gates.input_gates` returns them."""
  fr, ir = fr.astype(state), ir.astype(state)
  sf, si = _sigmoid(fr), _sigmoid(ir)
  f = lb + (1.0 - lb) * sf
  b = (ir * si * (1.0 - f)).astype(dtype).astype(state)
  return sf, si, f, f.astype(dtype).astype(state), b


def _gated_forward_kernel(fr_ref, ir_ref, keep_ref, lb_ref, h0_ref, o_ref, last_ref, *, unroll):
  state = h0_ref.dtype
  lb = lb_ref[...].astype(state)

  def load(c):
    t0 = c * unroll
    return ([fr_ref[t0 + u] for u in range(unroll)], [ir_ref[t0 + u] for u in range(unroll)],
            [keep_ref[t0 + u] for u in range(unroll)])

  def step(h, c, rows):
    fr, ir, keep = rows
    for u in range(unroll):
      _, _, _, a, b = _gates(fr[u], ir[u], lb, state, fr_ref.dtype)
      h = a * keep[u].astype(state) * h + b
      o_ref[c * unroll + u] = h.astype(o_ref.dtype)
    return h

  last_ref[...] = _walk(fr_ref.shape[0] // unroll, load, step, h0_ref[...])


def _gated_backward_kernel(fr_ref, ir_ref, keep_ref, lb_ref, o_ref, g_ref, h0_ref, glast_ref,
                           dfr_ref, dir_ref, dlb_ref, dh0_ref, *, unroll):
  """The recurrence's backward (`_backward_kernel`: da, db rounded to the input dtype as it writes them, da zeroed
  at resets as `jnp.where`'s VJP does), then `mlgru_gates._input_gates_bwd` on them, per time step."""
  state, dtype = h0_ref.dtype, fr_ref.dtype
  n_blocks = fr_ref.shape[0] // unroll
  h0, lb = h0_ref[...], lb_ref[...].astype(state)

  def load(c):  # block c counts from the end
    t0 = (n_blocks - 1 - c) * unroll
    h_prev = [o_ref[jnp.maximum(t0 - 1, 0)]] + [o_ref[t0 + u - 1] for u in range(1, unroll)]
    return ([fr_ref[t0 + u] for u in range(unroll)], [ir_ref[t0 + u] for u in range(unroll)],
            [keep_ref[t0 + u] for u in range(unroll)], [g_ref[t0 + u] for u in range(unroll)], h_prev)

  def step(carry, c, rows):
    lam, a_next, dlb = carry
    fr, ir, keep, g, h_prev = rows
    t0 = (n_blocks - 1 - c) * unroll
    for u in reversed(range(unroll)):
      lam = g[u].astype(state) + a_next * lam
      hp = jnp.where(t0 == 0, h0, h_prev[0].astype(state)) if u == 0 else h_prev[u].astype(state)
      k = keep[u].astype(state)
      sf, si, f, a, _ = _gates(fr[u], ir[u], lb, state, dtype)
      df = (lam * hp).astype(dtype).astype(state) * k
      di = lam.astype(dtype).astype(state)
      irs = ir[u].astype(state)
      df = df - di * (irs * si)  # i = silu(i_raw) * (1 - f)
      dfr_ref[t0 + u] = (df * (1.0 - lb) * sf * (1.0 - sf)).astype(dfr_ref.dtype)
      dir_ref[t0 + u] = (di * (1.0 - f) * si * (1.0 + irs * (1.0 - si))).astype(dir_ref.dtype)
      dlb = dlb + df * (1.0 - sf)
      a_next = a * k
    return lam, a_next, dlb

  lam, a_first, dlb = _walk(n_blocks, load, step, (glast_ref[...], jnp.ones_like(h0), jnp.zeros_like(h0)))
  dh0_ref[...] = a_first * lam
  dlb_ref[...] = dlb


def _call(kernel, inputs, outputs, t_len: int, d: int, kinds=None):
  """`kernel` over the grid (batch rows, channel blocks). `inputs` / `outputs` (ShapeDtypeStructs) are [B, T, D]
  or [B, D] (the state), or as `kinds` (one letter per input then output) says: "s" [B, T, D], "v" [B, D],
  "t" [B, T] (a scalar per row and step), "c" [D] (per channel)."""
  bd = pallas_util.pow2_divisor(d, BLOCK_D)
  specs = {"s": pl.BlockSpec((None, t_len, bd), lambda i, j: (i, 0, j)),
           "v": pl.BlockSpec((None, bd), lambda i, j: (i, j)),
           "t": pl.BlockSpec((None, t_len), lambda i, j: (i, 0)),
           "c": pl.BlockSpec((bd,), lambda i, j: (j,))}
  kinds = kinds or "".join("s" if x.ndim == 3 else "v" for x in (*inputs, *outputs))
  in_specs, out_specs = [specs[k] for k in kinds[:len(inputs)]], [specs[k] for k in kinds[len(inputs):]]
  return pl.pallas_call(
      functools.partial(kernel, unroll=pallas_util.pow2_divisor(t_len, UNROLL)),
      name="recurrence" + kernel.__name__.removesuffix("_kernel"),  # recurrence_forward / _backward in profiles
      out_shape=outputs,
      grid=(inputs[0].shape[0], d // bd),
      in_specs=in_specs,
      out_specs=out_specs,
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


def _gated_forward(fr, ir, keep, lb, h0):
  _, t_len, d = fr.shape
  shapes = (jax.ShapeDtypeStruct(fr.shape, fr.dtype), jax.ShapeDtypeStruct(h0.shape, h0.dtype))
  return tuple(_call(_gated_forward_kernel, (fr, ir, keep, lb, h0), shapes, t_len, d, kinds="sstcv" + "sv"))


def _gated_backward(fr, ir, keep, lb, out, h0, d_out, d_last):
  bsz, t_len, d = fr.shape
  shapes = (jax.ShapeDtypeStruct(fr.shape, fr.dtype), jax.ShapeDtypeStruct(ir.shape, ir.dtype),
            jax.ShapeDtypeStruct(h0.shape, h0.dtype), jax.ShapeDtypeStruct(h0.shape, h0.dtype))
  d_fr, d_ir, d_lb, dh0 = _call(_gated_backward_kernel,
                                (fr, ir, keep, lb, out, d_out.astype(out.dtype), h0, d_last.astype(h0.dtype)),
                                shapes, t_len, d, kinds="sstcssvv" + "ssvv")
  return d_fr, d_ir, jnp.zeros_like(keep), jnp.sum(d_lb, axis=0).astype(lb.dtype), dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gated_scan(fr, ir, keep, lb, h0, output_name):
  del output_name
  return _gated_forward(fr, ir, keep, lb, h0)


def _gated_scan_fwd(fr, ir, keep, lb, h0, output_name):
  out, last = _gated_forward(fr, ir, keep, lb, h0)
  if output_name is not None:
    out = checkpoint_name(out, output_name)
  return (out, last), (fr, ir, keep, lb, out, h0)


def _gated_scan_bwd(output_name, res, cts):
  del output_name
  fr, ir, keep, lb, out, h0 = res
  return _gated_backward(fr, ir, keep, lb, out, h0, *cts)


_gated_scan.defvjp(_gated_scan_fwd, _gated_scan_bwd)


def gated_linear_scan(f_raw, i_raw, lb, h0, keep, output_name: str | None = None):
  """`(h [B, T, D] in f_raw's dtype, h_T [B, D] in h0's dtype)` of the recurrence on the MLGRU's input gates of
  the raw projections `f_raw, i_raw [B, T, D]` and the lower bound `lb [D]` (see the module docstring);
  `keep [B, T]` (h0's dtype) is 0 where a document starts (the state is zeroed before that token), else 1."""
  if f_raw.shape != i_raw.shape or f_raw.ndim != 3 or h0.shape != (f_raw.shape[0], f_raw.shape[2]) \
      or keep.shape != f_raw.shape[:2] or lb.shape != f_raw.shape[2:]:
    raise ValueError(f"gated recurrence kernel: expected f_raw, i_raw [B, T, D], lb [D], h0 [B, D], keep [B, T]; "
                     f"got {f_raw.shape}, {i_raw.shape}, {lb.shape}, {h0.shape}, {keep.shape}")
  fn = lambda fr, ir, k, lb_, h0_: _gated_scan(fr, ir, k, lb_, h0_, output_name)
  return pallas_util.per_device(fn, (SEQ_AXES, SEQ_AXES, SEQ_AXES[:2], SEQ_AXES[2:], STATE_AXES),
                                (SEQ_AXES, STATE_AXES))(f_raw, i_raw, keep, lb, h0)


def linear_scan(a, b, h0, output_name: str | None = None):
  """`(h [B, T, D] in b's dtype, h_T [B, D] in h0's dtype)` of `h_t = a_t h_{t-1} + b_t` (resets already folded
  into `a`); `h0 [B, D]` in the state dtype. `output_name`: `checkpoint_name` of `h` for remat policies."""
  if a.shape != b.shape or a.ndim != 3 or h0.shape != (b.shape[0], b.shape[2]):
    raise ValueError(f"recurrence kernel: expected a, b [B, T, D] and h0 [B, D]; got {a.shape}, {b.shape}, "
                     f"{h0.shape}")
  fn = lambda a_, b_, h0_: _scan(a_, b_, h0_, output_name)
  return pallas_util.per_device(fn, (SEQ_AXES, SEQ_AXES, STATE_AXES), (SEQ_AXES, STATE_AXES))(a, b, h0)
