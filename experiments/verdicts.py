"""Every claim of the study as paired per-item comparisons (inference.py): accuracy and answer NLL, each
item of each seed compared between two (run, k) evaluations, pooled over seeds with a bootstrap 95%
interval; Holm's correction over all of a report's comparisons; the verdict words tied to them.

An outcome is read from study_eval.json: per task, "correct" (1/0) and "answer_nll" per item. Both endpoints
are oriented so that a positive difference means the first evaluation is better (NLL: B minus A).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from experiments import inference

ENDPOINTS = {"accuracy": ("correct", +1), "answer NLL": ("answer_nll", -1)}


@dataclasses.dataclass(frozen=True)
class Test:
  claim: str  # the claim or ablation it belongs to
  name: str  # what is compared, e.g. "k=1"
  endpoint: str  # a key of ENDPOINTS
  expected: int  # +1: the claim says the difference is positive; 0: no direction claimed
  comparison: inference.Comparison


def outcomes(result: Mapping[str, Any], k: int, key: str) -> Optional[np.ndarray]:
  """One evaluation's per-item values `key` ("correct", "answer_nll", "predictions"), tasks in sorted order,
  or None."""
  row = result["evaluation"].get(str(k))
  if row is None or any(key not in task for task in row["tasks"].values()):
    return None
  return np.concatenate([np.asarray(row["tasks"][name][key], np.float64) for name in sorted(row["tasks"])])


def differences(runs, a: tuple[str, int], b: tuple[str, int], endpoint: str) -> dict[int, np.ndarray]:
  """seed -> per-item (A - B) oriented so that positive = A better, for seeds where both exist."""
  key, sign = ENDPOINTS[endpoint]
  out = {}
  for seed, result_a in runs.get(a[0], {}).items():
    result_b = runs.get(b[0], {}).get(seed)
    if result_b is None:
      continue
    x, y = outcomes(result_a, a[1], key), outcomes(result_b, b[1], key)
    if x is not None and y is not None and x.shape == y.shape:
      out[seed] = sign * (x - y)
  return out


def agreement_with(result, k: int, reference: tuple[Any, int]) -> Optional[np.ndarray]:
  """Per item: 1 if the prediction at k equals the reference evaluation's prediction."""
  x, y = outcomes(result, k, "predictions"), outcomes(*reference, "predictions")
  return None if x is None or y is None else (x == y).astype(np.float64)


def agreement_differences(runs, a: str, b: str, k: int, k_pre: int,
                          b_reference: Optional[str] = None) -> dict[int, np.ndarray]:
  """seed -> per item: agreement of run a at k with itself at k_pre, minus that of run b at k with
  `b_reference` (default b itself) at k_pre."""
  out = {}
  for seed, result_a in runs.get(a, {}).items():
    result_b, ref = runs.get(b, {}).get(seed), runs.get(b_reference or b, {}).get(seed)
    if result_b is None or ref is None:
      continue
    x, y = agreement_with(result_a, k, (result_a, k_pre)), agreement_with(result_b, k, (ref, k_pre))
    if x is not None and y is not None and x.shape == y.shape:
      out[seed] = x - y
  return out


def kappa(runs, name: str, k: int, reference: str, k_ref: int) -> Optional[float]:
  """Cohen's kappa of run `name` at k against run `reference` at k_ref, items of every seed pooled."""
  xs, ys = [], []
  for seed, result in runs.get(name, {}).items():
    ref = runs.get(reference, {}).get(seed)
    x, y = outcomes(result, k, "predictions"), None if ref is None else outcomes(ref, k_ref, "predictions")
    if x is not None and y is not None:
      xs.append(x)
      ys.append(y)
  if not xs:
    return None
  return inference.cohen_kappa(np.concatenate(xs), np.concatenate(ys))


# A planned comparison: (claim, name, expected sign, {endpoint: seed -> per-item differences})
Planned = tuple[str, str, int, dict[str, dict[int, np.ndarray]]]


def both_endpoints(runs, a: tuple[str, int], b: tuple[str, int]) -> dict[str, dict[int, np.ndarray]]:
  """{endpoint: seed -> per-item (A - B)} for accuracy and answer NLL."""
  return {endpoint: differences(runs, a, b, endpoint) for endpoint in ENDPOINTS}


def tests(runs, ks: Sequence[int], k_pre: int, extra: Sequence[Planned] = ()) -> list[Test]:
  """Every comparison of the report (the study's claims and ablations, then `extra`: RoE's), Holm-corrected
  together."""
  return corrected([*plan(runs, ks, k_pre), *extra])


