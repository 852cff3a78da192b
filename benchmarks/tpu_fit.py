"""The smallest TPU slice on which each preset compiles and fits, by ahead-of-time compilation.

  python -m benchmarks.tpu_fit                 # the paper's presets on v5e, v5p and v6e
  python -m benchmarks.tpu_fit --large         # the 13b and 70b presets on v5p and v6e, then two slices
  python -m benchmarks.tpu_fit --loss_chunk    # the presets again with the LM-head loss in chunks of 256
  python -m benchmarks.tpu_fit --table         # print docs/tpu.md's tables from the results
  python -m benchmarks.tpu_fit --table --write docs/tpu.md   # or put them into docs/tpu.md

Every compilation is one `python -m experiments.compile_tpu ... --fsdp --json` run (the same command a user
types; it is recorded with its answer in benchmarks/results/tpu_fit.jsonl, and a command already there is not
run again). Presets: sequence length 2048, global batch 256 (0.5M tokens), no gradient accumulation, full
remat (`--config.model.remat=full`, stated in every command: the memory-lean policy; 370m and 1p3b default to
save_proj, the faster policy on an H100 with room to spare), FSDP over the slice (`--fsdp`: mesh.data=1,
mesh.fsdp=-1).

Search per (preset, generation): chip counts 4, 8, 16, ... (the usual power-of-two tori); the first
candidate is the smallest whose HBM holds the parameters and both Adam moments (12 bytes per parameter,
the arguments no layout avoids), then doubling until the compiler says it fits. Large presets: the same
search with gradient accumulation such that each chip holds one row of a micro-batch, then the same
slice doubled as two slices (multislice, data axis over the data-center network). `--loss_chunk`: the
presets' search again with `--config.model.loss_chunk=256` (no whole-row logits; the table's last column).
"""

import argparse
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time

from mmfree_jax import flops
from launch.tpu import last_json
from mmfree_jax.train import aot

RESULTS = pathlib.Path(__file__).parent / "results" / "tpu_fit.jsonl"
PRESETS = ("370m", "1p3b", "2p7b")
LARGE = ("13b", "70b")
ARCHS = ("", "transformer")
GENERATIONS = ("v5e", "v5p", "v6e")
LARGE_GENERATIONS = ("v5p", "v6e")
MAX_CHIPS = 256  # one slice of v5e / v6e; the presets' 256 rows also cap data parallelism here
TIMEOUT_S = 900
REMAT = "full"
LOSS_CHUNK = 256  # the second search: LM head + loss over 256 positions at a time (models/head_loss.py)
TRAIN_STEP = pathlib.Path(__file__).parent / "results" / "train_step.jsonl"


def config_arg(preset: str, arch: str) -> str:
  return f"experiments/configs/{preset}.py" + (f":{arch}" if arch else "")


def command(preset: str, arch: str, topology: str, num_slices: int = 1, grad_accum: int = 1,
            loss_chunk: int = 0) -> list[str]:
  cmd = [sys.executable, "-m", "experiments.compile_tpu", f"--config={config_arg(preset, arch)}",
         f"--topology={topology}", "--fsdp", "--json", f"--config.model.remat={REMAT}"]
  if num_slices > 1:
    cmd.append(f"--num_slices={num_slices}")
  if grad_accum > 1:
    cmd.append(f"--config.train.grad_accum={grad_accum}")
  if loss_chunk:
    cmd.append(f"--config.model.loss_chunk={loss_chunk}")
  return cmd


def display(cmd: list[str]) -> str:
  return shlex.join(["python"] + cmd[1:])


def load() -> dict[str, dict]:
  out = {}
  if RESULTS.exists():
    for line in RESULTS.read_text().splitlines():
      try:
        rec = json.loads(line)
      except ValueError:
        continue
      if rec.get("arch") == "hgrn_bit":  # the compile report's name of the family
        rec["arch"] = "mmfree"
      rec.setdefault("loss_chunk", 0)
      out[rec["command"]] = rec
  return out


def run(cmd: list[str], done: dict[str, dict], **meta) -> dict:
  key = display(cmd)
  if key in done:
    return done[key]
  t = time.time()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    answer = aot_answer(proc.stdout)
    if proc.returncode < 0 and "memory" not in answer:  # killed by a signal: libtpu itself crashed
      answer = {"fits": None, "crashed": True, "error": f"the TPU compiler crashed (signal {-proc.returncode})"}
  except subprocess.TimeoutExpired:
    answer = {"fits": None, "error": f"compilation took over {TIMEOUT_S} s"}
  rec = {"command": key, "wall_s": round(time.time() - t, 1), "commit": _commit(), **answer, **meta}
  if answer.get("error") and "memory" not in answer and not answer.get("crashed"):
    print(f"{key}: error: {answer['error']}", flush=True)
    return rec  # not recorded: a failure to compile is not an answer about the fit (a crash is recorded)
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  with RESULTS.open("a") as f:
    f.write(json.dumps(rec) + "\n")
  done[key] = rec
  print(f"{key}: fits={rec.get('fits')} ({rec['wall_s']} s)", flush=True)
  return rec


