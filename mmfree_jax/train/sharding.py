"""Device meshes and logical-axis rules. Models name axes; this module maps the names onto the mesh.

Mesh axes: `data` (pure data parallel; across slices in multi-slice), `fsdp` (data parallel with parameters,
gradients and optimizer state sharded over it), `tensor` (the hidden / heads / vocab dimensions).
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Logical axis name -> mesh axes. Parameters: embed / mlp / heads / kv / vocab / layers.
# Activations use `act_*` names so that a parameter's `embed` (sharded over fsdp) and an activation's `embed`
# (replicated; its batch is sharded over data and fsdp) do not compete for the same mesh axis.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("act_batch", BATCH),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolve -1 (the rest of the devices) and check the product; a one-line error otherwise."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: axis sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices; "
                       f"set --config.mesh.* so that data*fsdp*tensor = {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                     f"{num_devices} are present; set --config.mesh.* so that data*fsdp*tensor = {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all). With `mesh_cfg.slices > 1` the data axis
  spans slices (DCN) and fsdp/tensor stay within a slice, as Cloud TPU multislice training lays it out."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  slices = int(mesh_cfg.get("slices", 1))
  types = (AxisType.Auto,) * len(MESH_AXES)
  if slices > 1:
    if shape[0] % slices:
      raise ValueError(f"mesh.data={shape[0]} must be a multiple of mesh.slices={slices}")
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    ici = (shape[0] // slices, shape[1], shape[2])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    return Mesh(grid, MESH_AXES, axis_types=types)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=types)
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=types)


def batch_sharding(mesh: Mesh, ndim: int = 2, leading: int = 0) -> NamedSharding:
  """Rows over (data, fsdp); `leading` unsharded axes first (e.g. the micro-batch axis)."""
  return NamedSharding(mesh, P(*([None] * leading), BATCH, *([None] * (ndim - leading - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
