"""Zero-shot multiple-choice evaluation: `python -m experiments.evaluate --workdir=DIR --task=FILE.jsonl`.

FILE.jsonl holds records with the Hugging Face datasets' field names of ARC, HellaSwag, PIQA, WinoGrande or
OpenBookQA (--format, guessed from the file name otherwise) or the generic {context, choices, label}. Prints a
table and writes the results as JSON (--out, default DIR/eval_<task>.json). Repeat --task for several files.
"""

import json
import os

from absl import app
from absl import flags

flags.DEFINE_string("workdir", None, "Training workdir or packed export directory.")
flags.DEFINE_multi_string("task", None, "Task JSONL file(s).")
flags.DEFINE_string("format", None, "arc|hellaswag|piqa|winogrande|openbookqa|generic (default: from the name).")
flags.DEFINE_integer("limit", None, "Evaluate only the first N examples.")
flags.DEFINE_integer("batch_size", 8, "Sequences per compiled call.")
flags.DEFINE_integer("max_len", 2048, "Longest scored sequence (longer ones lose their start).")
flags.DEFINE_string("out", None, "Results JSON path.")
flags.mark_flags_as_required(["workdir", "task"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmfree_jax.inference import evaluate as ev  # pylint: disable=g-import-not-at-top
  from mmfree_jax.inference import load  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  loaded = load(f.workdir)
  tok = loaded.tokenizer
  scorer = ev.Scorer(loaded.model_cfg, loaded.params, batch_size=f.batch_size, max_len=f.max_len,
                     pad_id=tok.pad_id)
  rows = []
  for path in f.task:
    fmt = f.format or ev.guess_format(path)
    res = ev.evaluate(scorer, tok, ev.load_task(path, fmt, f.limit))
    rows.append(dict(task=os.path.splitext(os.path.basename(path))[0], format=fmt, file=os.path.abspath(path),
                     workdir=os.path.abspath(f.workdir), step=loaded.step, **res))
  print(ev.table(rows), flush=True)
  out = f.out or os.path.join(f.workdir, f"eval_{'_'.join(r['task'] for r in rows)}.json")
  with open(out, "w") as fh:
    json.dump(rows if len(rows) > 1 else rows[0], fh, indent=2)
  print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  app.run(main)
