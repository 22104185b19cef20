"""The study's tables, claim tests and plots from the runs' study_eval.json files: writes RESULTS.md.

  python -m experiments.summarize --out=workdir/study --results=experiments/RESULTS.md

Per method and k_ev: accuracy (mean over the four tasks), held-out loss and agreement, each as the mean over
seeds +- the standard deviation over seeds. Agreement within a checkpoint is the share of evaluation items
whose predicted choice at k_ev equals its prediction at k_pre; within the oracle family it compares
oracle_k at k_ev = k with oracle_{k_pre} at k_pre on the same items (the paper's claim (c)). Differences
that test a claim are paired by seed (same items, same data order): mean +- standard deviation, and in how
many seeds the sign holds. PNGs next to RESULTS.md: accuracy vs k, accuracy vs decode latency, agreement vs k.
When experiments/roe.py has run, a section on Roster-of-Experts ensembles follows (summarize_roe.py).
"""

from __future__ import annotations

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.summarize")

import argparse
import glob
import json
import os
import platform
from typing import Any, Optional


from experiments.settings import ROOT
from experiments import figures
from experiments import reading
from experiments import summarize_roe
from experiments import inference
from experiments import verdicts
from experiments.progress import commit
from experiments.stats import (per_seed, fmt, acc_at, nll_at, self_agreement_at, oracle_family_agreement, oracle_curve, table, as_json)


# ---- loading ---------------------------------------------------------------------------------------------


def load_runs(out: str) -> dict[str, dict[int, dict[str, Any]]]:
  """run name -> seed -> study_eval.json."""
  runs: dict[str, dict[int, dict[str, Any]]] = {}
  for path in sorted(glob.glob(os.path.join(out, "seed*", "*", "study_eval.json"))):
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
    runs.setdefault(result["run"], {})[result["seed"]] = result
  if not runs:
    raise SystemExit(f"no study_eval.json under {out}/seed*/: run python -m experiments.run_all (or a driver) first")
  return runs


# ---- the report ------------------------------------------------------------------------------------------

METHOD_ORDER = ("base", "oracle (own k)", "plain SFT at k_pre", "phds", "phds_no_anchor", "phds_train_attention",
                "phds_train_experts", "phds_train_router", "phds_eps_1e-3", "phds_eps_1e-9", "phds_hard_mask",
                "phds_bf16", "phds_eps_1e-3_bf16", "phds_hard_mask_bf16", "phds_narrow_k")


def method_values(runs, ks, fn_at, k_pre: int) -> dict[str, dict[int, dict[int, float]]]:
  """method -> k -> seed -> value, with the oracle family folded into one method (each oracle at its own k)
  and the oracle at k_pre, dialled down, as plain SFT at k_pre."""
  out = {}
  for method in METHOD_ORDER:
    if method == "oracle (own k)":
      if any(f"oracle_k{k}" in runs for k in ks):
        out[method] = oracle_curve(runs, ks, fn_at)
    elif method == "plain SFT at k_pre":
      if f"oracle_k{k_pre}" in runs:
        out[method] = {k: per_seed(runs, f"oracle_k{k_pre}", fn_at(k)) for k in ks}
    elif method in runs:
      out[method] = {k: per_seed(runs, method, fn_at(k)) for k in ks}
  return out


def kappa_lines(runs, ks, k_pre: int) -> list[str]:
  """Agreement with k_pre corrected for chance (Cohen's kappa, items of all seeds pooled): within PHDS,
  within plain SFT at k_pre, and across the oracle family."""
  low = [k for k in ks if k < k_pre]
  rows = [("PHDS (k vs k_pre, one checkpoint)", lambda k: verdicts.kappa(runs, "phds", k, "phds", k_pre)),
          ("plain SFT at k_pre (k vs k_pre, one checkpoint)",
           lambda k: verdicts.kappa(runs, f"oracle_k{k_pre}", k, f"oracle_k{k_pre}", k_pre)),
          ("oracle family (oracle_k at k vs oracle_k_pre)",
           lambda k: verdicts.kappa(runs, f"oracle_k{k}", k, f"oracle_k{k_pre}", k_pre))]
  cells = [(label, [fn(k) for k in low]) for label, fn in rows]
  cells = [(label, values) for label, values in cells if any(v is not None for v in values)]
  if not cells:
    return []
  lines = ["**Agreement with k_pre, chance-corrected** (Cohen's kappa; 1 = the same predictions, 0 = as by "
           "chance)", "", "| | " + " | ".join(f"k={k}" for k in low) + " |", "|---" * (len(low) + 1) + "|"]
  lines += [f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in values) + " |"
            for label, values in cells]
  return lines + [""]


