"""The study's descriptive statistics and their tables: per-seed values of a run, their spread, differences
paired by seed, and the markdown tables of means (summarize.py and summarize_roe.py). The claims' tests are
per item: inference.py and verdicts.py."""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_acc(row: dict[str, Any]) -> float:
  return float(np.mean([t["acc"] for t in row["tasks"].values()]))


def agreement(a: dict[str, Any], b: dict[str, Any]) -> float:
  """Share of items (all tasks pooled) with the same predicted choice in two evaluation rows."""
  same = [pa == pb for name in a["tasks"] for pa, pb in zip(a["tasks"][name]["predictions"],
                                                            b["tasks"][name]["predictions"])]
  return float(np.mean(same))


def per_seed(runs, name: str, fn) -> dict[int, float]:
  """fn(result) for every seed of run `name`; seeds where fn gives None are left out."""
  out = {}
  for seed, result in runs.get(name, {}).items():
    value = fn(result)
    if value is not None:
      out[seed] = value
  return out


def spread(values: dict[int, float]) -> tuple[float, float, int]:
  """(mean, standard deviation over seeds (ddof 1; 0 with one seed), number of seeds)."""
  v = np.array(list(values.values()), np.float64)
  if v.size == 0:
    return float("nan"), float("nan"), 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def paired(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
  return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def fmt(values: dict[int, float], digits: int = 3) -> str:
  m, s, n = spread(values)
  return "-" if n == 0 else f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_diff(values: dict[int, float], digits: int = 3) -> str:
  m, s, n = spread(values)
  if n == 0:
    return "-"
  wins = sum(v > 0 for v in values.values())
  return f"{m:+.{digits}f} ± {s:.{digits}f} ({wins}/{n} > 0)"




def acc_at(k: int):
  return lambda r: mean_acc(r["evaluation"][str(k)]) if str(k) in r["evaluation"] else None


def nll_at(k: int):
  return lambda r: r["evaluation"][str(k)]["heldout_nll"] if str(k) in r["evaluation"] else None


def self_agreement_at(k: int, k_pre: int):
  return lambda r: agreement(r["evaluation"][str(k)], r["evaluation"][str(k_pre)])


def oracle_family_agreement(runs, k: int, k_pre: int) -> dict[int, float]:
  """oracle_k at k against oracle_{k_pre} at k_pre, per seed."""
  out = {}
  for seed, low in runs.get(f"oracle_k{k}", {}).items():
    high = runs.get(f"oracle_k{k_pre}", {}).get(seed)
    if high is not None:
      out[seed] = agreement(low["evaluation"][str(k)], high["evaluation"][str(k_pre)])
  return out


def oracle_curve(runs, ks, fn_at) -> dict[int, dict[int, float]]:
  """The oracle family as one curve: at each k, oracle_k evaluated at its own k."""
  return {k: per_seed(runs, f"oracle_k{k}", fn_at(k)) for k in ks}


def table(title: str, values: dict[str, dict[int, dict[int, float]]], ks, k_pre: int, digits: int = 3) -> str:
  head = "| method | " + " | ".join(f"k={k}" + (" (k_pre)" if k == k_pre else "") for k in ks) + " |"
  lines = [f"**{title}** (mean ± std over seeds)", "", head, "|---" * (len(ks) + 1) + "|"]
  for method, by_k in values.items():
    lines.append(f"| {method} | " + " | ".join(fmt(by_k.get(k, {}), digits) for k in ks) + " |")
  return "\n".join(lines)






def as_json(values: dict[str, dict[int, dict[int, float]]]) -> dict[str, Any]:
  """method -> k -> {mean, std, seeds} (what study_results.ipynb plots)."""
  out = {}
  for method, by_k in values.items():
    out[method] = {}
    for k, per in by_k.items():
      m, s, n = spread(per)
      if n:
        out[method][str(k)] = {"mean": m, "std": s, "seeds": n}
  return out
