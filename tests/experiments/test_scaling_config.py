"""The scaling sweep's points: names resolve to configs, sizes and compute follow the stated rules."""

import math

import pytest

from experiments.configs import scaling
from mmfree_jax import flops


def test_default_grid():
  points = scaling.sweep()
  assert len(points) == 10
  for family in ("mmfree", "transformer"):
    fam = [p for p in points if p["family"] == family]
    assert len(fam) == 5
    params = [p["non_embedding_params"] for p in fam]
    assert params == sorted(params) and params[0] < 1e6 < params[-1]
    compute = [p["flops"] for p in fam]
    assert math.log10(compute[-1] / compute[0]) >= 1.5
  assert sum(p["flops"] for p in points) < 3e16  # about 10 minutes of one H100


@pytest.mark.parametrize("arg", ["", "cpu_smoke"])
def test_points_resolve_to_configs(arg):
  for p in scaling.sweep(arg):
    c = scaling.get_config(p["name"])
    assert c.model.arch == p["arch"] and c.model.vocab_size == 384 and c.data.source == "embedded"
    assert c.train.steps % c.eval.every_steps == 0
    tokens = c.train.steps * c.train.global_batch * c.data.seq_len
    assert p["tokens"] == tokens
    assert p["flops"] == pytest.approx(flops.train_flops(c.model, c.data.seq_len, tokens))
    assert p["params"] == flops.param_counts(c.model)["params"]


def test_lr_rules_and_errors():
  assert scaling.peak_lr("mmfree", scaling.N_REF) == pytest.approx(4e-3)
  assert scaling.peak_lr("transformer", scaling.N_REF) == pytest.approx(3e-4)
  assert scaling.peak_lr("transformer", 1e3) == 3e-3
  with pytest.raises(ValueError):
    scaling.get_config("nope")
  with pytest.raises(ValueError):
    scaling.sweep("nope")