def per_seed_results(runs) -> dict[str, Any]:
  """The small per-seed record kept in the repository (RESULTS_seeds.json): seed -> run -> the selected
  step and phase, and per k each task's accuracy and the held-out NLL (the per-item outcomes stay in the
  study's output directory)."""
  out: dict[str, Any] = {}
  for name in sorted(runs):
    for seed, result in sorted(runs[name].items()):
      out.setdefault(str(seed), {})[name] = {
          **{key: result[key] for key in ("best_step", "selected_phase", "seconds") if key in result},
          "evaluation": {k: {"acc": {task: round(t["acc"], 4) for task, t in row["tasks"].items()},
                             "heldout_nll": round(row["heldout_nll"], 4)}
                         for k, row in result["evaluation"].items()}}
  return out


def selection_table(runs) -> list[str]:
  """Which checkpoint each fine-tune selected, per seed: its step and the schedule's phase then (an
  anchoring phase that selection discards did not shape the model that was evaluated)."""
  rows = [(name, seed, r) for name in sorted(runs) for seed, r in sorted(runs[name].items()) if "best_step" in r]
  if not rows:
    return []
  by_run = {}
  for name, seed, r in rows:
    by_run.setdefault(name, []).append(f"seed {seed}: step {r['best_step']} ({r['selected_phase']})")
  lines = ["## Selected checkpoints", "", "| run | selected (per seed) |", "|---|---|"]
  return lines + [f"| {name} | {'; '.join(cells)} |" for name, cells in by_run.items()] + [""]