def _commit() -> str:
  """The checkout's commit (with "+" when it has uncommitted changes), so a record names the code it compiled."""
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def aot_answer(stdout: str) -> dict:
  return last_json(stdout) or {"fits": None, "error": "no JSON answer"}


def topology(gen: str, chips: int) -> str:
  chip = aot.CHIPS[gen]
  return aot.Topology(chip, aot.default_shape(chip, chips)).name


def first_candidate(params: int, gen: str, min_chips: int = 4) -> int:
  need = 12 * params / aot.CHIPS[gen].hbm_bytes
  return max(min_chips, 2 ** math.ceil(math.log2(max(need, 1))))


def search(preset: str, arch: str, gen: str, done: dict, accum_rows: int | None = None,
           loss_chunk: int = 0) -> dict | None:
  """The first fitting record over doubling chip counts (None if none up to MAX_CHIPS)."""
  cfg = _config(preset, arch)
  chips = first_candidate(flops.param_counts(cfg.model)["params"], gen)
  while chips <= MAX_CHIPS:
    accum = 1 if accum_rows is None else max(1, cfg.train.global_batch // (chips * accum_rows))
    rec = run(command(preset, arch, topology(gen, chips), grad_accum=accum, loss_chunk=loss_chunk), done,
              preset=preset, arch=arch or "mmfree", generation=gen, slice_chips=chips, num_slices=1,
              loss_chunk=loss_chunk)
    if rec.get("fits"):
      return rec
    if "memory" not in rec and not rec.get("crashed"):  # a crash says nothing of larger slices: go on
      return None
    chips *= 2
  return None


def _config(preset: str, arch: str):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"experiments.configs.{preset}").get_config(arch or None)


GiB = 1024 ** 3
COMPUTE = 1e23


def measured_mfu(path: pathlib.Path = TRAIN_STEP) -> tuple[float, str]:
  """The best MFU (model FLOPs, ours) measured for the MatMul-free LM at its largest measured size.

  Returns (mfu, where it was measured). The projection assumes a TPU reaches the MFU measured on an H100.
  """
  best = None
  for line in path.read_text().splitlines() if path.exists() else []:
    r = json.loads(line)
    if r.get("arch") != "hgrn_bit" or "mfu_exact" not in r:
      continue
    if best is None or (r.get("params", 0), r["mfu_exact"]) > (best.get("params", 0), best["mfu_exact"]):
      best = r
  if best is None:
    raise SystemExit(f"no MatMul-free training-step measurement in {path}: run benchmarks.train_step first")
  where = (f"MatMul-free {best['params'] / 1e9:.2f}B, batch {best['batch']} x {best['seq_len']}, remat "
           f"{best['remat']}, {best.get('device', 'GPU')}, {best['tokens_per_s'] / 1e3:.1f}k tokens/s")
  return best["mfu_exact"], where


def _best(records: list[dict], **match) -> tuple[dict | None, list[dict]]:
  """(the fitting record with the fewest chips, all matching records)."""
  rows = [r for r in records if all(r.get(k) == v for k, v in match.items())]
  fits = [r for r in rows if r.get("fits")]
  return (min(fits, key=lambda r: r["chips"]) if fits else None), rows


def _mem(r: dict) -> str:
  m = r.get("memory", {})
  return f"{m['total'] / GiB:.1f} / {m['hbm'] / GiB:.0f}" if "total" in m else "-"


def _crashes(rows: list[dict], below: float = math.inf) -> str:
  chips = sorted({r["slice_chips"] * r["num_slices"] for r in rows if r.get("crashed")
                  and r["slice_chips"] * r["num_slices"] < below})
  return f" (compiler crash at {', '.join(map(str, chips))} chips)" if chips else ""


def _tried(rows: list[dict]) -> str:
  sizes = sorted({r["chips"] for r in rows if r.get("fits") is False})
  return (f"no fit up to {max(sizes)} chips" if sizes else "not measured") + _crashes(rows)


def _chunked(records: list[dict], chunk: int, **match) -> str:
  """The table cell of the smallest fit with `model.loss_chunk=chunk`."""
  best, rows = _best(records, loss_chunk=chunk, **match)
  return _tried(rows) if best is None else f"{best['chips']} chips, {_mem(best)}" + _crashes(rows, best["chips"])


