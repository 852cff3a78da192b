"""Compile the training step for a Cloud TPU slice ahead of time, on any machine, and report whether it fits.

  python -m experiments.compile_tpu --config=experiments/configs/1p3b.py --topology=v5p:4x4x4
  python -m experiments.compile_tpu --config=experiments/configs/2p7b.py:transformer --topology=v5e-64 \
      --fsdp --json
  python -m experiments.compile_tpu --config=experiments/configs/13b.py --topology=v5p:4x4x8 --num_slices=2 \
      --fsdp --config.train.grad_accum=4

The program is the one `experiments.train` builds (`mmfree_jax.train.program`) on the slice's devices, as
libtpu describes them; nothing runs and no TPU is needed, only libtpu: `pip install -e .[tpu]`. Report:
per-chip memory (arguments, outputs, temporaries, generated code, total vs the chip's HBM), whether it fits,
FLOPs per step (the compiled program's vs `mmfree_jax.flops`), compile time (`mmfree_jax.train.aot`).

The mesh is the config's (`mesh.data=-1` by default: pure data parallelism); `--fsdp` shards parameters,
gradients and optimizer state over each slice (`mesh.data=<num_slices>, mesh.fsdp=-1, mesh.tensor=1`).
With `--num_slices=N` the data axis spans the slices (`mesh.slices=N`).
`--json` prints one JSON object on stdout (`fits` always present; `error` on failure).
Exit status: 0 when the compilation finished (whether or not it fits), 2 on an error (libtpu missing,
unknown topology, mesh or batch that does not fit the slice).
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice: v5e:2x2, v5p:4x4x4, v6e:8x8, v4:2x2x1, or v5p-128, v5litepod-16.")
flags.DEFINE_integer("num_slices", 1, "Number of slices (multislice: the mesh's data axis spans them).")
flags.DEFINE_bool("fsdp", False, "Shard over each slice: mesh.data=num_slices, mesh.fsdp=-1, mesh.tensor=1.")
flags.DEFINE_bool("json", False, "Print one JSON object on stdout instead of the text report.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from mmfree_jax.train import aot  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  if f.fsdp:
    config = config.unlock()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = f.num_slices, -1, 1
  try:
    report = aot.compile_report(config, f.topology, f.num_slices)
  except (aot.AotError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    if f.json:
      print(json.dumps({"fits": False, "error": str(e), "topology": f.topology, "num_slices": f.num_slices}))
    sys.exit(2)
  print(json.dumps(report) if f.json else aot.format_report(report), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the target is described by libtpu; no local TPU is used
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: several checks may run at once
  app.run(main)
