"""Ahead-of-time compilation of the training step for a Cloud TPU slice, without the hardware.

libtpu describes the devices of a slice (`jax.experimental.topologies.get_topology_desc`); the very program
that `experiments.train` runs (`mmfree_jax.train.program.build_program`: mesh, shardings, model, optimizer,
jitted train step with the state donated) is lowered on abstract inputs and compiled for those devices. The
compiled executable tells the per-chip memory (`memory_analysis()`); the TPU compiler itself refuses a
program that does not fit in HBM, and that refusal is reported as `fits: false` with the compiler's numbers.

FLOPs per step (`report["flops"]`, all for the whole step on all chips):
  `xla_per_step_loops_once`  the executable's `cost_analysis()` x chips; XLA counts each loop body once
                             (the scanned layers, the micro-batch scan), so this is a lower bound.
  `program_matmul_per_step`  matmul FLOPs of the lowered program with every loop repeated its trip count
                             (`mmfree_jax.train.hlo_flops`): remat recomputation and the full attention
                             square included.
  `compiled_per_step`        `xla_per_step_loops_once` plus the matmuls that it missed in the repeated loop
                             bodies; element-wise work inside loops stays counted once (a small term).
  `ours_per_step`            `mmfree_jax.flops.flops_per_token(...)["train"]` x tokens per step: model FLOPs,
                             no recomputation, causal half of attention.

Topologies are named as libtpu names them (`v5e:2x2`, `v5p:4x4x4`, `v6e:8x8`, `v4:2x2x1`) or as Cloud TPU
accelerator types (`v5litepod-16`, `v5p-128`, `v6e-64`, `v4-8`; for v4 and v5p the number counts
TensorCores, two per chip). Multislice: `num_slices` copies of the slice joined over the data-center
network, the mesh's data axis spanning them (`mesh.slices`).
"""

import dataclasses
import math
import os
import re
import time
from typing import Any

import ml_collections

from mmfree_jax import flops
from mmfree_jax.train import hlo_flops, sharding
from mmfree_jax.train.program import build_program, resolve_batch

GiB = 1024 ** 3
INSTALL_HINT = "libtpu is not installed: `pip install -e .[tpu]` (installs jax[tpu], about 700 MB)"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: libtpu's topology prefix, HBM per chip, peak dense bf16 FLOP/s per chip."""
  name: str
  prefix: str
  hbm_bytes: int
  peak_flops: float
  dims: int  # 2 (v5e, v6e torus) or 3 (v4, v5p)
  cores_per_chip: int  # TensorCores per chip: the unit of the accelerator-type number for v4 / v5p
  chip_config: str  # libtpu chip config: megacore fuses a chip's two TensorCores into one device


CHIPS = {
    "v4": Chip("v4", "v4", 32 * GiB, 275e12, 3, 2, "megacore"),
    "v5e": Chip("v5e", "v5e", 16 * GiB, 197e12, 2, 1, "default"),
    "v5p": Chip("v5p", "v5p", 95 * GiB, 459e12, 3, 2, "megacore"),
    "v6e": Chip("v6e", "v6e", 32 * GiB, 918e12, 2, 1, "default"),
}
_ALIASES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v5p": "v5p", "v5": "v5p",
            "v6e": "v6e", "v6": "v6e"}


class AotError(ValueError):
  """A one-line, user-facing error: libtpu missing, unknown topology, mesh or batch does not fit the slice."""


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple[int, ...]  # chips along each torus axis
  num_slices: int = 1

  @property
  def name(self) -> str:
    """libtpu's name of one slice, e.g. `v5p:4x4x4`."""
    return f"{self.chip.prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def accelerator_type(self) -> str:
    """Cloud TPU's name of one slice, e.g. `v5p-128`, `v5litepod-16`, `v6e-64`."""
    n = self.chips_per_slice * self.chip.cores_per_chip
    return f"v5litepod-{n}" if self.chip.name == "v5e" else f"{self.chip.name}-{n}"

  def describe(self) -> str:
    s = f"{self.name} ({self.accelerator_type}, {self.chips_per_slice} chips)"
    return s if self.num_slices == 1 else f"{self.num_slices} x {s}"


def default_shape(chip: Chip, chips: int) -> tuple[int, ...]:
  """The usual torus of a power-of-two slice: start from 2x2(x1) and double the last smallest axis
  (v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...; v5e / v6e: 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16)."""
  if chips < 4 or chips & (chips - 1):
    raise AotError(f"no default torus for {chips} {chip.name} chips; name the topology, e.g. "
                   f"{chip.prefix}:{'x'.join(['2'] * chip.dims)}")
  shape = [2, 2] + [1] * (chip.dims - 2)
  while math.prod(shape) < chips:
    small = min(shape)
    i = max(j for j, s in enumerate(shape) if s == small)
    shape[i] *= 2
  return tuple(shape)


