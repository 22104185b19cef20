"""`mode="eval"` (configs/eval.py): one or more checkpoints evaluated over a grid of declared k.

Per checkpoint and k: multiple-choice acc / acc_norm on OLMo suite tasks and user JSONL tasks with the
predicted choice per item and the cross-sparsity agreement with the reference k (share of items with the
same predicted choice), mean NLL and perplexity on text / SFT data with next-token agreement and KL to the
reference k, latency and the cost model's FLOPs per decoded token. `eval.roe` adds Roster-of-Experts
routing ensembles (members:tau settings), each evaluated like a checkpoint of its own at every k.
Writes `eval_results.json`, prints one table per checkpoint (and ensemble) and plots accuracy against decode
latency and against FLOPs (`accuracy_vs_latency.png`, `accuracy_vs_flops.png`, one curve each).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import numpy as np

from phds_jax.data import olmo_tasks
from phds_jax.data import pipeline as data_lib
from phds_jax.data import prepared
from phds_jax.eval import latency
from phds_jax.eval import scoring as evaluate
from phds_jax.eval import settings
from phds_jax.io import files
from phds_jax.io.load import load
from phds_jax.model import sharding as sharding_lib
from phds_jax.model.roe import RoE
from phds_jax.plan.cost import forward_flops_per_token

log = logging.getLogger("phds_jax")


def checkpoints(config) -> dict[str, str]:
  """label -> path from `model_path` and `eval.compare` ("label=path,label2=path2")."""
  entries, problems = settings.eval_checkpoints(config)
  if problems:
    raise ValueError(problems[0])
  out = {label: path for label, (_, path) in entries.items()}
  if not out:
    raise ValueError("eval needs --config.model_path (and optionally --config.eval.compare=label=path,...)")
  return out


def _tasks(config) -> dict[str, list[dict[str, Any]]]:
  e, tasks = config.eval, {}
  for spec in (s.strip() for s in e.tasks.split(",") if s.strip()):
    tasks[spec] = olmo_tasks.load_task(spec, limit=e.limit)
  for path in (p.strip() for p in e.task_files.split(",") if p.strip()):
    if not path.endswith((".jsonl", ".json")):
      raise evaluate.TaskFormatError(f"{path}: unknown task file format; use JSONL lines of "
                                     '{"context": str, "choices": [str, ...], "answer": int}')
    items = evaluate.read_multiple_choice(path)
    tasks[os.path.basename(path)] = items[:e.limit] if e.limit else items
  return tasks


def _text_batches(config, tokenizer, tokenizer_dir: str):
  """Packed rows to score (NLL, agreement): eval.text_files and eval.sft_files, or the validation rows of
  data.prepared (read lazily), at most eval.max_rows of them."""
  e, seq_len, examples = config.eval, config.data.seq_len, []
  if config.data.prepared:
    directory, manifest = prepared.open_for_run(config.data, tokenizer_dir, tokenizer, max_loss_tokens=0)
    return data_lib.Batches(prepared.validation_rows(directory, manifest), e.batch_size, limit=e.max_rows)
  if e.text_files:
    examples += data_lib.chunk_examples(data_lib.read_text(e.text_files, tokenizer), seq_len)
  if e.sft_files:
    examples += data_lib.read_sft(e.sft_files, tokenizer)
  if not examples:
    return []
  rows = data_lib.pack(examples, seq_len)
  return data_lib.eval_batches(rows[:e.max_rows] if e.max_rows else rows, e.batch_size)


def evaluate_checkpoint(cfg, params, tokenizer, tasks, text_batches, ks, reference_k, config,
                        reference: Optional[dict[str, list[int]]] = None,
                        roe: Optional[RoE] = None) -> tuple[dict[int, Any], dict[str, list[int]]]:
  """(metrics per k, the multiple-choice predictions per task at reference_k). Agreement is measured
  against `reference` (predictions per task), or None: this checkpoint's own at reference_k, scored once
  even when reference_k is in the grid; text agreement and KL against this checkpoint at reference_k.
  roe: every metric of that routing ensemble (text agreement and KL are left out; pass the deterministic
  model's predictions as `reference`). Each row also has the cost model's FLOPs per decoded token."""
  e, backend = config.eval, config.model.expert_backend
  scored: dict[int, dict[str, Any]] = {}

  def multiple_choice(k):
    if k not in scored:
      scored[k] = {name: evaluate.multiple_choice(cfg, params, tokenizer, items, k=k, batch_size=e.batch_size,
                                                  truncate=e.truncate, expert_backend=backend, roe=roe)
                   for name, items in tasks.items()}
    return scored[k]

  projected = evaluate.projected_positions(text_batches)
  own = {}
  if tasks and reference is None:
    own = {name: r["predictions"] for name, r in multiple_choice(reference_k).items()}
  reference = own if reference is None else reference
  members = roe.members if roe else 1
  context = e.latency.prompt_len + e.latency.decode_tokens / 2
  rows: dict[int, Any] = {}
  for k in ks:
    row: dict[str, Any] = {"tasks": {}}
    for name, r in multiple_choice(k).items():
      same = np.array(r["predictions"]) == np.array(reference[name])
      keys = ("acc", "acc_se", "acc_norm", "acc_norm_se", "n", "predictions", "answer_logprobs")
      row["tasks"][name] = {key: r[key] for key in keys}
      row["tasks"][name].update(agreement=float(np.mean(same)), agreement_se=evaluate.standard_error(same))
    if tasks:
      row.update(_task_means(row["tasks"]))
    if text_batches:
      row.update(evaluate.mean_nll(cfg, params, text_batches, k=k, max_loss_tokens=projected,
                                   expert_backend=backend, roe=roe))
      if roe is None:
        row.update(evaluate.next_token_agreement(cfg, params, text_batches, k=k, reference_k=reference_k,
                                                 max_loss_tokens=projected, expert_backend=backend))
    row["flops_per_token"] = members * forward_flops_per_token(cfg, k, context)
    if e.latency.enabled:
      lat = e.latency
      row["latency"] = latency.measure(cfg, params, k, batch_size=lat.batch_size, prompt_len=lat.prompt_len,
                                       decode_tokens=lat.decode_tokens, repeats=lat.repeats,
                                       expert_backend=backend, roe=roe)
    rows[k] = row
    print(f"  k={k} done", flush=True)
  return rows, own


def _task_means(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Unweighted means over tasks of acc and agreement, their standard errors (tasks independent:
  sqrt(sum se^2) / T) and the item count."""
  out: dict[str, Any] = {"items": int(sum(t["n"] for t in per_task.values()))}
  for key in ("acc", "agreement"):
    out[f"{key}_mean"] = float(np.mean([t[key] for t in per_task.values()]))
    out[f"{key}_mean_se"] = float(np.sqrt(sum(t[f"{key}_se"] ** 2 for t in per_task.values())) / len(per_task))
  return out


def format_table(label: str, rows: dict[int, Any], reference_k: int, agreement_title: str = "") -> str:
  """One line per k: mean accuracy and agreement over tasks (+- standard error, items), text metrics,
  latency, FLOPs per decoded token; then, with several tasks, one line per task and k. agreement_title names the multiple-choice
  reference (default: agree@reference_k)."""
  agree = agreement_title or f"agree@{reference_k}"
  columns = [("acc", "acc_mean"), ("+-se", "acc_mean_se"), (agree, "agreement_mean"),
             ("+-se", "agreement_mean_se"), ("nll", "nll"), ("ppl", "ppl"),
             (f"tok-agree@{reference_k}", "top1_agreement"), ("KL", "mean_kl")]
  present = [(title, key) for title, key in columns if any(key in r for r in rows.values())]
  items = next((r["items"] for r in rows.values() if "items" in r), None)
  header = f"{label}" + (f" ({items} multiple-choice items)" if items else "")
  header += f"\n{'k':>3} " + " ".join(f"{t:>14}" for t, _ in present)
  if any("latency" in r for r in rows.values()):
    header += f" {'prefill tok/s':>14} {'decode ms/tok':>14}"
  if any("flops_per_token" in r for r in rows.values()):
    header += f" {'MFLOP/tok':>10}"
  lines = [header, "-" * len(header.splitlines()[-1])]
  for k, r in rows.items():
    line = f"{k:>3} " + " ".join(f"{r[key]:>14.4f}" if key in r else f"{'-':>14}" for _, key in present)
    if "latency" in r:
      line += f" {r['latency']['prefill_tokens_per_s']:>14.0f} {r['latency']['decode_ms_per_token']:>14.3f}"
    if "flops_per_token" in r:
      line += f" {r['flops_per_token'] / 1e6:>10.4g}"
    lines.append(line)
  task_names = sorted({name for r in rows.values() for name in r.get("tasks", {})})
  if len(task_names) > 1:
    width = max(len(n) for n in task_names)
    lines += ["", f"{'k':>3} {'task':<{width}} {'n':>6} {'acc':>8} {'+-se':>8} {agree:>9} {'+-se':>8}"]
    for k, r in rows.items():
      for name in task_names:
        t = r["tasks"][name]
        lines.append(f"{k:>3} {name:<{width}} {t['n']:>6} {t['acc']:>8.4f} {t['acc_se']:>8.4f} "
                     f"{t['agreement']:>9.4f} {t['agreement_se']:>8.4f}")
  return "\n".join(lines)


AXES = {"latency": ("decode latency (ms / token)", lambda r: r.get("latency", {}).get("decode_ms_per_token")),
        "flops": ("FLOPs per decoded token (cost model: members x forward at k)", lambda r: r.get("flops_per_token"))}


def plot(results: dict[str, dict[int, Any]], path: str, axis: str = "latency") -> bool:
  """Accuracy (mean over tasks) against decode latency or FLOPs (`AXES`), one curve per checkpoint and
  routing-ensemble setting, points labelled by k; False if nothing to plot."""
  title, x_of = AXES[axis]
  curves = {label: [(x_of(r), r["acc_mean"], k) for k, r in rows.items()
                    if x_of(r) is not None and "acc_mean" in r] for label, rows in results.items()}
  if not any(curves.values()):
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for label, points in curves.items():
    points.sort()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    for x, y, k in points:
      ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xlabel(title)
  ax.set_ylabel("accuracy (mean over tasks)")
  ax.set_title(f"accuracy vs {axis} across declared k")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with files.open_file(path, "wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)
  return True


def roe_label(label: str, roe: RoE) -> str:
  """The name of a checkpoint's routing-ensemble curve in tables, plots and eval_results.json."""
  return f"{label} RoE M={roe.members} tau={roe.tau:g}"


def run(config, workdir: str) -> dict[str, Any]:
  files.makedirs(workdir)
  paths = checkpoints(config)
  anchor = config.eval.agreement_with
  if anchor and anchor not in paths:
    raise ValueError(f"eval.agreement_with={anchor!r} is not a checkpoint label; the labels are {list(paths)}")
  roe_settings, problems = settings.eval_roe_settings(config)
  if problems:
    raise ValueError(problems[0])
  ensembles = [RoE(members=m, tau=tau, seed=config.eval.roe_seed) for m, tau in roe_settings]
  tasks = _tasks(config)
  results: dict[str, Any] = {}
  tokenizer = None
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  shared, agreement = None, {}  # the anchor checkpoint's predictions, and what agreement was measured against
  for label in sorted(paths, key=lambda name: name != anchor):  # the anchor first
    path = paths[label]
    with sharding_lib.use_mesh(mesh, dict(config.axis_rules), config.model.expert_dispatch):
      cfg, params = load(path, config.model.param_dtype, sharding=mesh)
    if tokenizer is None:
      tokenizer = data_lib.load_tokenizer(config.tokenizer_path or path)
      text_batches = _text_batches(config, tokenizer, config.tokenizer_path or path)
    ks = settings.k_grid(config.eval.k_values, cfg.num_experts)
    reference_k = config.eval.reference_k or cfg.k_pre
    print(f"evaluating {label} ({path}) at k={ks}, reference k={reference_k}", flush=True)
    with sharding_lib.use_mesh(mesh, dict(config.axis_rules), config.model.expert_dispatch):
      results[label], own = evaluate_checkpoint(cfg, params, tokenizer, tasks, text_batches, ks, reference_k,
                                                config, shared)
    if label == anchor:  # evaluated first: every later checkpoint is measured against its predictions
      shared, agreement = own, {"label": anchor, "k": reference_k}
    title = f"agree@{anchor}:k{agreement['k']}" if anchor else ""
    print(format_table(label, results[label], reference_k, title), flush=True)
    for roe in ensembles:
      curve = roe_label(label, roe)
      print(f"evaluating {curve}", flush=True)
      with sharding_lib.use_mesh(mesh, dict(config.axis_rules), config.model.expert_dispatch):
        results[curve], _ = evaluate_checkpoint(cfg, params, tokenizer, tasks, text_batches, ks, reference_k,
                                                config, shared if anchor else own, roe=roe)
      print(format_table(curve, results[curve], reference_k, title), flush=True)
    del params
  order = [name for label in paths for name in (label, *(roe_label(label, roe) for roe in ensembles))]
  results = {name: results[name] for name in order}
  out = os.path.join(workdir, "eval_results.json")
  files.write_text(out, json.dumps({"checkpoints": paths, "tasks": list(tasks), "agreement_with": agreement or None,
                                    "results": results}, indent=2))
  print(f"wrote {out}")
  for axis in AXES:
    png = os.path.join(workdir, f"accuracy_vs_{axis}.png")
    if plot(results, png, axis):
      print(f"wrote {png}")
  return results
