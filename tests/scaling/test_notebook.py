"""Runs experiments/scaling_law.ipynb headless on the synthetic example sweep in tests/scaling/data."""

import os
import pathlib

import nbclient
import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_notebook_runs(monkeypatch, tmp_path):
  monkeypatch.setenv("SCALING_SWEEP_DIR", str(pathlib.Path(__file__).with_name("data")))
  monkeypatch.setenv("SCALING_N_BOOT", "20")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  nb = nbformat.read(ROOT / "experiments" / "scaling_law.ipynb", as_version=4)
  nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT / "experiments")}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "synthetic" in text and "cross" in text
  assert "power_law" in text and "log_linear" in text
