"""Puts the fake cluster programs of `fake_bin.py` on PATH for a test and reads back what they were asked."""

import json
import pathlib
import sys

FAKE_BIN = pathlib.Path(__file__).with_name("fake_bin.py")
FAKE_TRAIN = pathlib.Path(__file__).resolve().parents[1] / "scaling" / "fake_train.py"
PROGRAMS = ("gcloud", "sbatch", "srun", "squeue", "pip")


class Fakes:
  """The fake programs' bin directory, call log and fake remote home."""

  def __init__(self, tmp_path: pathlib.Path, monkeypatch):
    self.bin = tmp_path / "bin"
    self.log = tmp_path / "calls.jsonl"
    self.remote = tmp_path / "remote"
    self.bin.mkdir()
    self.remote.mkdir()
    for prog in PROGRAMS:
      path = self.bin / prog
      path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_BIN} {prog} "$@"\n')
      path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{self.bin}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_LOG", str(self.log))
    monkeypatch.setenv("FAKE_REMOTE", str(self.remote))

  def calls(self, prog: str | None = None) -> list[list[str]]:
    if not self.log.exists():
      return []
    rows = [json.loads(line) for line in self.log.read_text().splitlines()]
    return [[r["prog"]] + r["argv"] for r in rows if prog is None or r["prog"] == prog]
