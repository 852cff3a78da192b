"""Mesh construction and its errors."""

import jax
import ml_collections
import pytest

from mmfree_jax.train import sharding


def _mesh_cfg(data=-1, fsdp=1, tensor=1, slices=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, slices=slices))


def test_rest_of_devices():
  assert sharding.mesh_shape(_mesh_cfg(fsdp=2, tensor=2), 8) == (2, 2, 2)
  mesh = sharding.make_mesh(_mesh_cfg(fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("cfg,match", [
    (_mesh_cfg(data=3), "needs 3 devices but 8"),
    (_mesh_cfg(data=-1, fsdp=3), "does not divide"),
    (_mesh_cfg(data=-1, fsdp=-1), "at most one axis"),
    (_mesh_cfg(data=0), "positive"),
])
def test_mesh_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(cfg)


def test_subset_of_devices():
  mesh = sharding.make_mesh(_mesh_cfg(data=1, fsdp=2, tensor=2), jax.devices()[:4])
  assert mesh.devices.size == 4
