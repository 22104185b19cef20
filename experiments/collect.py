"""The pod study's evaluations (each run's eval/eval_results.json from configs/eval.py) turned into the
study_eval.json files the tiny study writes, so summarize.py reads both scales alike."""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from experiments.local import write_json
from experiments.runs import Run
from experiments.settings import Scale


def from_eval_results(eval_results: dict[str, Any], label: str,
                      answers: dict[str, list[int]]) -> dict[str, Any]:
  """The eval job's rows of checkpoint `label` as study_eval.json's "evaluation" (task eval_<name>.jsonl
  becomes <name>, with each item's correctness from `answers` (name -> answer per item) and its answer NLL;
  the NLL of eval.sft_files, or of data.prepared's validation rows, is the held-out loss)."""
  out = {}
  for k, row in eval_results["results"][label].items():
    tasks = {}
    for file_name, task in row["tasks"].items():
      name = re.sub(r"^eval_(.+)\.jsonl$", r"\1", os.path.basename(file_name))
      tasks[name] = {key: task[key] for key in ("acc", "acc_se", "n", "predictions")}
      tasks[name]["correct"] = [int(p == a) for p, a in zip(task["predictions"], answers[name])]
      tasks[name]["answer_nll"] = [round(-v, 5) for v in task["answer_logprobs"]]
    out[str(k)] = {"tasks": tasks, "heldout_nll": row["nll"]}
  return out


def _answers(data_dir: str) -> dict[str, list[int]]:
  """name -> the answer of each item of data_dir's eval_<name>.jsonl files."""
  out = {}
  for file_name in sorted(os.listdir(data_dir)):
    match = re.match(r"^eval_(.+)\.jsonl$", file_name)
    if match:
      with open(os.path.join(data_dir, file_name), encoding="utf-8") as f:
        out[match.group(1)] = [json.loads(line)["answer"] for line in f if line.strip()]
  return out


class _Answers(dict):
  """name -> the answer of each item: the seed's eval_<name>.jsonl files, and an OLMo suite benchmark
  ("task:variant", the pod scales') read from the wheel when first asked for."""

  def __missing__(self, name: str) -> list[int]:
    if ":" not in name:
      raise KeyError(name)
    from phds_jax.data import olmo_tasks  # pylint: disable=g-import-not-at-top

    self[name] = [it["answer"] for it in olmo_tasks.load_task(name)]
    return self[name]


def _read(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def collect(scale: Scale, chosen: Sequence[Run], seeds: Sequence[int], out: str) -> list[str]:
  """Writes each evaluated run's study_eval.json (and latency.json from the base's evaluation) from the pod
  evaluations' OUT/seed<s>/<run>/eval/eval_results.json. Returns the runs still without an evaluation."""
  if "://" in out:
    raise SystemExit(f"--out={out}: collect reads local files; copy the study there first "
                     f"(gsutil -m cp -r {out} LOCAL_DIR) and pass --out=LOCAL_DIR")
  missing = []
  for seed in seeds:
    data_dir = os.path.join(out, "data", f"seed{seed}")
    answers = _Answers(_answers(data_dir) if os.path.isdir(data_dir) else {})
    split_file = os.path.join(data_dir, "split.json")
    split = _read(split_file) if os.path.isfile(split_file) else None  # pod data: the benchmarks' counts
    for run in chosen:
      run_dir = os.path.join(out, f"seed{seed}", run.name)
      path = os.path.join(run_dir, "eval", "eval_results.json")
      if not os.path.isfile(path):
        missing.append(f"seed {seed} {run.name}")
        continue
      eval_results = _read(path)
      evaluation = from_eval_results(eval_results, run.name, answers)
      if split is None:
        tasks = next(iter(evaluation.values()))["tasks"]
        split = {"seed": seed, "tasks": {name: {"eval_items": t["n"], "train_items": 0} for name, t in tasks.items()}}
      result = {"run": run.name, "group": run.group, "seed": seed, "fields": run.fields, "claim": run.claim,
                "split": split, "k_pre": scale.k_pre, "scale": scale.name, "evaluation": evaluation}
      summary_file = os.path.join(run_dir, "summary.json")
      if os.path.isfile(summary_file):
        summary = _read(summary_file)
        result.update({key: summary.get(key) for key in ("best_step", "select_k", "selected_phase")})
      write_json(os.path.join(run_dir, "study_eval.json"), result)
      latency = {k: row["latency"] for k, row in eval_results["results"][run.name].items() if "latency" in row}
      if run.name == "base" and latency:
        write_json(os.path.join(out, "latency.json"), latency)
  return missing