def render(records: list[dict], mfu: float) -> str:
  """docs/tpu.md's tables (markdown) from the results."""
  out = ["| preset | family | TPU | smallest slice | mesh | remat | memory per chip GiB (used / HBM) | "
         "compiled FLOPs/step | ours | compiled/ours | compile s | "
         f"with loss_chunk={LOSS_CHUNK}: smallest, GiB |", "|" + "---|" * 12]
  for preset in PRESETS:
    for arch in ("mmfree", "transformer"):
      for gen in GENERATIONS:
        match = dict(preset=preset, arch=arch, generation=gen, num_slices=1)
        best, rows = _best(records, loss_chunk=0, **match)
        chunked = _chunked(records, LOSS_CHUNK, **match)
        if best is None:
          out.append(f"| {preset} | {arch} | {gen} | {_tried(rows)} | | | | | | | | {chunked} |")
          continue
        f, mesh = best["flops"], best["mesh"]
        out.append(f"| {preset} | {arch} | {gen} | {best['topology']} ({best['accelerator_type']}, "
                   f"{best['chips']} chips) | fsdp={mesh['fsdp']} | {best['remat']} | {_mem(best)} | "
                   f"{f['compiled_per_step']:.3e} | {f['ours_per_step']:.3e} | {f['compiled_over_ours']:.2f} | "
                   f"{best['compile_s']:.0f} | {chunked} |")
  out += ["", "| preset | TPU | configuration | chips | grad_accum | memory per chip GiB | fits | "
          f"days to 1e23 FLOPs at {mfu:.1%} MFU | chip-hours |", "|" + "---|" * 9]
  for preset in LARGE:
    for gen in LARGE_GENERATIONS:
      for slices in (1, 2):
        best, rows = _best(records, preset=preset, generation=gen, num_slices=slices, loss_chunk=0)
        if best is None:
          out.append(f"| {preset} | {gen} | {slices} slice(s): {_tried(rows)} | | | | | | |")
          continue
        peak = aot.CHIPS[gen].peak_flops
        days = COMPUTE / (best["chips"] * peak * mfu) / 86400
        hours = COMPUTE / (peak * mfu) / 3600
        out.append(f"| {preset} | {gen} | {best['num_slices']} x {best['topology']} ({best['accelerator_type']}) | "
                   f"{best['chips']} | {best['grad_accum']} | {_mem(best)} | yes | {days:,.0f} | {hours:,.0f} |")
  out += ["", f"| TPU | peak bf16 FLOP/s per chip | chip-hours for 1e23 FLOPs at {mfu:.1%} MFU | days on 256 chips | "
          "days on 1024 chips |", "|" + "---|" * 5]
  for gen in GENERATIONS:
    peak = aot.CHIPS[gen].peak_flops
    hours = COMPUTE / (peak * mfu) / 3600
    out.append(f"| {gen} | {peak / 1e12:.0f}e12 | {hours:,.0f} | {hours / 24 / 256:.1f} | {hours / 24 / 1024:.1f} |")
  return "\n".join(out)


BEGIN, END = "<!-- tpu_fit:begin (python -m benchmarks.tpu_fit --table --write docs/tpu.md) -->", "<!-- tpu_fit:end -->"


def write_block(path: pathlib.Path, table: str) -> None:
  """Replaces the text between the BEGIN and END markers of `path` with `table`."""
  text = path.read_text()
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--large", action="store_true", help="the 13b and 70b presets instead")
  p.add_argument("--table", action="store_true", help="print the markdown tables from the results")
  p.add_argument("--write", default="", help="with --table: replace the generated block of this markdown file")
  p.add_argument("--generations", default=",".join(GENERATIONS), help="comma-separated, in search order")
  p.add_argument("--only", default="", help="comma-separated presets to search (default: all)")
  p.add_argument("--loss_chunk", action="store_true",
                 help=f"search with --config.model.loss_chunk={LOSS_CHUNK} (the last column of the table)")
  args = p.parse_args()
  if args.table:
    mfu, where = measured_mfu()
    table = render(list(load().values()), mfu) + f"\n\nMFU {mfu:.1%}: the best measured ({where})."
    if args.write:
      write_block(pathlib.Path(args.write), table)
    else:
      print(table)
    return
  done = load()
  only = [s for s in args.only.split(",") if s]
  if not args.large:
    for gen in args.generations.split(","):
      for preset in only or PRESETS:
        for arch in ARCHS:
          search(preset, arch, gen, done, loss_chunk=LOSS_CHUNK if args.loss_chunk else 0)
    return
  for preset in only or LARGE:
    for gen in LARGE_GENERATIONS:
      rec = search(preset, "", gen, done, accum_rows=1)
      if rec is None:
        continue
      chips = rec["slice_chips"]
      cfg = _config(preset, "")
      accum = max(1, cfg.train.global_batch // (2 * chips))
      run(command(preset, "", topology(gen, chips), num_slices=2, grad_accum=accum), done, preset=preset,
          arch="mmfree", generation=gen, slice_chips=chips, num_slices=2)


if __name__ == "__main__":
  main()
