"""Train a model: `python -m experiments.train --config=experiments/configs/tiny.py --workdir=DIR [--config.x=y]`.

Starting in a workdir that holds a checkpoint resumes the run. Multi-host: `jax.distributed.initialize()` runs
when several processes are detected (Cloud TPU, SLURM) or when --coordinator_address/--num_processes/
--process_id are given.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process without a cluster).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize` for explicit flags or a detected cluster; nothing for one process."""
  import jax  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if f.coordinator_address:
    jax.distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ and \
      "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  maybe_initialize_distributed()
  from mmfree_jax.train.trainer import NonFiniteLoss, train  # pylint: disable=g-import-not-at-top
  try:
    train(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ValueError, NonFiniteLoss) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ValueError) else 3)


if __name__ == "__main__":
  app.run(main)
