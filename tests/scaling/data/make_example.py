"""Writes the SYNTHETIC example sweep in this directory (results.jsonl, runs/<name>/metrics.jsonl).

No model was trained for these numbers. The points are those of `experiments/configs/scaling.py` (names,
parameters, tokens, FLOPs from `mmfree_jax.flops`); the losses follow an invented law per family,
`L(N, D) = E + A / N^alpha + B / D^beta` (N non-embedding parameters, D tokens seen), with noise, chosen so
that the MatMul-free LM starts worse and improves faster. They exist to exercise the notebook and the fits.

  python tests/scaling/data/make_example.py
"""

import json
import pathlib

import numpy as np

from experiments.configs import scaling
from mmfree_jax import flops
from mmfree_jax.scaling import sweep

HERE = pathlib.Path(__file__).resolve().parent
LAWS = {"transformer": dict(E=0.9, A=30.0, alpha=0.28, B=45.0, beta=0.28),
        "mmfree": dict(E=0.75, A=150.0, alpha=0.34, B=45.0, beta=0.28)}
N_LOG = 40  # metrics lines per run


def law(family: str, n: float, d: float) -> float:
  p = LAWS[family]
  return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def main() -> None:
  rng = np.random.default_rng(0)
  (HERE / "results.jsonl").unlink(missing_ok=True)
  for point in scaling.sweep():
    cfg = scaling.get_config(point["name"])
    per_token = flops.flops_per_token(cfg.model, cfg.data.seq_len)["train"]
    step_tokens = cfg.train.global_batch * cfg.data.seq_len
    n = point["non_embedding_params"]
    workdir = HERE / "runs" / point["name"]
    workdir.mkdir(parents=True, exist_ok=True)
    lines = []
    steps = sorted(set(np.unique(np.geomspace(1, cfg.train.steps, N_LOG).astype(int)).tolist()
                       + list(range(cfg.eval.every_steps, cfg.train.steps + 1, cfg.eval.every_steps))))
    for step in steps:
      tokens = step * step_tokens
      clean = law(point["family"], n, tokens)
      row = dict(step=step, loss=round(clean * (1 + 0.02 * rng.standard_normal()), 4), tokens=tokens,
                 flops=per_token * tokens)
      if step % cfg.eval.every_steps == 0:
        row["eval_loss"] = round(clean * (1 + 0.004 * rng.standard_normal()) + 0.02, 4)
      lines.append(row)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    done = dict(step=cfg.train.steps, eval_loss=lines[-1]["eval_loss"], tokens=lines[-1]["tokens"],
                flops=lines[-1]["flops"], params=point["params"], synthetic=True)
    (workdir / "done.json").write_text(json.dumps(done))
    record = sweep.result_record(point, done, f"runs/{point['name']}")
    with (HERE / "results.jsonl").open("a") as f:
      f.write(json.dumps(dict(record, synthetic=True)) + "\n")


if __name__ == "__main__":
  main()
