"""Runs a scaling sweep: every point of a sweep config, on this machine, on Cloud TPU or through SLURM.

  python -m experiments.sweep --config=experiments/configs/scaling.py --launcher=local --sweep_dir=DIR \
      [--dry_run] [--parallel=N] [--only=REGEX]

Each point trains with `python -m experiments.train --config=<config file>:<name> --workdir=DIR/runs/<name>`;
finished points are skipped, interrupted ones resume, results go to DIR/results.jsonl
(`mmfree_jax.scaling.sweep`). `--launcher=tpu` (`launch.tpu`) and `--launcher=slurm` (`launch.slurm`) take the
flags prefixed `tpu_` and `slurm_`. The environment variable MMFREE_SWEEP_TRAIN_CMD replaces the trainer command.
"""

from absl import app
from absl import flags

from launch import slurm
from launch import tpu
from mmfree_jax.scaling import sweep

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "experiments/configs/scaling.py", "Sweep config file, optionally ':arg' for sweep().")
flags.DEFINE_enum("launcher", "local", ["local", "tpu", "slurm"], "Where the points train.")
flags.DEFINE_string("sweep_dir", None, "Directory of the sweep: runs/<name>, logs/, results.jsonl.", required=True)
flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
flags.DEFINE_integer("parallel", 1, "Local launcher: points trained at the same time.")
flags.DEFINE_string("only", "", "Only the points whose name matches this regular expression.")

flags.DEFINE_string("tpu_name", "mmfree-sweep", "TPU: node (and queued resource) name.")
flags.DEFINE_string("tpu_zone", "us-central2-b", "TPU: zone.")
flags.DEFINE_string("tpu_project", "", "TPU: project ('' = gcloud's default).")
flags.DEFINE_string("tpu_type", "v4-8", "TPU: accelerator type.")
flags.DEFINE_string("tpu_runtime", "tpu-ubuntu2204-base", "TPU: runtime version.")
flags.DEFINE_string("tpu_topology", "", "TPU: topology for the compile check ('' = the accelerator type).")
flags.DEFINE_bool("tpu_queued", True, "TPU: create through queued-resources (else tpu-vm create).")
flags.DEFINE_bool("tpu_spot", False, "TPU: spot capacity.")
flags.DEFINE_bool("tpu_keep", False, "TPU: keep the resources at the end (they are deleted by default).")
flags.DEFINE_string("tpu_remote_sweep_dir", "sweep", "TPU: sweep directory on the workers (or gs://...).")
flags.DEFINE_bool("skip_compile_check", False, "TPU: skip the experiments.compile_tpu pre-flight check.")

flags.DEFINE_integer("slurm_nodes", 1, "SLURM: nodes per point.")
flags.DEFINE_integer("slurm_gpus_per_node", 8, "SLURM: GPUs per node (one process each).")
flags.DEFINE_integer("slurm_cpus_per_task", 8, "SLURM: CPUs per process.")
flags.DEFINE_string("slurm_time", "24:00:00", "SLURM: time limit per point.")
flags.DEFINE_string("slurm_partition", "", "SLURM: partition.")
flags.DEFINE_string("slurm_account", "", "SLURM: account.")
flags.DEFINE_string("slurm_setup", "", "SLURM: shell lines run before srun (modules, environment).")
flags.DEFINE_bool("slurm_wait", True, "SLURM: wait for the jobs and collect their results.")

def main(argv: list[str]) -> int:
  del argv
  config_path, points = sweep.load_points(FLAGS.config)
  points = sweep.select(points, FLAGS.only)
  if not points:
    raise app.UsageError(f"no point of {FLAGS.config} matches --only={FLAGS.only!r}")
  common = dict(config_path=config_path, sweep_dir=FLAGS.sweep_dir, dry_run=FLAGS.dry_run)
  if FLAGS.launcher == "local":
    status = sweep.run_local(points, parallel=FLAGS.parallel, **common)
  elif FLAGS.launcher == "tpu":
    options = tpu.TpuOptions(
        name=FLAGS.tpu_name, zone=FLAGS.tpu_zone, project=FLAGS.tpu_project, accelerator_type=FLAGS.tpu_type,
        runtime_version=FLAGS.tpu_runtime, topology=FLAGS.tpu_topology, queued=FLAGS.tpu_queued,
        spot=FLAGS.tpu_spot, keep=FLAGS.tpu_keep, remote_sweep_dir=FLAGS.tpu_remote_sweep_dir,
        skip_compile_check=FLAGS.skip_compile_check)
    status = tpu.run(points, options=options, **common)
  else:
    options = slurm.SlurmOptions(
        nodes=FLAGS.slurm_nodes, gpus_per_node=FLAGS.slurm_gpus_per_node,
        cpus_per_task=FLAGS.slurm_cpus_per_task, time=FLAGS.slurm_time, partition=FLAGS.slurm_partition,
        account=FLAGS.slurm_account, setup=FLAGS.slurm_setup, wait=FLAGS.slurm_wait)
    status = slurm.run(points, options=options, **common)
  print(f"sweep: {sweep.summarize(status)}", flush=True)
  return 1 if "failed" in status.values() else 0

if __name__ == "__main__":
  app.run(main)
