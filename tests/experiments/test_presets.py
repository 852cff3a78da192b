"""Preset arguments: ':transformer', ':gpu' (the MatMul-free LM's fastest GPU configuration) and their errors."""

import importlib

import jax
import pytest

from experiments.configs import base
from mmfree_jax.train import sharding
from mmfree_jax.train.program import resolve_batch


def _preset(name: str, arg: str | None = None):
  return importlib.import_module(f"experiments.configs.{name}").get_config(arg)


def _mesh(data: int, fsdp: int = 1, tensor: int = 1):
  cfg = base.get_base_config().mesh
  cfg.update(data=data, fsdp=fsdp, tensor=tensor)
  return sharding.make_mesh(cfg, jax.devices()[:data * fsdp * tensor])


@pytest.mark.parametrize("name,micro", [("370m", 8), ("1p3b", 4)])
def test_gpu_configuration(name, micro):
  plain, gpu = _preset(name), _preset(name, "gpu")
  assert _preset(name, "mmfree,gpu").to_dict() == gpu.to_dict()
  assert gpu.model.bitlinear == "pallas_fused" and gpu.model.down_bitlinear == "pallas"
  assert gpu.model.o_bitlinear == gpu.model.gate_bitlinear == "pallas" and gpu.model.fuse_block_norms
  assert gpu.model.remat == "none" and gpu.model.unroll_layers == gpu.model.n_layers
  assert gpu.model.quantize_weights_once and gpu.train.micro_batch == micro
  # The same model and recipe: only how the step is computed differs.
  impl = ("bitlinear", "down_bitlinear", "o_bitlinear", "gate_bitlinear", "remat", "unroll_layers",
          "quantize_weights_once", "fuse_block_norms")
  assert {k: v for k, v in gpu.model.items() if k not in impl} == {k: v for k, v in plain.model.items()
                                                                    if k not in impl}
  assert gpu.optim.to_dict() == plain.optim.to_dict() and gpu.train.global_batch == plain.train.global_batch


@pytest.mark.parametrize("name,arg,match", [
    ("1p3b", "transformer,gpu", "MatMul-free LM's GPU configuration"),
    ("tiny", "gpu", "has no ':gpu' configuration"),
    ("2p7b", "gpu", "has no ':gpu' configuration"),
    ("370m", "fast", "unknown config argument 'fast'"),
])
def test_argument_errors(name, arg, match):
  with pytest.raises(ValueError, match=match):
    _preset(name, arg)


def test_micro_batch_sets_grad_accum_from_the_mesh():
  c = _preset("1p3b", "gpu")  # 256 rows per step, 4 per device and micro-batch
  resolve_batch(c, _mesh(1), 1)
  assert c.train.grad_accum == 64
  c = _preset("1p3b", "gpu")
  resolve_batch(c, _mesh(2, fsdp=2, tensor=2), 1)  # 4 data-parallel devices (tensor parallelism shares rows)
  assert c.train.grad_accum == 16


@pytest.mark.parametrize("batch,accum,micro,match", [
    (256, 1, 3, "does not split into micro-batches of train.micro_batch=3 rows on each of the 2"),
    (256, 4, 4, "train.grad_accum=4 and train.micro_batch=4 disagree"),
])
def test_micro_batch_errors(batch, accum, micro, match):
  c = _preset("370m")
  c.train.update(global_batch=batch, grad_accum=accum, micro_batch=micro)
  with pytest.raises(ValueError, match=match):
    resolve_batch(c, _mesh(2), 1)
