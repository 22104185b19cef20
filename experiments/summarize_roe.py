"""RESULTS.md's section "Roster of Experts" from experiments/roe.py's outputs (OUT/roe/): accuracy and
held-out NLL by (model, members, k), the chosen taus, decode cost (measured time and FLOPs per token), and
claims (i)-(iii) of issue 14 as per-item comparisons (verdicts.py), corrected with the report's others.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional, Sequence

from experiments import inference
from experiments import stats
from experiments import verdicts

MODELS = ("base", "phds")


def load(out: str) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, Any]]:
  """(model -> seed -> OUT/roe/seed<s>/<model>.json, OUT/roe/latency.json or {})."""
  results: dict[str, dict[int, dict[str, Any]]] = {}
  for path in sorted(glob.glob(os.path.join(out, "roe", "seed*", "*.json"))):
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
    results.setdefault(result["model"], {})[result["seed"]] = result
  latency_file = os.path.join(out, "roe", "latency.json")
  latency = json.load(open(latency_file, encoding="utf-8")) if os.path.isfile(latency_file) else {}
  return results, latency


def _value(runs, results, model: str, members: int, k: int, key: str) -> dict[int, float]:
  """seed -> mean accuracy (key "acc") or held-out NLL ("nll"): M = 1 from the study's run, else RoE's."""
  if members == 1:
    fn = stats.acc_at(k) if key == "acc" else stats.nll_at(k)
    return stats.per_seed(runs, model, fn)
  out = {}
  for seed, result in results.get(model, {}).items():
    row = result["evaluation"].get(str(k), {}).get(str(members))
    if row:
      out[seed] = stats.mean_acc(row) if key == "acc" else row["heldout_nll"]
  return out


def as_runs(runs, results) -> dict[str, dict[int, dict[str, Any]]]:
  """"<model> M=<m>" -> seed -> an evaluation verdicts reads per item; "<model> M=1" is the study's own."""
  out: dict[str, dict[int, dict[str, Any]]] = {f"{model} M=1": runs.get(model, {}) for model in MODELS}
  for model, by_seed in results.items():
    for seed, result in by_seed.items():
      for k, by_members in result["evaluation"].items():
        for m, row in by_members.items():
          entry = out.setdefault(f"{model} M={m}", {}).setdefault(seed, {"evaluation": {}})
          entry["evaluation"][k] = {"tasks": row["tasks"]}
  return out


COSTS = (("FLOPs per token", "flops_per_token"), ("measured decode ms/token", "decode_ms_per_token"))


def equal_cost_pairs(latency, ks, members, key: str) -> list[tuple[int, int, int]]:
  """(k_low, M, k_high): M members at k_low cost no more than one member at k_high (by `key`)."""
  row = lambda k, m: latency.get(str(k), {}).get(str(m), {}).get(key)
  return [(low, m, high) for low in ks for m in members for high in ks
          if low < high and row(low, m) is not None and row(high, 1) is not None and row(low, m) <= row(high, 1)]


