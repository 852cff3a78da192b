"""Loading a model for inference: a training workdir, an imported one, or a packed export directory.

  training / imported workdir   WORKDIR/config.json + WORKDIR/checkpoints/<step>/state (Orbax); only the
                                parameters of the newest checkpoint are read (not the optimizer state).
  packed export                 OUT/config.json (with an `inference` field) + OUT/params (Orbax), see
                                `inference.packed` and `experiments.export`.

The tokenizer: a `tokenizer.model` / `tokenizer.json` in the directory if there is one (imported models), else
bytes for the embedded corpus, else the tokenizer recorded in the data manifest of `data.path`.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mmfree_jax.data.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer
from mmfree_jax.model_config import ModelConfig
from mmfree_jax.models import build_model


@dataclasses.dataclass
class Loaded:
  config: ml_collections.ConfigDict
  model_cfg: ModelConfig
  params: dict  # the bare `params` collection (latent or packed)
  packed: bool
  step: int | None
  directory: str

  @property
  def tokenizer(self) -> Tokenizer:
    return tokenizer_for(self.config, self.directory)


def read_config(directory: str) -> ml_collections.ConfigDict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: not a training workdir or an export directory")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def tokenizer_for(config, directory: str | None = None) -> Tokenizer:
  for name in ("tokenizer.model", "tokenizer.json"):
    if directory and os.path.isfile(os.path.join(directory, name)):
      return load_tokenizer(os.path.join(directory, name))
  data = config.get("data", {}) if hasattr(config, "get") else {}
  if data.get("source", "embedded") == "embedded" or not data.get("path"):
    return ByteTokenizer()
  return load_tokenizer(data["path"])


def abstract_params(model_cfg: ModelConfig) -> dict:
  """ShapeDtypeStructs of the model's bare parameter tree."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = build_model(model_cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return nn.unbox(boxed)["params"]


def latest_step(workdir: str) -> int:
  root = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {root}")
  return steps[-1]


def restore_params(workdir: str, model_cfg: ModelConfig, step: int | None = None) -> tuple[dict, int]:
  """The parameters of a training checkpoint (partial restore of its `state` item: no optimizer state)."""
  step = latest_step(workdir) if step is None else step
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  device = jax.local_devices()[0]
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=jax.sharding.SingleDeviceSharding(device)),
                        abstract_params(model_cfg))
  item = {"params": {"params": target}}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                          partial_restore=True))
  return out["params"]["params"], step


def save_packed(directory: str, params: dict, config_dict: dict) -> None:
  """Writes a packed export: `params` (Orbax) and `config.json`."""
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(os.path.abspath(directory), "params"), params, force=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config_dict, f, indent=2)


def load(directory: str, step: int | None = None) -> Loaded:
  """A training workdir, an imported workdir or a packed export directory (see the module docstring)."""
  config = read_config(directory)
  model_cfg = ModelConfig.from_config(config.model)
  if "inference" in config and os.path.isdir(os.path.join(directory, "params")):
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(os.path.abspath(directory), "params"))
    params = jax.tree.map(np.asarray, params)
    return Loaded(config, model_cfg, params, True, config.inference.get("step"), directory)
  params, step = restore_params(directory, model_cfg, step)
  return Loaded(config, model_cfg, params, False, step, directory)


def device_params(params: Any) -> Any:
  return jax.tree.map(jnp.asarray, params)


def export_packed(src: str, out: str, float_dtype: str = "bfloat16", step: int | None = None) -> dict:
  """Packs the newest (or `step`) checkpoint of a MatMul-free workdir into an inference export at `out`.

  Returns a summary: bytes of the latent parameters and of the export.
  """
  from mmfree_jax.inference import packed as packed_lib  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  loaded = load(src, step)
  if loaded.packed:
    raise ValueError(f"{src} is already a packed export")
  if loaded.model_cfg.arch != "hgrn_bit":
    raise ValueError(f"{src} holds a {loaded.model_cfg.arch} model: only MatMul-free (hgrn_bit) weights are ternary")
  tree = packed_lib.pack_params(loaded.params, jnp.dtype(float_dtype))
  config_dict = loaded.config.to_dict()
  config_dict["inference"] = {"format": packed_lib.FORMAT, "float_dtype": str(jnp.dtype(float_dtype)),
                              "step": loaded.step, "source": os.path.abspath(src)}
  save_packed(out, tree, config_dict)
  for name in ("tokenizer.model", "tokenizer.json"):
    if os.path.isfile(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(out, name))
  return {"step": loaded.step, "latent_bytes": packed_lib.weight_bytes(loaded.params),
          "packed_bytes": packed_lib.weight_bytes(tree)}
