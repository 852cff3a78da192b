"""Scaling-law fits of final loss against training compute, per model family, and where the families cross.

Two forms, each fitted per family with `scipy.optimize.least_squares`:
  power_law   `L(C) = E + A * C^(-alpha)`: residuals in log space (log L_fit - log L), soft_l1 robust loss,
              several starting points (the best kept); E >= 0, 0 < alpha < 3.
  log_linear  `L(C) = a - b * log10(C)`: the straight line of the paper's figure (soft_l1 as well).
Confidence intervals: bootstrap, resampling each family's points with replacement and refitting (percentile
intervals, 95% by default). The crossing compute of two families is the first C in the search range where
their fitted curves meet; its interval comes from the bootstrap fits, together with the fraction of resamples
that cross in the range at all. The default range runs from the smallest compute of the data to 1e27. When the central fit does not cross in the range, the result says so.
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np
from scipy import optimize

FORMS = ("power_law", "log_linear")
C_REF = 1e18  # compute is scaled by this inside the fits (conditioning); parameters are reported unscaled
DEFAULT_RANGE = (0.0, 1e27)  # 0: from the smallest compute of the data


@dataclasses.dataclass
class FamilyFit:
  form: str
  params: dict[str, float]
  n_points: int

  def predict(self, c: Any) -> np.ndarray:
    return predict(self.form, self.params, c)


def predict(form: str, params: dict[str, float], c: Any) -> np.ndarray:
  """The fitted loss at compute `c` (FLOPs)."""
  c = np.asarray(c, dtype=float)
  if form == "power_law":
    return params["E"] + params["A"] * c ** (-params["alpha"])
  if form == "log_linear":
    return params["a"] - params["b"] * np.log10(c)
  raise ValueError(f"unknown form {form!r}")


def _power_law_starts(loss: np.ndarray) -> list[list[float]]:
  lmin = float(loss.min())
  starts = []
  for alpha0 in (0.03, 0.1, 0.3, 0.7):
    for e_frac in (0.0, 0.5, 0.9):
      e0 = e_frac * lmin
      starts.append([e0, math.log(max(float(np.mean(loss)) - e0, 1e-3)), alpha0])
  return starts


def _fit_power_law(c: np.ndarray, loss: np.ndarray, f_scale: float,
                   start: dict[str, float] | None = None) -> dict[str, float]:
  x = np.log(c / C_REF)
  def residuals(p):  # p = (E, log A', alpha), A' the amplitude at C_REF
    return np.log(p[0] + np.exp(p[1] - p[2] * x)) - np.log(loss)
  lmin = float(loss.min())
  starts = _power_law_starts(loss)
  if start is not None:  # a warm start (bootstrap): the central fit, and one generic start as a fallback
    amp = start["A"] * C_REF ** (-start["alpha"])
    starts = [[min(start["E"], 0.99 * lmin), math.log(max(amp, 1e-6)), start["alpha"]], starts[4]]
  best = None
  for p0 in starts:
    p0 = np.clip(p0, [0.0, -30.0, 1e-4], [lmin, 30.0, 3.0])
    try:
      r = optimize.least_squares(residuals, p0, loss="soft_l1", f_scale=f_scale,
                                 bounds=([0.0, -30.0, 1e-4], [lmin, 30.0, 3.0]), max_nfev=2000)
    except ValueError:
      continue
    if best is None or r.cost < best.cost:
      best = r
  e, log_amp, alpha = best.x
  return dict(E=float(e), A=float(math.exp(log_amp) * C_REF ** alpha), alpha=float(alpha))


def _fit_log_linear(c: np.ndarray, loss: np.ndarray, f_scale: float) -> dict[str, float]:
  x = np.log10(c / C_REF)
  slope, intercept = np.polyfit(x, loss, 1) if len(np.unique(x)) > 1 else (0.0, float(loss.mean()))
  r = optimize.least_squares(lambda p: (p[0] + p[1] * x - loss) / loss, [intercept, slope], loss="soft_l1",
                             f_scale=f_scale)
  a, s = r.x
  return dict(a=float(a - s * math.log10(C_REF)), b=float(-s))


def fit_family(form: str, compute: Sequence[float], loss: Sequence[float], f_scale: float = 0.02,
               start: dict[str, float] | None = None) -> FamilyFit:
  """Fits one family's (compute, loss) points with `form` (`start`: a previous fit to start from)."""
  c, l = np.asarray(compute, float), np.asarray(loss, float)
  if form == "power_law":
    params = _fit_power_law(c, l, f_scale, start)
  elif form == "log_linear":
    params = _fit_log_linear(c, l, f_scale)
  else:
    raise ValueError(f"unknown form {form!r}")
  return FamilyFit(form, params, len(c))


