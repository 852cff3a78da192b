"""Kernel tilings named in a benchmark's spec (`pallas:64:32:1:1`) or `--set` flag: module constants set for a
block, restored after."""

import contextlib
import importlib

from absl import app


@contextlib.contextmanager
def _assigned(assignments):
  """Sets each (module, constant, value) of `assignments` while the block runs, then restores them."""
  saved = []
  try:
    for mod, const, value in assignments:
      saved.append((mod, const, getattr(mod, const)))
      setattr(mod, const, value)
    yield
  finally:
    for mod, const, value in reversed(saved):
      setattr(mod, const, value)


def kernel_tiling(module, names: tuple[str, ...], spec: str, params: list[str]):
  """Sets `module.<names>` to the integers `params` (none: the defaults) while the block runs, then restores them.

  A malformed spec is a usage error that says what it expects."""
  if params and (len(params) != len(names) or not all(p.lstrip("-").isdigit() for p in params)):
    want = ":".join([spec.split(":")[0]] + [f"<{n.lower()}>" for n in names])
    raise app.UsageError(f"{spec!r}: expected {want} (integers)")
  return _assigned([(module, n, int(v)) for n, v in zip(names, params)])


def parse_settings(setting: str) -> list[tuple[str, str, object]]:
  """`module.CONSTANT=value,...` (a `--set` flag; value an integer or None) as (module, constant, value) triples."""
  out = []
  for item in filter(None, setting.split(",")):
    name, _, value = item.partition("=")
    module, _, const = name.strip().partition(".")
    if not const or not value or not (value.lstrip("-").isdigit() or value == "None"):
      raise app.UsageError(f"--set: expected module.CONSTANT=<integer or None>, not {item!r}")
    out.append((module, const, None if value == "None" else int(value)))
  return out


PACKAGES = ("mmfree_jax.layers", "mmfree_jax.train")  # where `--set` looks for a module, in this order


def _module(name: str):
  for package in PACKAGES:
    try:
      return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{package}.{name}":  # the module exists but an import inside it failed
        raise
  raise app.UsageError(f"--set: no module {name} in {' or '.join(PACKAGES)}")


def layer_constants(setting: str):
  """Sets the constants `parse_settings(setting)` names on `mmfree_jax.layers.<module>` or `mmfree_jax.train.<module>`
  while the block runs (kernel tilings and walks: a kernel reads them when it is traced), then restores them."""
  assignments = []
  for module, const, value in parse_settings(setting):
    mod = _module(module)
    if not hasattr(mod, const):
      raise app.UsageError(f"--set: {mod.__name__} has no {const}")
    assignments.append((mod, const, value))
  return _assigned(assignments)