def parse_topology(name: str, num_slices: int = 1) -> Topology:
  """`v5p:4x4x4` (libtpu) or `v5p-128` / `v5litepod-16` / `v6e-64` (Cloud TPU accelerator type)."""
  if num_slices < 1:
    raise AotError(f"num_slices={num_slices} must be positive")
  text = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+)[:=_]((?:\d+x)*\d+)", text)
  if m and m.group(1) in _ALIASES:
    chip = CHIPS[_ALIASES[m.group(1)]]
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) == 2 and chip.dims == 3:
      shape += (1,)
    if len(shape) != chip.dims or min(shape) < 1:
      raise AotError(f"topology {name!r}: {chip.name} slices have {chip.dims} axes, e.g. "
                     f"{chip.prefix}:{'x'.join(['2'] * chip.dims)}")
    return Topology(chip, shape, num_slices)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if m and m.group(1) in _ALIASES:
    chip = CHIPS[_ALIASES[m.group(1)]]
    n = int(m.group(2))
    if n % chip.cores_per_chip:
      raise AotError(f"topology {name!r}: {chip.name}-N counts TensorCores ({chip.cores_per_chip} per chip)")
    return Topology(chip, default_shape(chip, n // chip.cores_per_chip), num_slices)
  raise AotError(f"unknown topology {name!r}; expected e.g. v5e:2x2, v5p:4x4x4, v6e:8x8, v4:2x2x1 or an "
                 f"accelerator type such as v5p-128, v5litepod-16, v6e-64")


def has_libtpu() -> bool:
  """Whether the `libtpu` package (from `pip install jax[tpu]`) is importable."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def topology_devices(topo: Topology) -> list:
  """The devices of the slice(s), from libtpu; an AotError when libtpu is missing or rejects the topology."""
  if not has_libtpu():
    raise AotError(INSTALL_HINT)
  # Compile-only use: no chip is opened, so several processes (checks, tests) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  bounds = tuple(min(s, b) for s, b in zip(topo.shape + (1,) * (3 - len(topo.shape)), (2, 2, 1)))
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.name, chip_config_name=topo.chip.chip_config,
                                        chips_per_host_bounds=bounds, num_slices=topo.num_slices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises JaxRuntimeError / RuntimeError)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise AotError(f"libtpu rejects topology {topo.name} x{topo.num_slices}: {first}") from e
  return list(desc.devices)


def _num_hosts(devices: list) -> int:
  return len({(getattr(d, "slice_index", 0), d.host_id) for d in devices})


def slice_config(config: ml_collections.ConfigDict, topo: Topology) -> ml_collections.ConfigDict:
  """The config with `mesh.slices` set to the number of slices (the data axis spans them)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.slices = topo.num_slices
  return config


def make_slice_mesh(config: ml_collections.ConfigDict, topo: Topology, devices: list):
  """`sharding.make_mesh` over the slice's devices; an AotError naming the slice when the mesh does not fit."""
  try:
    return sharding.make_mesh(config.mesh, devices)
  except ValueError as e:
    raise AotError(f"the mesh does not fit the slice {topo.describe()}, {len(devices)} devices in all: {e}") from e


def _memory(compiled, hbm: int) -> dict[str, Any]:
  ma = compiled.memory_analysis()
  get = lambda name: int(getattr(ma, name, 0) or 0)
  args, outs, alias = get("argument_size_in_bytes"), get("output_size_in_bytes"), get("alias_size_in_bytes")
  temp, code = get("temp_size_in_bytes"), get("generated_code_size_in_bytes")
  total = args + outs - alias + temp + code
  return dict(arguments=args, outputs=outs, aliased=alias, temporaries=temp, generated_code=code, total=total,
              hbm=hbm, fraction=total / hbm)


def _cost(compiled) -> dict[str, float]:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return dict(ca or {})


_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_OOM = (re.compile(rf"[Uu]sed\s+{_SIZE}\s+of\s+{_SIZE}\s+hbm"),
        re.compile(rf"\({_SIZE}\)\s+exceeds available HBM\s+\({_SIZE}\)"))


def _oom_bytes(message: str) -> tuple[int, int] | None:
  """(required, available) bytes from the TPU compiler's out-of-memory message, if it says."""
  scale = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}
  for pattern in _OOM:
    m = pattern.search(message)
    if m:
      return int(float(m.group(1)) * scale[m.group(2)]), int(float(m.group(3)) * scale[m.group(4)])
  return None


def compile_report(config: ml_collections.ConfigDict, topology: str, num_slices: int = 1) -> dict[str, Any]:
  """Compiles `config`'s train step for the topology and returns the report (see `experiments.compile_tpu`).

  Raises AotError for a missing libtpu, an unknown topology, a mesh or batch that does not fit the slice.
  A program too large for HBM is not an error: the report says `fits: False` (with `error` and, where the
  compiler says them, the bytes it needed and had).
  """
  topo = parse_topology(topology, num_slices)
  config = slice_config(config, topo)
  devices = topology_devices(topo)
  mesh = make_slice_mesh(config, topo, devices)
  hosts = _num_hosts(devices)
  try:
    resolve_batch(config, mesh, hosts)
  except ValueError as e:
    raise AotError(f"{e} (slice {topo.describe()}, {hosts} hosts)") from e
  gb, accum, seq_len = int(config.train.global_batch), int(config.train.grad_accum), int(config.data.seq_len)
  tokens = gb * seq_len
  per_token = flops.flops_per_token(config.model, seq_len)
  report: dict[str, Any] = dict(
      fits=False, topology=topo.name, accelerator_type=topo.accelerator_type, num_slices=topo.num_slices,
      chips=topo.chips, hosts=hosts, device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
      arch=str(config.model.arch), params=flops.param_counts(config.model)["params"],
      remat=str(config.model.remat), global_batch=gb, grad_accum=accum, seq_len=seq_len, tokens_per_step=tokens)

  t0 = time.perf_counter()
  program = build_program(config, mesh)
  with program.context:
    lowered = program.train_step.lower(program.abstract_state, program.abstract_train_batch(gb, accum, seq_len))
  t1 = time.perf_counter()
  report["lower_s"] = round(t1 - t0, 3)
  ours_step = per_token["train"] * tokens
  text = lowered.as_text()
  program_dots, program_dots_once = hlo_flops.matmul_flops(text), hlo_flops.matmul_flops(text, loops=False)
  report["flops"] = dict(ours_per_step=ours_step, ours_train_per_token=per_token["train"],
                         ours_matmul_per_step=per_token["matmul_train"] * tokens,
                         ours_xla_matmul_per_step=3 * per_token["xla_matmul_forward"] * tokens,
                         program_matmul_per_step=program_dots)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError: RESOURCE_EXHAUSTED)
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
      raise
    report["compile_s"] = round(time.perf_counter() - t1, 3)
    report["error"] = " ".join(message.split())[:500]
    used = _oom_bytes(message)
    report["memory"] = dict(required=used[0], available=used[1], hbm=topo.chip.hbm_bytes,
                            fraction=used[0] / topo.chip.hbm_bytes) if used else dict(hbm=topo.chip.hbm_bytes)
    return report
  report["compile_s"] = round(time.perf_counter() - t1, 3)
  memory = _memory(compiled, topo.chip.hbm_bytes)
  report["memory"] = memory
  report["fits"] = memory["total"] <= topo.chip.hbm_bytes
  xla_chip = float(_cost(compiled).get("flops", 0.0))
  compiled_step = xla_chip * topo.chips + program_dots - program_dots_once
  report["flops"].update(xla_per_chip_loops_once=xla_chip, xla_per_step_loops_once=xla_chip * topo.chips,
                         compiled_per_step=compiled_step, compiled_over_ours=compiled_step / ours_step)
  report["step_s_at_peak"] = ours_step / (topo.chips * topo.chip.peak_flops)
  return report