def plan(out: str, runs, ks) -> list[verdicts.Planned]:
  """RoE's claims as per-item comparisons (verdicts.Planned), or [] when experiments/roe.py has not run:
  (i) M members beat the deterministic model at the same k; (ii) M members at a low k beat one at a higher
  k that costs as much or more (FLOPs per token, and measured decode time); (iii) PHDS beats the base under
  RoE too, and RoE's gain on PHDS minus its gain on the base (no direction claimed)."""
  results, latency = load(out)
  if not results:
    return []
  members = sorted({m for r in results.values() for result in r.values() for m in result["members"]})
  r = as_runs(runs, results)
  both = lambda a, b: verdicts.both_endpoints(r, a, b)
  planned = [("RoE (i) M members minus the deterministic model (same checkpoint, same k)", f"{model} M={m} k={k}",
              +1, both((f"{model} M={m}", k), (f"{model} M=1", k))) for model in MODELS for m in members for k in ks]
  for cost, key in COSTS:
    planned += [(f"RoE (ii) k_low with M members minus k_high alone, at equal or lower {cost}",
                 f"{model} k={low} M={m} vs k={high}", +1, both((f"{model} M={m}", low), (f"{model} M=1", high)))
                for low, m, high in equal_cost_pairs(latency, ks, members, key) for model in MODELS]
  for m in members:
    for k in ks:
      planned.append(("RoE (iii) PHDS minus the base, both with M members", f"M={m} k={k}", +1,
                      both((f"phds M={m}", k), (f"base M={m}", k))))
      gain = {model: both((f"{model} M={m}", k), (f"{model} M=1", k)) for model in MODELS}
      interaction = {endpoint: {s: gain["phds"][endpoint][s] - gain["base"][endpoint][s]
                                for s in gain["phds"][endpoint] if s in gain["base"][endpoint]}
                     for endpoint in verdicts.ENDPOINTS}
      planned.append(("RoE (iii) interaction: RoE's gain on PHDS minus its gain on the base", f"M={m} k={k}", 0,
                      interaction))
  return planned