def crossings(f1: Callable[[np.ndarray], np.ndarray], f2: Callable[[np.ndarray], np.ndarray],
              lo: float, hi: float, n: int = 2000) -> list[float]:
  """Every compute in [lo, hi] where f1 and f2 meet (sign changes on a log grid, refined by brentq)."""
  logc = np.linspace(math.log10(lo), math.log10(hi), n)
  d = f1(10.0 ** logc) - f2(10.0 ** logc)
  out = []
  for i in np.nonzero(np.sign(d[:-1]) * np.sign(d[1:]) < 0)[0]:
    g = lambda t: float(f1(10.0 ** t) - f2(10.0 ** t))
    out.append(float(10.0 ** optimize.brentq(g, logc[i], logc[i + 1])))
  out += [float(10.0 ** logc[i]) for i in np.nonzero(d == 0)[0]]
  return sorted(out)


def _interval(samples: Sequence[float], level: float) -> list[float] | None:
  if len(samples) == 0:
    return None
  q = (1 - level) / 2
  return [float(np.quantile(samples, q)), float(np.quantile(samples, 1 - q))]


def fit_results(records: Sequence[dict[str, Any]], *, compute_key: str = "flops", loss_key: str = "loss",
                families: Sequence[str] = ("mmfree", "transformer"), n_boot: int = 300, level: float = 0.95,
                crossing_range: tuple[float, float] = DEFAULT_RANGE, seed: int = 0) -> dict[str, Any]:
  """Fits every form to each family of `records` (results.jsonl rows), with bootstrap intervals and the
  crossing of the two families. Returns the dict written to fit.json."""
  rng = np.random.default_rng(seed)
  data = {}
  for fam in families:
    rows = [r for r in records if r.get("family") == fam and r.get(loss_key) is not None]
    if len(rows) < 3:
      raise ValueError(f"family {fam!r} has {len(rows)} finished points; a fit needs at least 3")
    data[fam] = (np.array([float(r[compute_key]) for r in rows]), np.array([float(r[loss_key]) for r in rows]))
  lo, hi = crossing_range
  lo = lo or min(float(c.min()) for c, _ in data.values())
  out: dict[str, Any] = dict(compute_key=compute_key, crossing_range=[lo, hi], level=level, n_boot=n_boot,
                             data={f: dict(flops=c.tolist(), loss=l.tolist()) for f, (c, l) in data.items()},
                             forms={})
  for form in FORMS:
    central = {f: fit_family(form, *data[f]) for f in families}
    boot: dict[str, list[FamilyFit]] = {f: [] for f in families}
    for _ in range(n_boot):
      for f, (c, l) in data.items():
        idx = rng.integers(0, len(c), len(c))
        while len(np.unique(c[idx])) < 3:
          idx = rng.integers(0, len(c), len(c))
        boot[f].append(fit_family(form, c[idx], l[idx], start=central[f].params))
    fams = {}
    for f in families:
      names = central[f].params
      fams[f] = dict(params=central[f].params, n_points=central[f].n_points,
                     interval={k: _interval([b.params[k] for b in boot[f]], level) for k in names})
    entry: dict[str, Any] = dict(families=fams)
    if len(families) == 2:
      f1, f2 = families
      cross = crossings(central[f1].predict, central[f2].predict, lo, hi)
      samples = [x[0] for b1, b2 in zip(boot[f1], boot[f2]) if (x := crossings(b1.predict, b2.predict, lo, hi))]
      entry["crossing_flops"] = cross[0] if cross else None
      entry["all_crossings"] = cross
      entry["crossing_loss"] = float(central[f1].predict(cross[0])) if cross else None
      entry["crossing_interval"] = _interval(samples, level)
      entry["crossing_fraction"] = len(samples) / n_boot
      entry["statement"] = _statement(f1, f2, cross, entry["crossing_interval"], entry["crossing_fraction"], lo,
                                      hi, central, level)
    out["forms"][form] = entry
  primary = out["forms"]["power_law"]
  out["form"] = "power_law"
  for key in ("crossing_flops", "crossing_interval", "crossing_loss", "crossing_fraction", "statement"):
    out[key] = primary.get(key)
  return out


