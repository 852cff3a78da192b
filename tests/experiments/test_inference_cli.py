"""Smoke tests of the inference entry points, chained: import (library) -> export -> generate (packed) -> evaluate.

`experiments.import_hf` is a thin wrapper of `hf_import.import_hf`, which tests/inference checks in depth; its
flags are checked here by parsing them without running it.
"""

import json
import os
import subprocess
import sys

from experiments.configs import tiny
from mmfree_jax.inference import hf_import
from tests.inference.helpers import write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_import_export_generate_evaluate(tmp_path):
  hf, wd, out = tmp_path / "hf", tmp_path / "wd", tmp_path / "export"
  write_hf_checkpoint(hf, hidden=32, layers=2, vocab=300)
  hf_import.import_hf(str(hf), str(wd), tiny.get_config())
  usage = subprocess.run([sys.executable, "-m", "experiments.import_hf", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=False, env=dict(os.environ, PYTHONPATH=ROOT))
  assert "--hf_dir" in usage.stdout + usage.stderr and "--workdir" in usage.stdout + usage.stderr
  assert (wd / "config.json").is_file() and (wd / "checkpoints" / "0").is_dir()
  log = _run("experiments.export", f"--workdir={wd}", f"--out={out}")
  assert "exported step 0" in log
  assert json.loads((out / "config.json").read_text())["inference"]["format"] == "packed-ternary-v1"
  text = _run("experiments.generate", f"--workdir={out}", "--prompt=def ", "--prompt=import", "--max_new_tokens=6")
  assert text.count(" -> ") == 2
  task = tmp_path / "arc_easy.jsonl"
  docs = [{"id": str(i), "question": f"What is {i}?", "answerKey": "B",
           "choices": {"text": ["one", "two", "three"], "label": ["A", "B", "C"]}} for i in range(3)]
  task.write_text("".join(json.dumps(d) + "\n" for d in docs))
  table = _run("experiments.evaluate", f"--workdir={wd}", f"--task={task}", "--batch_size=4", "--max_len=64")
  assert "arc_easy" in table and "acc_norm" in table
  res = json.loads((wd / "eval_arc_easy.json").read_text())
  assert res["n"] == 3 and res["format"] == "arc" and 0 <= res["acc"] <= 1
