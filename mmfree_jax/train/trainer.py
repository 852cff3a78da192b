"""The training run, as a script of named stages:

  1. validate    config, data, mesh and batch arithmetic, the workdir's checkpoints: errors before compiling
  2. program     model, optimizer, shardings, jitted steps (mmfree_jax.train.program)
  3. data        this process's slice of the train stream, the held-out batches
  4. state       restore the newest good checkpoint (state + data position), or initialize
  5. loop        step; fetch the previous step's metrics after dispatching the next; log, evaluate, checkpoint
  6. finish      final checkpoint, done.json, an optional sample

A run is a pure function of (config, seed, data): resuming from a checkpoint continues the same run.
"""

import json
import os
import signal
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from mmfree_jax import flops
from mmfree_jax.data import pipeline
from mmfree_jax.model_config import ModelConfig
from mmfree_jax.train import metrics as metrics_lib
from mmfree_jax.train import sharding
from mmfree_jax.train.checkpoint import Checkpointer
from mmfree_jax.train.program import build_program, resolve_batch


class NonFiniteLoss(RuntimeError):
  pass


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Stage 1 checks that need no devices: a one-line ValueError naming the field and the fix."""
  model_cfg = ModelConfig.from_config(config.model)
  t = config.train
  if t.steps < 1:
    raise ValueError(f"train.steps={t.steps} must be positive")
  if t.on_nonfinite not in ("skip", "stop"):
    raise ValueError(f"train.on_nonfinite={t.on_nonfinite!r}: expected skip or stop")
  for name in ("log_every",):
    if t[name] < 1:
      raise ValueError(f"train.{name} must be positive")
  if config.eval.every_steps < 0 or config.checkpoint.every_steps < 0:
    raise ValueError("eval.every_steps and checkpoint.every_steps must be >= 0 (0 = only at the end)")
  pipeline.validate(config.data, model_vocab_size=model_cfg.vocab_size)
  return model_cfg


def _global_batch(local: dict, shard, accum: int | None):
  def put(x):
    x = np.asarray(x)
    if accum is not None:
      x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
    return jax.make_array_from_process_local_data(shard, x)
  return {k: put(v) for k, v in local.items()}


def _is_due(step: int, every: int, last: int) -> bool:
  return step == last or (every > 0 and step % every == 0)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final summary."""
  # 1. validate ---------------------------------------------------------------------------------------------
  model_cfg = validate(config)
  mesh = sharding.make_mesh(config.mesh)
  pc, pi = jax.process_count(), jax.process_index()
  resolve_batch(config, mesh, pc)
  config_dict = json.loads(config.to_json_best_effort())
  ckpt = Checkpointer(workdir, config.checkpoint)
  ckpt.check_compatible(config_dict)
  lead = pi == 0

  # 2. program ----------------------------------------------------------------------------------------------
  program = build_program(config, mesh)
  total, gb, accum = int(config.train.steps), int(config.train.global_batch), int(config.train.grad_accum)
  seq_len = int(config.data.seq_len)
  tokens_per_step = gb * seq_len
  flops_per_token = flops.flops_per_token(config.model, seq_len)["train"]
  counts = flops.param_counts(config.model)

  # 3. data -------------------------------------------------------------------------------------------------
  train_iter = pipeline.make_train_iterator(config.data, global_batch=gb, seq_len=seq_len,
                                            seed=int(config.train.seed), process_index=pi, process_count=pc)
  eval_batches = []
  if config.eval.batches > 0:
    eval_batches = [_global_batch(b, program.eval_batch_sharding, None) for b in pipeline.make_eval_batches(
        config.data, global_batch=gb // accum, seq_len=seq_len, num_batches=int(config.eval.batches),
        process_index=pi, process_count=pc)]

  # 4. state ------------------------------------------------------------------------------------------------
  restored = ckpt.restore_latest(program.abstract_state, train_iter)
  if restored is None:
    start, state = 0, program.init_state()
    if lead:
      print(f"{model_cfg.arch}: {counts['params']:,} parameters; training {total} steps of "
            f"{tokens_per_step:,} tokens on {jax.device_count()} devices, mesh {dict(mesh.shape)}", flush=True)
  else:
    start, state = restored
    if lead:
      print(f"resumed from the checkpoint at step {start} in {ckpt.directory}", flush=True)
      metrics_lib.truncate_after(workdir, start)
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2)
  writer = metrics_lib.MetricWriter(workdir, enabled=lead)
  progress = metrics_lib.Progress(total, enabled=lead)
  peak = metrics_lib.peak_flops_per_device()

  def evaluate(params) -> dict:
    loss_sum, weight = 0.0, 0.0
    with program.context:
      for batch in eval_batches:
        l, w = program.eval_step(params, batch)
        loss_sum, weight = loss_sum + float(l), weight + float(w)
    loss = loss_sum / max(weight, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}

  # 5. loop -------------------------------------------------------------------------------------------------
  preemption = _Preemption()
  summary: dict = {}
  pending = None  # (step, device metrics, dispatch time) of the step whose metrics are not yet fetched
  last_time = time.time()
  step = start
  stopped_early = False
  try:
    with program.context:
      while step < total:
        batch = _global_batch(next(train_iter), program.train_batch_sharding, accum)
        state, step_metrics = program.train_step(state, batch)
        step += 1
        if pending is not None:
          last_time = _report(pending, writer, progress, config, tokens_per_step, flops_per_token, peak,
                              last_time, summary)
        pending = (step, step_metrics)
        if _is_due(step, int(config.eval.every_steps), total) or _is_due(step, int(config.checkpoint.every_steps), total) \
            or preemption.requested or ckpt.manager.reached_preemption(step):
          last_time = _report(pending, writer, progress, config, tokens_per_step, flops_per_token, peak,
                              last_time, summary)
          pending = None
          if eval_batches and _is_due(step, int(config.eval.every_steps), total):
            ev = evaluate(state.params)
            summary.update(ev)
            writer.write(step, ev)
            if lead:
              print(f"step {step:>6}/{total}  eval loss {ev['eval_loss']:.4f}  "
                    f"perplexity {ev['eval_perplexity']:.2f}", flush=True)
          if preemption.requested or ckpt.manager.reached_preemption(step):
            ckpt.save(step, state, train_iter, config_dict, force=True)
            ckpt.wait()
            stopped_early = True
            if lead:
              print(f"preempted: saved the checkpoint at step {step}; rerun the same command to resume",
                    flush=True)
            break
          if _is_due(step, int(config.checkpoint.every_steps), total):
            ckpt.save(step, state, train_iter, config_dict, force=True)
      if pending is not None:
        _report(pending, writer, progress, config, tokens_per_step, flops_per_token, peak, last_time, summary)
  except NonFiniteLoss as e:
    ckpt.wait()
    good = ckpt.steps()
    raise NonFiniteLoss(f"{e}; stopped (train.on_nonfinite=stop); the last good checkpoint is at step "
                        f"{good[-1] if good else 'none'}") from None
  finally:
    preemption.restore()
    writer.close()
    ckpt.close()

  # 6. finish -----------------------------------------------------------------------------------------------
  summary.update(step=step, tokens=step * tokens_per_step, flops=step * tokens_per_step * flops_per_token,
                 params=counts["params"], preempted=stopped_early)
  if lead and not stopped_early:
    with open(os.path.join(workdir, "done.json"), "w") as f:
      json.dump({k: summary.get(k) for k in ("step", "eval_loss", "tokens", "flops", "params", "loss")}, f)
  if not stopped_early and config.train.sample_tokens > 0 and lead:
    _print_sample(config, program, state.params)
  return summary