def _statement(f1: str, f2: str, cross: list[float], interval: list[float] | None, fraction: float, lo: float,
               hi: float, central: dict[str, FamilyFit], level: float) -> str:
  if not cross:
    better = f1 if central[f1].predict(hi) < central[f2].predict(hi) else f2
    return (f"the {f1} and {f2} fits do not cross between {lo:.0e} and {hi:.0e} FLOPs ({better} is lower "
            f"throughout); {fraction:.0%} of the bootstrap fits cross in that range")
  text = f"the {f1} and {f2} fits cross at {cross[0]:.2e} FLOPs"
  if interval:
    text += f" ({level:.0%} interval {interval[0]:.1e} .. {interval[1]:.1e}, {fraction:.0%} of bootstrap fits cross)"
  return text


COLORS = {"mmfree": "tab:red", "transformer": "tab:blue"}
LABELS = {"mmfree": "MatMul-free LM", "transformer": "Transformer++"}


def plot(result: dict[str, Any], path: str | None = None, ax: Any = None, x_max: float | None = None) -> Any:
  """Loss against compute (log x): each family's points, its power-law fit (solid) and log-linear fit
  (dashed), the crossing marked with a star. Saves to `path` if given; returns the axes."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  if ax is None:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  if ax is None:
    _, ax = plt.subplots(figsize=(7, 4.5))
  all_c = np.concatenate([np.asarray(d["flops"]) for d in result["data"].values()])
  cross = result.get("crossing_flops")
  hi = x_max or max(float(all_c.max()) * 10, (cross or 0) * 5)
  grid = np.logspace(math.log10(all_c.min() / 2), math.log10(hi), 200)
  for fam, d in result["data"].items():
    color = COLORS.get(fam)
    ax.scatter(d["flops"], d["loss"], color=color, zorder=3, label=f"{LABELS.get(fam, fam)} runs")
    for form, style in (("power_law", "-"), ("log_linear", "--")):
      params = result["forms"][form]["families"][fam]["params"]
      ax.plot(grid, predict(form, params, grid), style, color=color, alpha=0.8 if style == "-" else 0.5,
              label=f"{LABELS.get(fam, fam)} {form.replace('_', '-')} fit")
  if cross:
    ax.scatter([cross], [result["crossing_loss"]], marker="*", s=250, color="gold", edgecolor="k", zorder=4,
               label=f"crossing {cross:.1e} FLOPs")
    if result.get("crossing_interval"):
      ax.axvspan(*result["crossing_interval"], color="gold", alpha=0.15)
  ax.set_xscale("log")
  key = result.get("compute_key", "flops")
  ax.set_xlabel("training compute (FLOPs)" if key == "flops" else f"training compute ({key}, FLOPs)")
  ax.set_ylabel("held-out loss")
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  if path:
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
  return ax
