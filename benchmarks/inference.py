"""Inference benchmark: MatMul-free (packed ternary) vs Transformer++ (bf16, KV cache), batch 1, random weights.

  python -m benchmarks.inference                                     # 370m and 1p3b, both families (GPU)
  python -m benchmarks.inference --config=experiments/configs/tiny.py  # CPU smoke run

Per model (each in its own process, so that peak memory is its own):
  generate   a 128-token prompt + 128 new tokens, greedy, EOS off: end-to-end new tokens/s, prefill time,
             decode tokens/s
  profile    with --profile_top=N: device kernel time and launches per decoded token, by kernel kind
  long       decoding 128 tokens after a (2048 - 128)-token prompt: decode tokens/s at ~2048 context
  memory     peak_bytes_in_use (where the backend reports it) and, analytically, weights + state/cache bytes
Timings are synchronized (`block_until_ready`), after a warm-up call, median of --repeats. One JSON line per
model is appended to benchmarks/results/inference.jsonl.
"""

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags

from benchmarks import trace

flags.DEFINE_multi_string("config", ["experiments/configs/370m.py", "experiments/configs/1p3b.py"],
                          "Config file(s) of the sizes to run (both families each).")
flags.DEFINE_multi_enum("arch", ["hgrn_bit", "transformer"], ["hgrn_bit", "transformer"],
                        "Families to run at each size (default both).")