def _report(pending, writer, progress, config, tokens_per_step, flops_per_token, peak, last_time, summary):
  """Fetch one step's metrics (already computed or in flight), check finiteness, log. Returns the time."""
  step, device_metrics = pending
  m = {k: v.item() for k, v in jax.device_get(device_metrics).items()}
  now = time.time()
  dt = max(now - last_time, 1e-9)
  if not m.pop("finite"):
    msg = f"non-finite loss or gradient at step {step} (loss={m['loss']}, grad_norm={m['grad_norm']})"
    if config.train.on_nonfinite == "stop":
      raise NonFiniteLoss(msg)
    logging.warning("%s; the update was skipped", msg)
    print(f"WARNING: {msg}; the update was skipped (train.on_nonfinite=skip)", flush=True)
  summary["loss"] = m["loss"]
  if step % int(config.train.log_every) == 0 or step == int(config.train.steps):
    tok_s = tokens_per_step / dt
    row = dict(m, tokens_per_s=tok_s, step_time=dt, tokens=step * tokens_per_step,
               flops=step * tokens_per_step * flops_per_token)
    if peak:
      row["mfu"] = flops_per_token * tok_s / (peak * jax.device_count())
    writer.write(step, row)
    progress.log(step, m["loss"], tok_s, dt)
  return now


def _print_sample(config, program, params) -> None:
  try:
    from mmfree_jax.inference import sample_text  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  text = sample_text(config, program.model, params, config.train.sample_prompt, int(config.train.sample_tokens),
                     temperature=float(config.train.get("sample_temperature", 0.0)), seed=int(config.train.seed))
  print(f"sample: {config.train.sample_prompt!r} -> {text!r}", flush=True)