def _plot(runs_by_curve, curves, latency, ks, path: str):
  """Claim (ii)'s figure: accuracy of every (model, M) curve against its decode cost per token, measured
  (left) and in FLOPs (right); points: the share of all items of every seed correct, bars: bootstrap 95%."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = [(key, label) for key, label in (("decode_ms_per_token", "decode latency (ms / token, measured)"),
                                            ("flops_per_token", "decode FLOPs per token (model)"))
            if all(key in latency[str(k)][str(m)] for k in ks for _, m in curves.values())]
  accuracy = {}  # curve -> [(k, bootstrap interval of the share correct)], shared by the panels
  for name, (model, m) in curves.items():
    accuracy[name] = []
    for k in ks:
      per_seed = {seed: verdicts.outcomes(result, k, "correct")
                  for seed, result in runs_by_curve.get(f"{model} M={m}", {}).items()}
      per_seed = {seed: v for seed, v in per_seed.items() if v is not None}
      if per_seed:
        accuracy[name].append((k, inference.paired(per_seed)))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    for i, (name, (model, m)) in enumerate(curves.items()):
      shift = 1 + 0.012 * (i - (len(curves) - 1) / 2)  # the models share each cost: set apart, not overlapping
      points = [(latency[str(k)][str(m)][key] * shift, c, k) for k, c in accuracy[name]]
      ax.errorbar([x for x, _, _ in points], [c.mean for _, c, _ in points],
                  yerr=[[c.mean - c.low for _, c, _ in points], [c.high - c.mean for _, c, _ in points]],
                  marker="o", markersize=4, capsize=3, label=name, linestyle="-" if model == "phds" else "--")
      for x, c, k in points:
        ax.annotate(f"k={k}", (x, c.mean), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.axhline(0.1, color="grey", linestyle=":", linewidth=1, label="chance (0.10)")
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (share of all items)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("RoE claim (ii): accuracy against decode cost, by model, members M and k\n"
               "(bars: bootstrap 95% interval over the items of every seed; curves offset by about 1% in x)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def section(out: str, runs, ks, k_pre: int, directory: str,
            tests: Sequence[verdicts.Test],
            figure_of: Optional[dict[str, str]] = None) -> Optional[tuple[list[str], dict[str, Any], list[str]]]:
  """(markdown lines, JSON, PNG names) of the RoE section, or None when experiments/roe.py has not run;
  `tests`: RoE's comparisons (plan()), corrected with the rest of the report's."""
  results, latency = load(out)
  if not results:
    return None
  members = sorted({m for r in results.values() for result in r.values() for m in result["members"]})
  taus = sorted({t for r in results.values() for result in r.values() for t in result["taus"]})
  val_items = next(iter(next(iter(results.values())).values()))["val_items"]
  seeds = sorted({s for r in results.values() for s in r})
  curves = {f"{model} M={m}" + (" (deterministic)" if m == 1 else ""): (model, m)
            for model in MODELS for m in (1, *members)}
  acc = {name: {k: _value(runs, results, model, m, k, "acc") for k in ks} for name, (model, m) in curves.items()}
  nll = {name: {k: _value(runs, results, model, m, k, "nll") for k in ks} for name, (model, m) in curves.items()}
  lines = ["## Roster of Experts (RoE) at every k", "",
           f"`experiments/roe.py`: M routings per token by Gumbel-top-k (member 0 deterministic), the members' mean "
           f"distribution scored with generation's algorithm (each member's token sees the deterministic "
           f"member's context, the clean cache, and its own position); M in {members}; tau (one for every MoE "
           f"layer, or one per layer a:b:c:d) chosen among {taus} per (model, seed, k, M) by mean accuracy on "
           f"{val_items} validation items per task (never an evaluation item; unseen items first, then fine-tuning "
           f"items); then scored on the evaluation items with other routings. Seeds: {seeds}. M = 1 is the "
           "study's own evaluation of the same checkpoint.", "",
           stats.table("Accuracy, mean over tasks, by model and members", acc, ks, k_pre), "",
           stats.table("Held-out NLL of the answers, by model and members", nll, ks, k_pre), ""]
  lines += ["**Chosen tau** (per seed)", "", "| model, M | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---" * (len(ks) + 1) + "|"]
  for model in MODELS:
    for m in members:
      cells = [", ".join(str(r['evaluation'][str(k)][str(m)]['tau']) for _, r in sorted(results.get(model, {}).items())
                         if str(k) in r["evaluation"]) for k in ks]
      lines.append(f"| {model}, M={m} | " + " | ".join(cells) + " |")
  lines.append("")
  pngs = []
  if latency:
    ref = latency[str(k_pre)]["1"]["decode_ms_per_token"]
    flops = all("flops_per_token" in latency[str(k)][str(m)] for k in ks for m in (1, *members))
    lines += ["**Decode cost** (measured once on the base, batch 1, 32-token prompt; ratio to M = 1 at k_pre"
              + ("; FLOPs per decoded token from plan/cost.py's model, as a ratio to M = 1 at k_pre" if flops else "")
              + ")", "", "| k | " + " | ".join(f"M={m} ms/token (ratio)" for m in (1, *members))
              + (" | " + " | ".join(f"M={m} FLOPs ratio" for m in (1, *members)) if flops else "") + " |",
              "|---" * ((len(members) + 1) * (2 if flops else 1) + 1) + "|"]
    for k in ks:
      cells = [f"{latency[str(k)][str(m)]['decode_ms_per_token']:.2f} "
               f"({latency[str(k)][str(m)]['decode_ms_per_token'] / ref:.2f})" for m in (1, *members)]
      if flops:
        flops_ref = latency[str(k_pre)]["1"]["flops_per_token"]
        cells += [f"{latency[str(k)][str(m)]['flops_per_token'] / flops_ref:.2f}" for m in (1, *members)]
      lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    _plot(as_runs(runs, results), curves, latency, ks, os.path.join(directory, "roe_accuracy_vs_cost.png"))
    pngs.append("roe_accuracy_vs_cost.png")
  lines += ["### RoE claims (paired per item, seeds pooled; Holm over every comparison of this report)", ""]
  for cost, key in COSTS:
    if not equal_cost_pairs(latency, ks, members, key):
      lines += [f"(ii) by {cost}: no (k_low, M > 1) setting costs no more than a higher k with one member.", ""]
  lines += verdicts.markdown(tests, figure_of)
  data = {"members": members, "taus": taus, "seeds": seeds, "accuracy": stats.as_json(acc),
          "heldout_nll": stats.as_json(nll),
          "decode_ms_per_token": {k: {m: v["decode_ms_per_token"] for m, v in row.items()} for k, row in latency.items()},
          "flops_per_token": {k: {m: v.get("flops_per_token") for m, v in row.items()} for k, row in latency.items()}}
  return lines, data, pngs
