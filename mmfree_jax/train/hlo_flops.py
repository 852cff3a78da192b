"""Matmul FLOPs of a lowered (StableHLO) program, each loop body counted as many times as it runs.

XLA's `cost_analysis()` counts the body of a `while` loop once; the models scan their layers and the train
step scans its micro-batches, so its total misses (layers - 1) layers and (micro-batches - 1) micro-batches.
This module walks the lowered module's text instead: every `stablehlo.dot_general` is
2 x (result elements) x (contracted size) FLOPs, multiplied by the trip counts of the `stablehlo.while` loops
around it (the constant bound of the `cond` region's `LT` compare) and followed through `func.call`s.
Shapes are global (the program before partitioning), so the result is the whole step's, on all chips.
"""

import math
import re

_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$-]+)\(")
_CALL = re.compile(r"(?:func\.)?call @([\w.$-]+)\(")
_DOT = re.compile(r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x \[[\d, ]*\].*"
                  r": \(tensor<([^>]*)>, tensor<[^>]*>\) -> tensor<([^>]*)>")
_CONST = re.compile(r"(%[\w.]+) = stablehlo\.constant dense<(\d+)> : tensor<i(?:32|64)>")
_LT = re.compile(r"stablehlo\.compare\s+LT, %[\w.]+, (%[\w.]+)")


def _dims(tensor_type: str) -> list[int]:
  return [int(s) for s in tensor_type.split("x")[:-1]]  # "8x256x384xf32" -> [8, 256, 384]


def _dot_flops(line: str) -> float:
  m = _DOT.search(line)
  if not m:
    return 0.0
  contracting = [int(s) for s in m.group(1).replace(" ", "").split(",") if s]
  lhs, out = _dims(m.group(2)), _dims(m.group(3))
  return 2.0 * math.prod(out) * math.prod(lhs[i] for i in contracting)


def _functions(text: str) -> dict[str, list[str]]:
  funcs, name = {}, None
  for line in text.splitlines():
    m = _FUNC.match(line)
    if m:
      name = m.group(1)
      funcs[name] = []
    elif name is not None:
      funcs[name].append(line)
  return funcs


def _local(lines: list[str], loops: bool) -> tuple[float, dict[str, float]]:
  """(dot FLOPs, {callee: times called}) of one function body, loops expanded by their trip counts."""
  flops, calls = 0.0, {}
  stack: list[list] = []  # [indent, trip count, in cond?, constants seen in cond]
  for line in lines:
    indent = len(line) - len(line.lstrip())
    stripped = line.strip()
    if stack and indent == stack[-1][0] and stripped.startswith("}"):
      if stripped.startswith("} do {"):
        stack[-1][2] = False
      else:
        stack.pop()
      continue
    if stack and stack[-1][2]:
      c = _CONST.search(line)
      if c:
        stack[-1][3][c.group(1)] = int(c.group(2))
      lt = _LT.search(line)
      if lt and lt.group(1) in stack[-1][3]:
        stack[-1][1] = stack[-1][3][lt.group(1)]
      continue
    times = math.prod(f[1] for f in stack) if loops else 1
    if "stablehlo.while(" in line:
      stack.append([indent, 1, True, {}])
      continue
    flops += times * _dot_flops(line)
    for callee in _CALL.findall(line):
      calls[callee] = calls.get(callee, 0) + times
  return flops, calls


def matmul_flops(text: str, loops: bool = True, entry: str = "main") -> float:
  """Dot FLOPs of the module `text` (`jax.jit(f).lower(...).as_text()`), from `entry`; `loops=False` counts
  every loop body once, as XLA's cost analysis does."""
  funcs = _functions(text)
  local = {name: _local(lines, loops) for name, lines in funcs.items()}
  memo: dict[str, float] = {}

  def total(name: str) -> float:
    if name not in memo:
      memo[name] = 0.0  # guards against recursion, which StableHLO does not have
      own, calls = local.get(name, (0.0, {}))
      memo[name] = own + sum(n * total(callee) for callee, n in calls.items())
    return memo[name]

  return total(entry)
