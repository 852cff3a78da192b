"""Scaling-law fits on synthetic results drawn from known laws with noise."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mmfree_jax.scaling import fit

TRUE = {"transformer": dict(E=1.8, A=3000.0, alpha=0.2), "mmfree": dict(E=1.5, A=30000.0, alpha=0.25)}


def _records(seed=1, noise=0.003, n=8):
  rng = np.random.default_rng(seed)
  out = []
  for fam, p in TRUE.items():
    for c in np.logspace(15, 19, n):
      out.append(dict(name=f"{fam}-{c:.0e}", family=fam, flops=float(c),
                      loss=float(fit.predict("power_law", p, c) * (1 + noise * rng.standard_normal()))))
  return out


def _true_crossing():
  f = lambda fam: (lambda c: fit.predict("power_law", TRUE[fam], c))
  (c,) = fit.crossings(f("mmfree"), f("transformer"), 1e10, 1e30)
  return c


def test_recovers_laws_and_crossing():
  result = fit.fit_results(_records(), n_boot=60)
  fams = result["forms"]["power_law"]["families"]
  for fam, p in TRUE.items():
    got = fams[fam]["params"]
    assert got["alpha"] == pytest.approx(p["alpha"], rel=0.1)
    assert got["E"] == pytest.approx(p["E"], rel=0.05)
    lo, hi = fams[fam]["interval"]["alpha"]
    assert lo <= got["alpha"] <= hi
  true = _true_crossing()
  lo, hi = result["crossing_interval"]
  assert lo <= true <= hi
  assert result["crossing_flops"] == pytest.approx(true, rel=0.2)
  assert result["form"] == "power_law" and result["crossing_fraction"] > 0.9
  ll = result["forms"]["log_linear"]
  assert ll["crossing_flops"] is not None and ll["families"]["mmfree"]["params"]["b"] > 0


def test_log_linear_exact():
  c = np.logspace(13, 17, 5)
  f = fit.fit_family("log_linear", c, 10.0 - 0.4 * np.log10(c))
  assert f.params["a"] == pytest.approx(10.0, rel=1e-6) and f.params["b"] == pytest.approx(0.4, rel=1e-6)


def test_no_crossing_statement():
  recs = [dict(family=fam, flops=float(c), loss=float(off + 2000 * c ** -0.2))
          for fam, off in (("mmfree", 2.0), ("transformer", 1.8)) for c in np.logspace(15, 19, 6)]
  result = fit.fit_results(recs, n_boot=20)
  assert result["crossing_flops"] is None and "do not cross" in result["statement"]


def test_cli_writes_fit_and_plot(tmp_path):
  results = tmp_path / "results.jsonl"
  results.write_text("".join(json.dumps(r) + "\n" for r in _records()))
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "experiments.fit_scaling", str(results), f"--out={out}",
                         "--n_boot=20"], capture_output=True, text=True, timeout=120,
                        cwd=pathlib.Path(__file__).resolve().parents[2])
  assert proc.returncode == 0, proc.stderr
  data = json.loads((out / "fit.json").read_text())
  assert data["crossing_flops"] and len(data["crossing_interval"]) == 2
  assert (out / "scaling.png").stat().st_size > 10000
