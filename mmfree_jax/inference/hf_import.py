"""Import a released MatMul-free checkpoint (Hugging Face layout, `hgrn_bit`) into a training workdir.

Input directory: `config.json` (hidden_size, num_hidden_layers, vocab_size, rms_norm_eps, hidden_ratio,
intermediate_size, use_lower_bound, tie_word_embeddings), `model.safetensors` or shards listed in
`model.safetensors.index.json`, and optionally a SentencePiece `tokenizer.model`.

The latent weights are kept as they are (cast to the config's parameter dtype, float32 by default: bf16 values
are exact in it): PyTorch `[out, in]` matrices are transposed to `[in, out]`, the fused `gate_proj [2I, d]`
becomes `[d, 2, I]` (gate = [:, 0], up = [:, 1]), per-layer tensors are stacked on a leading layer axis.

The output is what the trainer writes: `WORKDIR/checkpoints/0/{state,data,config}` (step 0, fresh optimizer
state, the data iterator at its start) and `WORKDIR/config.json`, so `experiments.train` with the same config
fine-tunes from it and the inference tools load it.
"""

import json
import math
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PROJ = ("i", "f", "g", "o")


def read_hf_config(hf_dir: str) -> dict:
  with open(os.path.join(hf_dir, "config.json")) as f:
    return json.load(f)


def intermediate_size(hf: dict) -> int:
  """The official rule: 256 * ceil(int(d * hidden_ratio * 2/3) / 256) when intermediate_size is null."""
  if hf.get("intermediate_size"):
    return int(hf["intermediate_size"])
  return 256 * math.ceil(int(hf["hidden_size"] * hf.get("hidden_ratio", 4) * 2 / 3) / 256)


