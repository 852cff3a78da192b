"""Import of released-style checkpoints: layout conversion checked against the independent NumPy forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import tiny
from mmfree_jax.inference import hf_import, loading, recurrent
from mmfree_jax.models import model_config
from tests.inference.helpers import write_hf_checkpoint
from tests.models import numpy_reference


def test_imported_workdir_matches_numpy_reference_and_restores_in_trainer(tmp_path, x64):
  tensors = write_hf_checkpoint(tmp_path / "hf", inter=None)
  config = tiny.get_config()
  summary = hf_import.import_hf(str(tmp_path / "hf"), str(tmp_path / "wd"), config)
  assert summary["model"]["d_ff"] == 0  # null intermediate_size: the formula, our default
  loaded = loading.load(str(tmp_path / "wd"))
  assert loaded.step == 0 and loaded.model_cfg.vocab_size == 300 and loaded.model_cfg.ff == 256
  cfg = model_config(dict(loaded.config.model.to_dict(), dtype="float64", param_dtype="float64"))
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), loaded.params)
  tokens = np.array([[1, 40, 7, 299, 3, 150, 22, 5]])

  @jax.jit
  def run(w):
    w = recurrent.prepare(cfg, w)
    x, _ = recurrent.hidden(cfg, w, tokens, None, recurrent.init_cache(cfg, 1, 8))
    return recurrent.logits(cfg, w, x)

  got = np.asarray(run(params))[0]
  ref = numpy_reference.forward({k: np.asarray(v, np.float64) for k, v in tensors.items()}, tokens[0], 2)
  np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())

  # The trainer's own restore path (state + data iterator) accepts the imported checkpoint.
  from mmfree_jax.data import pipeline
  from mmfree_jax.train import sharding
  from mmfree_jax.train.checkpoint import Checkpointer
  from mmfree_jax.train.program import build_program
  wd_config = loading.read_config(str(tmp_path / "wd"))
  program = build_program(wd_config, sharding.make_mesh(wd_config.mesh))
  it = pipeline.make_train_iterator(wd_config.data, global_batch=16, seq_len=256, seed=0, process_index=0,
                                    process_count=1)
  ckpt = Checkpointer(str(tmp_path / "wd"), wd_config.checkpoint)
  step, state = ckpt.restore_latest(program.abstract_state, it)
  ckpt.close()
  assert step == 0
  np.testing.assert_array_equal(state.params["params"]["lm_head"]["kernel"],
                                np.asarray(tensors["lm_head.weight"], np.float32).T)


def test_sharded_checkpoint_and_layouts(tmp_path):
  one = write_hf_checkpoint(tmp_path / "one", inter=64, dtype=np.float32)
  write_hf_checkpoint(tmp_path / "two", inter=64, dtype=np.float32, shards=2)
  hf = hf_import.read_hf_config(str(tmp_path / "two"))
  p = hf_import.convert(hf_import.read_safetensors(str(tmp_path / "two")), hf)
  assert p["layers"]["mlp"]["gate_proj"]["kernel"].shape == (2, 32, 2, 64)
  gate_up = one["model.layers.1.mlp.gate_proj.weight"]
  np.testing.assert_array_equal(p["layers"]["mlp"]["gate_proj"]["kernel"][1, :, 0], gate_up[:64].T)
  np.testing.assert_array_equal(p["layers"]["mlp"]["gate_proj"]["kernel"][1, :, 1], gate_up[64:].T)
  np.testing.assert_array_equal(p["layers"]["attn"]["f_proj"]["kernel"][0], one["model.layers.0.attn.f_proj.weight"].T)
  np.testing.assert_array_equal(p["layers"]["mlp"]["down_proj"]["norm_scale"][1],
                                one["model.layers.1.mlp.down_proj.norm.weight"])
  bad = dict(hf, use_lower_bound=False)
  with pytest.raises(ValueError, match="use_lower_bound"):
    hf_import.model_fields(bad)
