"""Fits scaling laws to a sweep's results and finds where the two families cross.

  python -m experiments.fit_scaling DIR/results.jsonl --out OUT [--n_boot=300] [--compute_key=flops]

Per family, `L(C) = E + A * C^(-alpha)` and `L(C) = a - b * log10(C)` with bootstrap intervals
(`mmfree_jax.scaling.fit`). Writes OUT/fit.json (parameters, intervals, crossing compute and its interval, or
the statement that the fits do not cross in the search range) and OUT/scaling.png.
"""

import json
import pathlib

from absl import app
from absl import flags

from mmfree_jax.scaling import fit
from mmfree_jax.scaling import sweep

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("n_boot", 300, "Bootstrap resamples.")
flags.DEFINE_float("level", 0.95, "Confidence level of the intervals.")
flags.DEFINE_string("compute_key", "flops", "Results field used as compute (flops, six_nd, ...).")
flags.DEFINE_float("crossing_min", fit.DEFAULT_RANGE[0],
                   "Crossing search range, lower end (FLOPs; 0 = the smallest compute of the data).")
flags.DEFINE_float("crossing_max", fit.DEFAULT_RANGE[1], "Crossing search range, upper end (FLOPs).")
flags.DEFINE_integer("seed", 0, "Bootstrap seed.")


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m experiments.fit_scaling DIR/results.jsonl --out OUT")
  records = sweep.read_results(argv[1])
  result = fit.fit_results(records, compute_key=FLAGS.compute_key, n_boot=FLAGS.n_boot, level=FLAGS.level,
                           crossing_range=(FLAGS.crossing_min, FLAGS.crossing_max), seed=FLAGS.seed)
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "fit.json").write_text(json.dumps(result, indent=1))
  fit.plot(result, str(out / "scaling.png"))
  for form in fit.FORMS:
    print(f"{form}: {result['forms'][form].get('statement')}")
  print(f"wrote {out / 'fit.json'} and {out / 'scaling.png'}")


if __name__ == "__main__":
  app.run(main)