def plan(runs, ks: Sequence[int], k_pre: int) -> list[Planned]:
  """The study's claims (a)-(e) and ablations as planned comparisons."""
  low = [k for k in ks if k < k_pre]
  sft = f"oracle_k{k_pre}"  # plain SFT at k_pre
  planned = []
  both = lambda a, b: both_endpoints(runs, a, b)

  for k in low:
    planned.append(("(a) the base at k minus at k_pre", f"k={k}", 0, both(("base", k), ("base", k_pre))))
  for k in ks:
    planned.append(("(b) PHDS minus the oracle fine-tuned at k", f"k={k}", +1, both(("phds", k), (f"oracle_k{k}", k))))
  for k in low:
    planned.append(("(b) PHDS minus plain SFT at k_pre, both dialled to k", f"k={k}", +1,
                 both(("phds", k), (sft, k))))
  for k in low:
    planned.append(("(c) agreement with k_pre: PHDS (within one checkpoint) minus the oracle family", f"k={k}", +1,
                 {"agreement": agreement_differences(runs, "phds", f"oracle_k{k}", k, k_pre, sft)}))
    planned.append(("(c) agreement with k_pre within one checkpoint: PHDS minus plain SFT at k_pre", f"k={k}", +1,
                 {"agreement": agreement_differences(runs, "phds", sft, k, k_pre)}))
  lowest = min(ks)
  for k in ks:
    planned.append(("(d) PHDS with anchoring minus without", f"k={k}", +1 if k == lowest else 0,
                 both(("phds", k), ("phds_no_anchor", k))))
  for k in low:
    gap = {}
    for endpoint in ENDPOINTS:
      at_k = differences(runs, ("phds_train_attention", k), ("phds_train_experts", k), endpoint)
      at_pre = differences(runs, ("phds_train_attention", k_pre), ("phds_train_experts", k_pre), endpoint)
      gap[endpoint] = {s: at_k[s] - at_pre[s] for s in at_k if s in at_pre}
    planned.append(("(e) attention-only minus experts-only fine-tuning, at k minus at k_pre", f"k={k}", +1, gap))
  for name in ("phds_eps_1e-3", "phds_eps_1e-9", "phds_hard_mask", "phds_bf16", "phds_eps_1e-3_bf16",
               "phds_hard_mask_bf16", "phds_narrow_k"):
    reference = "phds_bf16" if name.endswith("_bf16") and name != "phds_bf16" else "phds"
    for k in ks:
      planned.append((f"ablation: {name} minus {reference}", f"k={k}", 0, both((name, k), (reference, k))))
  return planned


def corrected(planned: Sequence[Planned]) -> list[Test]:
  """Each planned comparison's bootstrap interval and p, Holm-corrected over all of them."""
  raw = {}
  for i, (claim, name, expected, by_endpoint) in enumerate(planned):
    for endpoint, diffs in by_endpoint.items():
      if diffs:
        raw[(i, endpoint)] = (claim, name, endpoint, expected, inference.paired(diffs, seed=i))
  corrected = inference.holm({key: value[-1] for key, value in raw.items()})
  return [Test(claim, name, endpoint, expected, corrected[key])
          for key, (claim, name, endpoint, expected, _) in raw.items()]


def markdown(found: Sequence[Test], figures: Optional[Mapping[str, str]] = None) -> list[str]:
  """One table per claim: the difference with its 95% interval, Holm's p and the verdict; `figures` (claim
  -> PNG name) puts each figure after the last table it shows."""
  lines = []
  claims = list(dict.fromkeys(t.claim for t in found))
  for i, claim in enumerate(claims):
    mine = [t for t in found if t.claim == claim]
    lines += [f"**{claim}**", "", "| compared | endpoint | difference [95% CI] | items | Holm p | verdict |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {t.name} | {t.endpoint} | {t.comparison.fmt()} | {t.comparison.n} | {t.comparison.p_holm:.3g} "
              f"| {t.comparison.verdict(t.expected)} |" for t in mine]
    lines.append("")
    png = (figures or {}).get(claim)
    if png and all((figures or {}).get(later) != png for later in claims[i + 1:]):
      lines += [f"![{png}]({png})", ""]
  return lines


def power_line(runs, ks: Sequence[int]) -> str:
  """The power to detect an accuracy difference of 0.02 with this many items, from the spread of the
  per-item differences of PHDS and the oracles (before the correction)."""
  by_k = [differences(runs, ("phds", k), (f"oracle_k{k}", k), "accuracy") for k in ks]
  pooled = [d for diffs in by_k for d in diffs.values()]
  if not pooled:
    return ""
  values = np.concatenate(pooled)
  n = max(sum(len(d) for d in diffs.values()) for diffs in by_k)
  sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
  return (f"Power: with {n} paired items per comparison (seeds pooled) and a per-item standard deviation of "
          f"{sd:.3f} (PHDS vs the oracles), a true accuracy difference of 0.02 is found with probability "
          f"{inference.power(sd, n, 0.02):.2f} at the 5% level, before the correction for multiple tests.")
