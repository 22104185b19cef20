"""RESULTS.md's section "Roster of Experts" from experiments/roe.py's outputs (OUT/roe/): accuracy and
held-out NLL by (model, members, k), the chosen taus, measured decode cost, and claims (i)-(iii) of issue 14
with the study's verdict rule (stats.verdict), differences paired by seed.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Optional

from experiments import stats

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


def claims(runs, results, latency, ks, members) -> list[tuple[str, list[tuple[str, dict[int, float]]]]]:
  def v(model, m, k, key="acc"):
    return _value(runs, results, model, m, k, key)

  out = [("(i) RoE improves accuracy at fixed k: acc(model, M members) - acc(model, deterministic)",
          [(f"{model} M={m} k={k}", stats.paired(v(model, m, k), v(model, 1, k)))
           for model in MODELS for m in members for k in ks]),
         ("(i') RoE lowers the held-out NLL at fixed k (negative = better): NLL(M members) - NLL(deterministic)",
          [(f"{model} M={m} k={k}", stats.paired(v(model, m, k, "nll"), v(model, 1, k, "nll")))
           for model in MODELS for m in members for k in ks])]
  cheaper = [(low, m, high) for low in ks for m in members for high in ks if low < high and latency
             and latency[str(low)][str(m)]["decode_ms_per_token"] <= latency[str(high)]["1"]["decode_ms_per_token"]]
  out.append(("(ii) a low k with M members beats a higher k alone at equal or lower measured decode cost: "
              "acc(k_low, M) - acc(k_high, 1)",
              [(f"{model} k={low} M={m} vs k={high}", stats.paired(v(model, m, low), v(model, 1, high)))
               for model in MODELS for low, m, high in cheaper]))
  out.append(("(iii) PHDS and RoE compound: acc(phds, M) - acc(base, M) (PHDS under RoE), and the interaction "
              "[acc(phds, M) - acc(phds, 1)] - [acc(base, M) - acc(base, 1)]",
              [(f"phds - base, M={m} k={k}", stats.paired(v("phds", m, k), v("base", m, k)))
               for m in members for k in ks] +
              [(f"interaction M={m} k={k}", stats.paired(stats.paired(v("phds", m, k), v("phds", 1, k)),
                                                            stats.paired(v("base", m, k), v("base", 1, k))))
               for m in members for k in ks]))
  return out


def _plot(values, latency, ks, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for label, (m, by_k) in values.items():
    points = [(latency[str(k)][str(m)]["decode_ms_per_token"], *stats.spread(by_k[k])[:2], k) for k in ks
              if by_k.get(k)]
    ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                capsize=3, label=label, linestyle="-" if label.startswith("phds") else "--")
    for x, y, _, k in points:
      ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
  ax.set_xlabel("decode latency (ms / token, measured)")
  ax.set_ylabel("accuracy (mean over tasks)")
  ax.set_title("Roster of Experts: accuracy vs cost across k and members")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def section(out: str, runs, ks, k_pre: int, directory: str) -> Optional[tuple[list[str], dict[str, Any], list[str]]]:
  """(markdown lines, JSON, PNG names) of the RoE section, or None when experiments/roe.py has not run."""
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
  tests = claims(runs, results, latency, ks, members)
  lines = ["## Roster of Experts (RoE) at every k", "",
           f"`experiments/roe.py`: M routings per token by Gumbel-top-k (member 0 deterministic), the members' mean "
           f"distribution scored; M in {members}; one tau for every MoE layer, chosen among {taus} per (model, seed, "
           f"k, M) by mean accuracy on {val_items} validation items per task (never an evaluation item; unseen "
           f"items first, then fine-tuning items); then scored on the evaluation items with other routings. "
           f"Seeds: {seeds}. M = 1 is the study's own evaluation of the same checkpoint.", "",
           stats.table("Accuracy, mean over tasks, by model and members", acc, ks, k_pre), "",
           stats.table("Held-out NLL of the answers, by model and members", nll, ks, k_pre), ""]
  lines += ["**Chosen tau** (per seed)", "", "| model, M | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---" * (len(ks) + 1) + "|"]
  for model in MODELS:
    for m in members:
      cells = [", ".join(f"{r['evaluation'][str(k)][str(m)]['tau']:g}" for _, r in sorted(results.get(model, {}).items())
                         if str(k) in r["evaluation"]) for k in ks]
      lines.append(f"| {model}, M={m} | " + " | ".join(cells) + " |")
  lines.append("")
  pngs = []
  if latency:
    ref = latency[str(k_pre)]["1"]["decode_ms_per_token"]
    lines += ["**Decode cost** (measured once on the base, batch 1, 32-token prompt; ratio to M = 1 at k_pre)", "",
              "| k | " + " | ".join(f"M={m} ms/token (ratio)" for m in (1, *members)) + " |",
              "|---" * (len(members) + 2) + "|"]
    for k in ks:
      cells = [f"{latency[str(k)][str(m)]['decode_ms_per_token']:.2f} "
               f"({latency[str(k)][str(m)]['decode_ms_per_token'] / ref:.2f})" for m in (1, *members)]
      lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    _plot({name: (curves[name][1], by_k) for name, by_k in acc.items()}, latency, ks,
          os.path.join(directory, "roe_accuracy_vs_latency.png"))
    pngs.append("roe_accuracy_vs_latency.png")
  shown = [test for test in tests if test[1]]
  lines += ["### RoE claims (differences paired by seed)", ""]
  if not tests[2][1]:
    lines += ["(ii) has no pair to test here: no (k_low, M > 1) setting decoded at or below the measured cost of "
              "a higher k with one member.", ""]
  lines += [stats.claim_words(shown), "", stats.claim_lines(shown)]
  data = {"members": members, "taus": taus, "seeds": seeds, "accuracy": stats.as_json(acc),
          "heldout_nll": stats.as_json(nll),
          "decode_ms_per_token": {k: {m: v["decode_ms_per_token"] for m, v in row.items()} for k, row in latency.items()},
          "claims": [{"claim": title, "differences": [dict(zip(("name", "mean", "std", "seeds"),
                                                               (name, *stats.spread(d))),
                                                           verdict=stats.verdict(d)) for name, d in diffs if d]}
                     for title, diffs in shown]}
  return lines, data, pngs