def model_fields(hf: dict) -> dict:
  """Our `config.model` fields for a Hugging Face `hgrn_bit` config (errors for variants we do not model)."""
  if hf.get("model_type", "hgrn_bit") != "hgrn_bit":
    raise ValueError(f"model_type={hf.get('model_type')!r}: only hgrn_bit checkpoints can be imported")
  if not hf.get("use_lower_bound", True):
    raise ValueError("use_lower_bound=false is not supported: the model always uses the lower bounds")
  for key in ("use_short_conv",):
    if hf.get(key):
      raise ValueError(f"{key}=true is not supported by this implementation")
  if hf.get("expand_ratio", 1) != 1 or hf.get("num_heads", 1) != 1:
    raise ValueError("only expand_ratio=1, num_heads=1 (the released models) are supported")
  return dict(arch="hgrn_bit", vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
              n_layers=int(hf["num_hidden_layers"]), d_ff=intermediate_size(hf),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors` or of the shards named in `model.safetensors.index.json`."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(load_file(os.path.join(hf_dir, name)))
  return tensors


def convert(tensors: dict[str, np.ndarray], hf: dict, dtype=np.float32) -> dict:
  """Official names and [out, in] layout -> our bare `params` tree (NumPy, `dtype`)."""
  n_layers, d, inter = int(hf["num_hidden_layers"]), int(hf["hidden_size"]), intermediate_size(hf)
  used: set[str] = set()

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise KeyError(f"missing tensor {name}")
    t = tensors[name]
    if tuple(t.shape) != shape:
      raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
    used.add(name)
    return np.asarray(t).astype(dtype)

  def stack(fmt: str, shape: tuple[int, ...], fn=lambda a: a) -> np.ndarray:
    return np.stack([fn(get(f"model.layers.{l}.{fmt}", shape)) for l in range(n_layers)])

  vocab = int(hf["vocab_size"])
  emb = get("model.embeddings.weight", (vocab, d))
  head = tensors.get("lm_head.weight")
  if head is None and hf.get("tie_word_embeddings", False):
    head = emb
  else:
    head = get("lm_head.weight", (vocab, d))
  t = lambda a: a.T
  attn = {f"{n}_proj": {"kernel": stack(f"attn.{n}_proj.weight", (d, d), t),
                        "norm_scale": stack(f"attn.{n}_proj.norm.weight", (d,))} for n in PROJ}
  attn["g_norm"] = {"scale": stack("attn.g_norm.weight", (d,))}
  mlp = {"gate_proj": {"kernel": stack("mlp.gate_proj.weight", (2 * inter, d), lambda a: a.T.reshape(d, 2, inter)),
                       "norm_scale": stack("mlp.gate_proj.norm.weight", (d,))},
         "down_proj": {"kernel": stack("mlp.down_proj.weight", (d, inter), t),
                       "norm_scale": stack("mlp.down_proj.norm.weight", (inter,))}}
  params = {
      "embeddings": {"embedding": emb},
      "lower_bounds": get("model.lower_bounds", (n_layers, d)),
      "layers": {"attn": attn, "mlp": mlp, "attn_norm": {"scale": stack("attn_norm.weight", (d,))},
                 "mlp_norm": {"scale": stack("mlp_norm.weight", (d,))}},
      "norm": {"scale": get("model.norm.weight", (d,))},
      "lm_head": {"kernel": np.ascontiguousarray(np.asarray(head).astype(dtype).T),
                  "norm_scale": get("lm_head.norm.weight", (d,))},
  }
  unknown = sorted(set(tensors) - used - {"lm_head.weight"})
  if unknown:
    raise ValueError(f"unexpected tensors (a different architecture?): {unknown[:5]}")
  return params


def write_workdir(workdir: str, config: ml_collections.ConfigDict, params: dict) -> None:
  """A step-0 training checkpoint of `params` exactly as the trainer writes one, plus config.json."""
  from mmfree_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train.program import build_program  # pylint: disable=g-import-not-at-top
  from mmfree_jax.train.step import TrainState  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  program = build_program(config, mesh)
  shardings = program.state_shardings
  abstract = program.abstract_state.params["params"]
  placed = jax.tree.map(lambda a, s, ab: jax.device_put(np.asarray(a, ab.dtype), s), params,
                        shardings.params["params"], abstract)
  variables = {"params": placed}
  opt_state = jax.jit(program.tx.init, out_shardings=shardings.opt_state)(variables)
  state = TrainState(step=jax.device_put(np.zeros((), np.int32), shardings.step), params=variables,
                     opt_state=opt_state)
  data_iter = pipeline.make_train_iterator(config.data, global_batch=int(config.train.global_batch),
                                           seq_len=int(config.data.seq_len), seed=int(config.train.seed),
                                           process_index=0, process_count=1)
  config_dict = json.loads(config.to_json_best_effort())
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(workdir, config.checkpoint)
  ckpt.check_compatible(config_dict)
  ckpt.save(0, state, data_iter, config_dict, force=True)
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_dict, f, indent=2)


def default_config() -> ml_collections.ConfigDict:
  """The base config on the embedded corpus (pass the fine-tuning config instead to continue training)."""
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  return base.get_base_config()


def import_hf(hf_dir: str, workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Converts `hf_dir` into a training workdir; `config`'s model fields are replaced by the checkpoint's."""
  hf = read_hf_config(hf_dir)
  config = default_config() if config is None else ml_collections.ConfigDict(config.to_dict())
  fields = model_fields(hf)
  if fields["d_ff"] == _glu_default(fields["d_model"]):
    fields["d_ff"] = 0
  config.model.update(fields)
  params = convert(read_safetensors(hf_dir), hf, jnp.dtype(config.model.param_dtype))
  write_workdir(workdir, config, params)
  if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
    shutil.copy(os.path.join(hf_dir, "tokenizer.model"), os.path.join(workdir, "tokenizer.model"))
  return {"model": fields, "tensors": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))}


def _glu_default(d_model: int) -> int:
  from mmfree_jax.model_config import glu_width  # pylint: disable=g-import-not-at-top
  return glu_width(d_model)