flags.DEFINE_string("only", None, "Internal: run one 'CONFIG|ARCH' in this process.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens of the generate measurement.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per measurement.")
flags.DEFINE_integer("long_context", 2048, "Context length at which decoding is measured.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
flags.DEFINE_bool("unroll_layers", False, "Decode with the layer loop unrolled (generation.decode_loop).")
flags.DEFINE_enum("ternary_product", None, ["int8", "bf16"], "MatMul-free: the instruction of the exact ternary "
                  "product (inference.packed.PRODUCT); default: the library's.")
flags.DEFINE_bool("decode_kernel", True, "MatMul-free: decode with the Pallas kernel where the library does "
                  "(ternary_kernel.MODE=auto: on GPUs); --nodecode_kernel: XLA's BitLinear (MODE=off).")
flags.DEFINE_integer("kernel_block_elems", None, "MatMul-free decode kernel: ternary_kernel.BLOCK_ELEMS (default: "
                     "the library's).")
flags.DEFINE_list("kernel_prologues", None, "MatMul-free decode kernel: ternary_kernel.PROLOGUES (norm, glu; "
                  "'' for none; default: the library's).")
flags.DEFINE_integer("kernel_num_warps", None, "MatMul-free decode kernel: ternary_kernel.NUM_WARPS.")
flags.DEFINE_integer("profile_top", 0, "If > 0: trace one decode of the generate measurement and print this many "
                     "kernel groups (time and launches per token).")
flags.DEFINE_string("out", "benchmarks/results/inference.jsonl", "Results file (appended).")

ARCHS = ("hgrn_bit", "transformer")


def _median_time(fn, repeats: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def random_params(cfg, model) -> dict:
  """Random inference weights drawn leaf by leaf on the device (no full-precision copy of the model, so that
  peak memory is the inference's own): MatMul-free BitLinears directly as packed ternary codes with a per-matrix
  scale, everything else normal(0, 0.02) (norm scales 1) in the compute dtype."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmfree_jax.inference import packed  # pylint: disable=g-import-not-at-top
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))["params"]
  counter = iter(range(1 << 30))

  def key():
    return jax.random.key(next(counter))

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def codes(k, shape, stacked):
    q = jax.random.randint(k, shape, -1, 2, dtype=jnp.int8)
    return jax.vmap(packed.pack)(q) if stacked else packed.pack(q)

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def normal(k, shape, dtype):
    return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

  def bitlinear(node, stacked):
    lead = node["kernel"].shape[:1] if stacked else ()
    return {"packed": codes(key(), node["kernel"].shape, stacked),
            "inv_sw": jnp.full(lead, 0.02, jnp.float32), "norm_scale": jnp.ones(node["norm_scale"].shape, jnp.float32)}

  tree = packed.map_bitlinears(bitlinear, shapes) if cfg.arch == "hgrn_bit" else shapes

  def leaf(path, a):
    if not isinstance(a, jax.ShapeDtypeStruct):
      return a
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(a.shape, cfg.compute_dtype)
    if "lower_bounds" in name:
      return jnp.zeros(a.shape, cfg.compute_dtype)
    return normal(key(), a.shape, cfg.compute_dtype)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def run_one(config_path: str, arch: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmfree_jax.inference import generation, packed, ternary_kernel  # pylint: disable=g-import-not-at-top
  from mmfree_jax.model_config import ModelConfig  # pylint: disable=g-import-not-at-top
  from mmfree_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from mmfree_jax.scaling.sweep import load_module  # pylint: disable=g-import-not-at-top

  config = load_module(config_path).get_config("transformer" if arch == "transformer" else None)
  m = dict(config.model.to_dict(), remat="none")
  if jax.default_backend() != "cpu":
    m["dtype"] = "bfloat16"
  cfg = ModelConfig.from_config(m)
  fam = generation.family(cfg)
  model = build_model(cfg)
  if FLAGS.ternary_product:
    packed.PRODUCT = FLAGS.ternary_product
  ternary_kernel.MODE = "auto" if FLAGS.decode_kernel else "off"
  ternary_kernel.BLOCK_ELEMS = FLAGS.kernel_block_elems or ternary_kernel.BLOCK_ELEMS
  ternary_kernel.NUM_WARPS = FLAGS.kernel_num_warps or ternary_kernel.NUM_WARPS
  if FLAGS.kernel_prologues is not None:
    chosen = tuple(v for v in FLAGS.kernel_prologues if v)
    known = [p for p in ternary_kernel.PRES if p]
    if set(chosen) - set(known):
      raise app.UsageError(f"--kernel_prologues={','.join(chosen)}: expected a subset of {known}")
    ternary_kernel.PROLOGUES = chosen
  params = random_params(cfg, model)
  weights = packed.weight_bytes(params)
  sampling = generation.Sampling()
  key = jax.random.key(0)

  @jax.jit
  def prefill(w, tokens, valid):
    return generation.prefill(cfg, fam.prepare(cfg, w), tokens, valid, tokens.shape[1] + FLAGS.new_tokens)

  @jax.jit
  def decode(w, logits, cache):
    return generation.decode_loop(cfg, fam.prepare(cfg, w), logits, cache, key, -1, 0, FLAGS.new_tokens,
                                  sampling, unroll_layers=FLAGS.unroll_layers)

  out = {"model": f"{os.path.basename(config_path)[:-3]}:{arch}", "arch": arch, "d_model": cfg.d_model,
         "n_layers": cfg.n_layers, "dtype": cfg.dtype,
         "weights": f"packed ternary (2 bit) + {cfg.dtype}" if arch == "hgrn_bit" else f"{cfg.dtype} dense",
         "batch": 1, "new_tokens": FLAGS.new_tokens, "unroll_layers": FLAGS.unroll_layers,
         "ternary_product": packed.default_product() if arch == "hgrn_bit" else None,
         "decode_kernel": ({"enabled": ternary_kernel.enabled(), "block_elems": ternary_kernel.BLOCK_ELEMS,
                            "num_warps": ternary_kernel.NUM_WARPS, "prologues": list(ternary_kernel.PROLOGUES)}
                           if arch == "hgrn_bit" else None),
         "xla_flags": os.environ.get("XLA_FLAGS", "")}
  rng = np.random.default_rng(0)
  for name, plen in (("generate", FLAGS.prompt_len), ("long", FLAGS.long_context - FLAGS.new_tokens)):
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (1, plen)), jnp.int32)
    valid = jnp.ones((1, plen), bool)
    t_pre = _median_time(lambda: prefill(params, tokens, valid), FLAGS.repeats)
    logits, cache = prefill(params, tokens, valid)
    t_dec = _median_time(lambda: decode(params, logits, cache), FLAGS.repeats)
    steps = int(decode(params, logits, cache)[1])
    if FLAGS.profile_top and name == "generate":
      with trace.Trace() as t:
        jax.block_until_ready(decode(params, logits, cache))
      t.print_table(per=steps, unit="token", top=FLAGS.profile_top, prefix=f"PROFILE {arch}")
    out[name] = {"prompt_len": plen, "prefill_s": t_pre, "decode_s": t_dec,
                 "decode_tokens_per_s": steps / t_dec,
                 "end_to_end_tokens_per_s": FLAGS.new_tokens / (t_pre + t_dec),
                 "state_bytes": fam.state_bytes(cfg, 1, plen + FLAGS.new_tokens)}
  stats = jax.devices()[0].memory_stats() or {}
  out["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  out["weight_bytes"] = weights
  out["inference_bytes_at_long_context"] = weights + out["long"]["state_bytes"]
  return out


def _versions() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version()}


def main(argv):
  del argv
  if FLAGS.only:
    cfg_path, arch = FLAGS.only.split("|")
    print("RESULT " + json.dumps(run_one(cfg_path, arch)), flush=True)
    return
  import jax  # pylint: disable=g-import-not-at-top
  device = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
  common = {"device": device, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python", "-m", "benchmarks.inference"] + sys.argv[1:]), "versions": _versions()}
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  passthrough = [f"--prompt_len={FLAGS.prompt_len}", f"--new_tokens={FLAGS.new_tokens}",
                 f"--long_context={FLAGS.long_context}", f"--repeats={FLAGS.repeats}",
                 f"--unroll_layers={FLAGS.unroll_layers}", f"--profile_top={FLAGS.profile_top}"]
  passthrough += [f"--ternary_product={FLAGS.ternary_product}"] if FLAGS.ternary_product else []
  passthrough += [f"--decode_kernel={FLAGS.decode_kernel}"]
  passthrough += [f"--kernel_block_elems={FLAGS.kernel_block_elems}"] if FLAGS.kernel_block_elems else []
  passthrough += [f"--kernel_num_warps={FLAGS.kernel_num_warps}"] if FLAGS.kernel_num_warps else []
  if FLAGS.kernel_prologues is not None:
    passthrough += [f"--kernel_prologues={','.join(FLAGS.kernel_prologues)}"]
  for cfg_path in FLAGS.config:
    for arch in [a for a in ARCHS if a in FLAGS.arch]:
      proc = subprocess.run([sys.executable, "-m", "benchmarks.inference", f"--only={cfg_path}|{arch}"] + passthrough,
                            capture_output=True, text=True, check=False)
      print("\n".join(l for l in proc.stdout.splitlines() if l.startswith("PROFILE ")), flush=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if proc.returncode or not lines:
        print(f"{cfg_path} {arch}: failed\n{proc.stderr[-3000:]}", flush=True)
        continue
      row = dict(common, **json.loads(lines[-1][len("RESULT "):]))
      with open(FLAGS.out, "a") as f:
        f.write(json.dumps(row) + "\n")
      g, l = row["generate"], row["long"]
      peak = row["peak_bytes_in_use"]
      print(f"{row['model']:<26} gen {g['end_to_end_tokens_per_s']:8.1f} tok/s "
            f"(prefill {g['prefill_s'] * 1e3:7.1f} ms, "
            f"decode {g['decode_tokens_per_s']:8.1f} tok/s)  decode@{FLAGS.long_context} "
            f"{l['decode_tokens_per_s']:8.1f} tok/s  weights {row['weight_bytes'] / 2**20:8.1f} MiB  "
            f"state {l['state_bytes'] / 2**20:8.2f} MiB  peak "
            f"{'n/a' if peak is None else f'{peak / 2**20:.0f} MiB'}", flush=True)


FLAGS = flags.FLAGS

if __name__ == "__main__":
  app.run(main)
