"""The built-in end-to-end run (`mode="builtin"`, configs/tiny.py): the dial on a CPU in a few minutes.

1. write the data (phds_jax/data/synthetic.py, nothing fetched): a 51-word tokenizer, pre-training and
   fine-tuning draws of the task families in `builtin.mixture`, and evaluation items;
2. build a small base MoE in `workdir/base` unless one is there: trained from random weights at k_pre, so
   it knows the families at k_pre and less at k = 1 (its facts are spread over k_pre experts);
3. fine-tune it twice on the same data and steps: PHDS (multi-k + soft mask + anchoring) in
   `workdir/phds`, and plain SFT at k_pre (the control: what fine-tuning alone does) in `workdir/sft`;
4. print and save (`workdir/results.json`) a table per k: validation loss and evaluation accuracy of the
   base, the SFT control and the selected PHDS checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Optional

import jax

from phds_jax.data import pipeline as data_lib
from phds_jax.data import synthetic
from phds_jax.eval import scoring as evaluate
from phds_jax.io import checkpoint
from phds_jax.io import files
from phds_jax.io.load import load
from phds_jax.train import loop as train

log = logging.getLogger("phds_jax")

MODELS = ("base", "sft", "phds")  # the table's columns, in order
_LABELS = {"base": "base", "sft": "SFT", "phds": "PHDS"}


def prepare_data(config) -> dict[str, str]:
  """The run's files under the cache, written once per setting (keyed by `builtin.*`): a run with other
  values (the tests use fewer items) never hands its files to another."""
  paths = data_paths(config)
  root = os.path.dirname(paths["eval"])
  os.makedirs(root, exist_ok=True)
  with files.exclusive(os.path.join(root, ".lock")):  # processes starting together write them once
    if not os.path.isfile(paths["eval"]):
      _write_data(config, paths)
  return paths


def data_paths(config) -> dict[str, str]:
  """Where the run's files are (or will be) for this config's `builtin` settings."""
  b = config.builtin
  mixture = "-".join(f"{f}{w}" for f, w in synthetic.parse_mixture(b.mixture).items())
  root = os.path.join(b.cache or files.cache_dir(), "builtin_v2",
                      f"{mixture}_pre{b.pretrain_items}_ft{b.finetune_items}_eval{b.eval_items}")
  return {name: os.path.join(root, file) for name, file in (
      ("tokenizer", "tokenizer"), ("pretrain", "pretrain.jsonl"), ("sft", "finetune.jsonl"),
      ("eval", "eval.jsonl"))}


def _write_data(config, paths: dict[str, str]):
  """Pre-training and fine-tuning draw the mixture with different seeds. Evaluation: per family
  `builtin.eval_items` distinct items; for a family of contexts (pattern, lookup, count) none that training
  drew, for a family of facts (arith, after) its facts themselves, which pre-training stored: the
  knowledge the dial has to keep."""
  b = config.builtin
  mixture = synthetic.parse_mixture(b.mixture)
  synthetic.write_tokenizer(paths["tokenizer"])
  pretrain = synthetic.sample_mixture(mixture, b.pretrain_items, seed=-1)
  finetune = synthetic.sample_mixture(mixture, b.finetune_items, seed=1)
  seen = {it["group"] for it in pretrain + finetune}
  evaluation = [synthetic.as_multiple_choice(it) for family in mixture for it in synthetic.items(
      family, b.eval_items, seed=0, exclude_groups=() if family in synthetic.GROUPS_PER_FAMILY else seen)]
  files.write_jsonl(paths["pretrain"], [synthetic.as_sft(it) for it in pretrain])
  files.write_jsonl(paths["sft"], [synthetic.as_sft(it) for it in finetune])
  files.write_jsonl(paths["eval"], evaluation)  # last: its presence says the set is complete


def pretrain_config(config, paths: dict[str, str]):
  """The base model's run: the pre-training draws as prompt/response pairs at k_pre (no PHDS), from the
  random preset."""
  c = _run_config(config, paths, "", paths["pretrain"])
  c.model.random_init = True
  c.data.seq_len = config.pretrain.seq_len
  c.phds.enabled = False
  c.train.steps, c.train.batch_size = config.pretrain.steps, config.pretrain.batch_size
  c.optim.lr, c.optim.warmup_steps = config.pretrain.lr, config.pretrain.warmup_steps
  c.eval.every, c.eval.at_start = config.pretrain.steps, False
  c.checkpoint.every = config.pretrain.steps
  c.export_hf = False
  return c


def finetune_config(config, paths: dict[str, str], base_model: str, method: str):
  """PHDS (`method="phds"`, the config's phds settings) or the control, plain SFT at k_pre ("sft"): the
  same data, steps and optimizer. Only PHDS evaluates the base before its first step."""
  c = _run_config(config, paths, base_model, paths["sft"])
  if method == "sft":
    c.phds.enabled, c.eval.at_start, c.export_hf = False, False, False
  return c


def _run_config(config, paths: dict[str, str], model_path: str, train_file: str):
  c = copy.deepcopy(config)
  c.unlock()
  c.mode, c.model_path, c.tokenizer_path = "train", model_path, paths["tokenizer"]
  c.data.format, c.data.train_files, c.data.val_files = "sft", train_file, ""
  return c


def format_table(rows: list[dict[str, Any]], k_pre: int) -> str:
  names = [_LABELS[m] for m in MODELS]
  header = (f"{'k':>3} " + " ".join(f"{'val loss ' + n:>14}" for n in names) + " "
            + " ".join(f"{'acc ' + n:>9}" for n in names))
  lines = [header, "-" * len(header)]
  for r in rows:
    mark = " (k_pre)" if r["k"] == k_pre else ""
    lines.append(f"{r['k']:>3} " + " ".join(f"{r['val_loss_' + m]:>14.4f}" for m in MODELS) + " "
                 + " ".join(f"{r['acc_' + m]:>9.3f}" for m in MODELS) + mark)
  return "\n".join(lines)


def base_model(config, paths: dict[str, str], workdir: str) -> str:
  """The base model's checkpoint: `workdir/base/best`, pre-trained here unless a previous run left it."""
  base_dir = os.path.join(workdir, "base")
  path = os.path.join(base_dir, "best")
  if files.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
    print(f"using the cached base model in {path}", flush=True)
  else:
    print(f"pre-training a base MoE at k_pre on the task families {config.builtin.mixture} "
          f"({config.pretrain.steps} steps) ...", flush=True)
    train.train_and_evaluate(pretrain_config(config, paths), base_dir)
  return path


def run(config, workdir: str) -> dict[str, Any]:
  files.makedirs(workdir)
  paths = prepare_data(config)
  base = base_model(config, paths, workdir)
  print(f"PHDS fine-tuning (k_train in {{{config.phds.k_values}}}, anchoring "
        f"{'on' if config.phds.anchor else 'off'}) for {config.train.steps} steps ...", flush=True)
  summaries = {"phds": train.train_and_evaluate(finetune_config(config, paths, base, "phds"),
                                                os.path.join(workdir, "phds"))}
  print(f"the control: plain SFT at k_pre on the same data for {config.train.steps} steps ...", flush=True)
  summaries["sft"] = train.train_and_evaluate(finetune_config(config, paths, base, "sft"),
                                              os.path.join(workdir, "sft"))
  result_file = os.path.join(workdir, "results.json")
  scored = {"eval": paths["eval"], "base": base, "eval_k": summaries["phds"]["eval_k"],
            "best_step": {m: s["best_step"] for m, s in summaries.items()}}
  result = _stored_result(result_file, scored)
  fresh = result is None
  if fresh:
    result = {**_score(config, paths, base, workdir, summaries), "scored": scored}
    if jax.process_index() == 0:
      files.write_text(result_file, json.dumps(result, indent=2))
  counts = ", ".join(f"{family} {n}" for family, n in result["items_per_family"].items())
  selected = "; ".join(f"{_LABELS[m]} step {s['best_step']} ({s['selected_phase']})" for m, s in summaries.items())
  print(f"\nevaluation: {result['eval_items']} items ({counts}), chance {result['chance']:.2f}; checkpoints "
        f"selected by validation loss at k={summaries['phds']['select_k']}: {selected}")
  print(format_table(result["rows"], result["k_pre"]))
  print(f"wrote {result_file}" if fresh else f"(scored before: {result_file})")
  return result


def _stored_result(path: str, scored: dict[str, Any]) -> Optional[dict[str, Any]]:
  """results.json of an earlier run that scored these same models on these same items, or None."""
  if not files.isfile(path):
    return None
  stored = json.loads(files.read_text(path))
  return stored if stored.get("scored") == json.loads(json.dumps(scored)) else None


def _score(config, paths: dict[str, str], base: str, workdir: str,
           summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Per k: each model's validation loss (the runs' histories; the base's is PHDS's evaluation before its
  first step) and accuracy on the evaluation items, overall and per family."""
  losses = {"base": summaries["phds"]["history"][0]}
  for method, summary in summaries.items():
    losses[method] = next(h for h in summary["history"] if h["step"] == summary["best_step"])
  tokenizer = data_lib.load_tokenizer(paths["tokenizer"])
  items = evaluate.read_multiple_choice(paths["eval"])
  families = {}
  for it in items:
    families.setdefault(it["family"], []).append(it)
  models = {"base": load(base), **{m: load(os.path.join(workdir, m, "best")) for m in ("sft", "phds")}}
  rows = []
  for k in summaries["phds"]["eval_k"]:
    row = {"k": k, **{f"val_loss_{m}": losses[m][f"val_loss_k{k}"] for m in MODELS}}
    for m in MODELS:
      cfg, params = models[m]
      predictions = evaluate.multiple_choice(cfg, params, tokenizer, items, k=k,
                                             expert_backend=config.model.expert_backend)["predictions"]
      correct = [p == it["answer"] for p, it in zip(predictions, items)]
      row[f"acc_{m}"] = sum(correct) / len(items)
      row[f"acc_{m}_by_family"] = {f: sum(c for c, it in zip(correct, items) if it["family"] == f) / len(group)
                                   for f, group in families.items()}
    rows.append(row)
  return {"k_pre": models["phds"][0].k_pre, "chance": 1.0 / len(items[0]["choices"]), "eval_items": len(items),
          "items_per_family": {f: len(group) for f, group in families.items()},
          "best_step": summaries["phds"]["best_step"], "rows": rows}