def per_task_table(runs, name: str, ks) -> str:
  tasks = sorted(next(iter(runs[name].values()))["evaluation"][str(ks[0])]["tasks"])
  lines = [f"| {name}: task (items) | " + " | ".join(f"k={k}" for k in ks) + " |",
           "|---" * (len(ks) + 1) + "|"]
  for task in tasks:
    n = next(iter(runs[name].values()))["evaluation"][str(ks[0])]["tasks"][task]["n"]
    cells = [fmt(per_seed(runs, name, lambda r, k=k: r["evaluation"][str(k)]["tasks"][task]["acc"]))
             for k in ks]
    lines.append(f"| {task} ({n}) | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _per_item(runs, name: str, k: int, fn) -> dict[int, Any]:
  """seed -> fn(result, k) (a per-item array) for run `name`, where it exists."""
  out = {}
  for seed, result in runs.get(name, {}).items():
    value = fn(result, k)
    if value is not None:
      out[seed] = value
  return out


def plots(runs, ks, k_pre: int, latency, directory: str) -> list[str]:
  """Accuracy vs k, accuracy vs measured decode latency, agreement with k_pre vs k: each point the mean over
  every evaluation item of every seed, its bar the bootstrap 95% interval (inference.paired), methods
  side by side (small x offsets), the chance level drawn."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  correct = lambda r, k: verdicts.outcomes(r, k, "correct")
  agrees = lambda r, k: verdicts.agreement_with(r, k, (r, k_pre))
  sft = f"oracle_k{k_pre}"
  curves = {"base": lambda k, fn: _per_item(runs, "base", k, fn),
            "plain SFT at k_pre": lambda k, fn: _per_item(runs, sft, k, fn),
            "oracle (own k)": lambda k, fn: _per_item(runs, f"oracle_k{k}", k, fn),
            "phds": lambda k, fn: _per_item(runs, "phds", k, fn),
            "phds_no_anchor": lambda k, fn: _per_item(runs, "phds_no_anchor", k, fn)}
  seeds = len({s for r in runs.values() for s in r})
  written = []
  for name, fn, x_of, xlabel, ylabel, title in (
      ("accuracy_vs_k.png", correct, float, "declared k (k_ev)", "accuracy (share of all items)",
       "Accuracy by declared k"),
      ("accuracy_vs_latency.png", correct, lambda k: latency[str(k)]["decode_ms_per_token"],
       "decode latency (ms / token, measured)", "accuracy (share of all items)",
       "Accuracy by measured decode latency"),
      ("agreement_vs_k.png", agrees, float, "declared k (k_ev)", "share of items predicted as at k_pre",
       "Agreement with k_pre (within one checkpoint)")):
    if name == "accuracy_vs_latency.png" and not latency:
      continue
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = [m for m in curves if any(curves[m](k, fn) for k in ks)]
    if name == "agreement_vs_k.png":
      drawn = [m for m in drawn if m != "oracle (own k)"]  # an oracle agrees with itself only at its own k
    for i, method in enumerate(drawn):
      points = [(k, inference.paired(curves[method](k, fn))) for k in ks if curves[method](k, fn)]
      offset = (i - (len(drawn) - 1) / 2)  # methods side by side: 0.05 in k, or 1% of the latency
      xs = [x_of(k) + 0.05 * offset if x_of is float else x_of(k) * (1 + 0.01 * offset) for k, _ in points]
      means = [c.mean for _, c in points]
      bars = [[c.mean - c.low for _, c in points], [c.high - c.mean for _, c in points]]
      ax.errorbar(xs, means, yerr=bars, marker="o", markersize=4, capsize=3, label=method)
    if fn is correct:
      ax.axhline(0.1, color="grey", linestyle="--", linewidth=1, label="chance (0.10)")
    if x_of is float:
      ax.set_xticks(list(ks))
    ax.set_title(f"{title}\n(all items of {seeds} seed(s); bars: bootstrap 95% interval; methods set apart in x)",
                 fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, name), dpi=110)
    plt.close(fig)
    written.append(name)
  return written


def _run_commits(runs) -> list[str]:
  """The commits the runs were made at (study_eval.json's "commit"; "unknown" for older files)."""
  return sorted({r.get("commit", "unknown") for by_seed in runs.values() for r in by_seed.values()})


def _timing(out: str, runs) -> str:
  """How long the runs took (the sum of their own durations in the workers) and when the last one ended."""
  import time  # pylint: disable=g-import-not-at-top

  seconds = sum(r.get("seconds", 0.0) for by_seed in runs.values() for r in by_seed.values())
  paths = glob.glob(os.path.join(out, "seed*", "*", "study_eval.json"))
  last = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(max(os.path.getmtime(p) for p in paths))) if paths else "-"
  count = sum(len(by_seed) for by_seed in runs.values())
  return f"{count} runs; their fine-tunes and evaluations took {seconds / 60:.1f} worker-minutes; the last ended {last}."


def report(out: str, results_path: str, command: str, reading_path: str = "") -> tuple[str, dict[str, Any]]:
  """(RESULTS.md's text, the same numbers as JSON); writes the PNGs next to results_path. With reading_path
  (the hand-written reading beside it), its quoted numbers are checked against this report: the header says
  whether they match, and the reading gets a banner when they do not (reading.py)."""
  runs = load_runs(out)
  any_result = next(iter(next(iter(runs.values())).values()))
  k_pre = any_result["k_pre"]
  ks = sorted({int(k) for r in runs.values() for result in r.values() for k in result["evaluation"]})
  latency_file = os.path.join(out, "latency.json")
  latency = json.load(open(latency_file, encoding="utf-8")) if os.path.isfile(latency_file) else {}
  seeds = sorted({s for r in runs.values() for s in r})
  all_tests = verdicts.tests(runs, ks, k_pre, extra=summarize_roe.plan(out, runs, ks))
  tests = [t for t in all_tests if not t.claim.startswith("RoE")]
  acc = method_values(runs, ks, acc_at, k_pre)
  nll = method_values(runs, ks, nll_at, k_pre)
  agree = {m: {k: per_seed(runs, m, self_agreement_at(k, k_pre)) for k in ks} for m in METHOD_ORDER if m in runs}
  agree["oracle family"] = {k: oracle_family_agreement(runs, k, k_pre) for k in ks}
  directory = os.path.dirname(os.path.abspath(results_path))
  pngs = plots(runs, ks, k_pre, latency, directory)
  figure_of = figures.claim_figures(all_tests, directory)
  split = any_result["split"]["tasks"]
  lines = [
      f"# Results of the study at {any_result.get('scale', 'tiny')} scale",
      "",
      f"Written by `experiments/summarize.py` from `{os.path.relpath(out, ROOT) if out.startswith(ROOT) else out}`. "
      f"Command: `{command}`. Runs at commit {', '.join(f'`{c}`' for c in _run_commits(runs))}; summary at "
      f"`{commit()}`; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
      f"{latency.get(str(k_pre), {}).get('device', 'cpu')}. Seeds: {seeds}. {_timing(out, runs)}",
      "",
      "Evaluation items per seed (scored on the answer text; never trained on): "
      + ", ".join(f"{t} {c['eval_items']}" for t, c in split.items())
      + "; fine-tuning items: " + ", ".join(f"{t} {c['train_items']}" for t, c in split.items()) + ".",
      "Chance: 0.10 for every family (10 one-token choices)." if any_result.get("scale", "tiny") == "tiny" else
      "Chance: per benchmark, one over its number of choices.",
      "",
  ]
  base_lm_file = os.path.join(out, "base_lm.json")
  if os.path.isfile(base_lm_file):
    base_lm = json.load(open(base_lm_file, encoding="utf-8"))
    losses = base_lm["val_loss"]
    order = sorted(losses, key=int)
    lines += [f"**The base's validation loss by k** (trained {base_lm['step']} steps at k_pre = {k_pre} on the "
              "synthetic families; NLL of the answers of 2% of its items held out; one base for every seed)", "",
              "| " + " | ".join(f"k={k}" for k in order) + " |", "|---" * len(order) + "|",
              "| " + " | ".join(f"{losses[k]:.4f}" for k in order) + " |", ""]
  lines += [table("Accuracy, mean over tasks", acc, ks, k_pre), "",
            table("Held-out loss (NLL per answer token of the evaluation items)", nll, ks, k_pre), "",
            table("Agreement with k_pre (within each checkpoint; oracle family: oracle_k at k vs oracle_k_pre)",
                  agree, ks, k_pre), ""]
  if latency:
    lines += ["**Decode latency** (measured once on the base: every checkpoint has its shapes; batch 1, "
              "32-token prompt)", "", "| k | decode ms/token | prefill tokens/s |", "|---|---|---|"]
    lines += [f"| {k} | {latency[str(k)]['decode_ms_per_token']:.2f} | {latency[str(k)]['prefill_tokens_per_s']:.0f} |"
              for k in ks if str(k) in latency]
    lines.append("")
  lines += ["## Claim by claim (paired per item, seeds pooled)", "",
            f"Each comparison pairs the same evaluation items of the same seeds (pooled: {len(seeds)} seeds). "
            "Difference: first minus second, oriented so that > 0 means the first is better (accuracy; answer NLL "
            "as second minus first; agreement with k_pre). 95% CI: bootstrap over items within each seed "
            f"({inference.BOOTSTRAP} resamples). Holm p: the bootstrap p corrected over all {len(all_tests)} "
            "comparisons of this report (RoE's included). Verdict: \"holds\" / \"contradicted\" where Holm p < 0.05 and the sign "
            "agrees / disagrees with the claim; \"differs\" (significant, no direction claimed); otherwise "
            "\"inconclusive\".", "", verdicts.power_line(runs, ks), "", *kappa_lines(runs, ks, k_pre),
            *verdicts.markdown(tests, figure_of)]
  for name in ("base", "phds"):
    if name in runs:
      lines += [f"## Per task ({name})", "", per_task_table(runs, name, ks), ""]
  lines += selection_table(runs)
  roe = summarize_roe.section(out, runs, ks, k_pre, directory, [t for t in all_tests if t.claim.startswith("RoE")],
                              figure_of)
  if roe:
    lines += roe[0]
    pngs += roe[2]
  lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
  text = "\n".join(lines)
  data = {"command": command, "commit": commit(), "k_pre": k_pre, "k_grid": ks, "seeds": seeds,
          "accuracy": as_json(acc), "heldout_nll": as_json(nll), "agreement": as_json(agree),
          "decode_ms_per_token": {k: v["decode_ms_per_token"] for k, v in latency.items()},
          "claims": [{"claim": t.claim, "name": t.name, "endpoint": t.endpoint, "expected_sign": t.expected,
                      "mean": t.comparison.mean, "low": t.comparison.low, "high": t.comparison.high,
                      "p": t.comparison.p, "p_holm": t.comparison.p_holm, "items": t.comparison.n,
                      "verdict": t.comparison.verdict(t.expected)} for t in all_tests]}
  if roe:
    data["roe"] = roe[1]
  if reading_path:
    import time  # pylint: disable=g-import-not-at-top

    status = reading.flag(reading_path, json.loads(json.dumps(data)), time.strftime("%Y-%m-%d", time.gmtime()))
    if status:
      title, header, rest = text.split("\n\n", 2)
      text = "\n\n".join([title, header, status, rest])  # under the header paragraph
  return text, data


def main(argv: Optional[list[str]] = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "workdir", "study"), help="the study's output directory")
  parser.add_argument("--results", default=os.path.join(ROOT, "experiments", "RESULTS.md"),
                      help="markdown file to write (the PNGs go next to it)")
  parser.add_argument("--command", default="python -m experiments.run_all --scale=tiny",
                      help="the command that produced the outputs (quoted in the report)")
  parser.add_argument("--reading", default="", help="the hand-written reading to check against the new numbers "
                      "('' = <results>_reading.md beside the results, when there is one)")
  args = parser.parse_args(argv)
  reading_path = args.reading or os.path.splitext(args.results)[0] + "_reading.md"
  text, data = report(args.out, args.results, args.command, reading_path)
  with open(args.results, "w", encoding="utf-8") as f:
    f.write(text)
  json_path = os.path.splitext(args.results)[0] + ".json"
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1)
  with open(os.path.splitext(args.results)[0] + "_seeds.json", "w", encoding="utf-8") as f:
    json.dump(per_seed_results(load_runs(args.out)), f, indent=1)
  print(text)
  print(f"wrote {args.results}, {json_path} and the per-seed record next to them")


if __name__ == "__main__":
  main()
