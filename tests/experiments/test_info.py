"""`experiments.info`: the summary's last line is JSON with exact parameter counts."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _info(config: str) -> dict:
  out = subprocess.run([sys.executable, "-m", "experiments.info", f"--config={config}"], cwd=REPO, check=True,
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("name,params", [("370m", 374_108_160), ("1p3b", 1_364_779_008), ("2p7b", 2_702_357_504)])
def test_mmfree_presets_exact(name, params):
  s = _info(f"experiments/configs/{name}.py")
  assert s["arch"] == "hgrn_bit" and s["params"] == params
  assert s["non_embedding_params"] == params - 32000 * s["d_model"]
  assert s["train_flops_per_token"] == pytest.approx(3 * s["forward_flops_per_token"])
  # Dense matmuls dominate: 2 FLOPs per parameter per token, plus the recurrence and element-wise terms.
  assert 2 * s["non_embedding_params"] < s["forward_flops_per_token"] < 2.2 * s["params"]


def test_transformer_variant():
  s = _info("experiments/configs/1p3b.py:transformer")
  assert s["arch"] == "transformer" and s["d_model"] == 2048 and s["n_layers"] == 24