def format_report(r: dict[str, Any]) -> str:
  """The human-readable report."""
  g = lambda b: f"{b / GiB:.2f} GiB"
  slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
  lines = [f"{r['arch']} ({r['params']:,} parameters, remat={r['remat']}) on {r['topology']}{slices} "
           f"[{r['accelerator_type']}, {r['chips']} chips, {r['hosts']} hosts, {r['device_kind']}]",
           f"  mesh {r['mesh']}; batch {r['global_batch']} x {r['seq_len']} = {r['tokens_per_step']:,} tokens "
           f"per step, {r['grad_accum']} micro-batches",
           f"  lowering {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s"]
  m = r["memory"]
  if "arguments" in m:
    lines.append(f"  memory per chip: arguments {g(m['arguments'])}, outputs {g(m['outputs'])} "
                 f"(aliased {g(m['aliased'])}), temporaries {g(m['temporaries'])}, generated code "
                 f"{g(m['generated_code'])}")
  if "total" in m:
    lines.append(f"  total {g(m['total'])} of {g(m['hbm'])} HBM ({100 * m['fraction']:.0f}%)")
  elif "required" in m:
    lines.append(f"  the compiler needs at least {g(m['required'])} of the {g(m['available'])} it may use")
  f = r["flops"]
  if "compiled_per_step" in f:
    lines.append(f"  FLOPs per step: compiled {f['compiled_per_step']:.4g}, ours {f['ours_per_step']:.4g} "
                 f"(compiled/ours {f['compiled_over_ours']:.2f}; XLA counts remat recomputation and the full "
                 f"attention square)")
  else:
    lines.append(f"  FLOPs per step: ours {f['ours_per_step']:.4g}")
  lines.append(f"  matmul FLOPs per step: program {f['program_matmul_per_step']:.4g}, ours "
               f"{f['ours_matmul_per_step']:.4g} (causal attention), {f['ours_xla_matmul_per_step']:.4g} "
               f"(full attention square)")
  if r.get("error"):
    lines.append(f"  compiler: {r['error']}")
  lines.append(f"  {'FITS' if r['fits'] else 'DOES NOT FIT'}")
  return "\n".join(lines)
