"""Kernel tilings named in a benchmark's spec (`pallas:64:32:1:1`): module constants set per spec, reset after."""

import contextlib

from absl import app


@contextlib.contextmanager
def kernel_tiling(module, names: tuple[str, ...], spec: str, params: list[str]):
  """Sets `module.<names>` to the integers `params` (none: the defaults) while the block runs, then restores them.

  A malformed spec is a usage error that says what it expects."""
  if params and (len(params) != len(names) or not all(p.lstrip("-").isdigit() for p in params)):
    want = ":".join([spec.split(":")[0]] + [f"<{n.lower()}>" for n in names])
    raise app.UsageError(f"{spec!r}: expected {want} (integers)")
  defaults = {n: getattr(module, n) for n in names}
  try:
    for n, v in zip(names, params):
      setattr(module, n, int(v))
    yield
  finally:
    for n, v in defaults.items():
      setattr(module, n, v)
