"""The study's data: the synthetic task families (phds_jax/data/synthetic.py) split by seed into evaluation
and fine-tuning items (no group in both; "after" is never fine-tuned on), written once per seed; and
reading them back for evaluation."""

from __future__ import annotations

import json
import os
import random
from typing import Any

from experiments.settings import Settings

Item = dict[str, Any]


def seed_items(settings: Settings, seed: int) -> dict[str, tuple[list[Item], list[Item]]]:
  """family -> (evaluation items, fine-tuning items) of `seed` (phds_jax.data.synthetic.split: no group in
  both; a family with 0 fine-tuning items is never fine-tuned on)."""
  from phds_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  return {family: synthetic.split(family, n_eval, n_train, seed)
          for family, (n_eval, n_train) in settings.synthetic_tasks.items()}


def prepare_seed_data(settings: Settings, out_dir: str, seed: int) -> dict[str, Any]:
  """Writes `out_dir/{train.jsonl, heldout.jsonl, eval_<family>.jsonl, split.json}` once; returns split.json.

  train.jsonl: prompt/response of every family's fine-tuning items, shuffled together; heldout.jsonl: the
  evaluation items as prompt/response (the held-out answer NLL); eval_<family>.jsonl: multiple-choice items."""
  from phds_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from phds_jax.io import files  # pylint: disable=g-import-not-at-top

  split_file = os.path.join(out_dir, "split.json")
  if os.path.isfile(split_file):
    with open(split_file, encoding="utf-8") as f:
      return json.load(f)
  os.makedirs(out_dir, exist_ok=True)
  train, heldout, counts = [], [], {}
  for family, (evaluation, fine_tune) in seed_items(settings, seed).items():
    files.write_jsonl(os.path.join(out_dir, f"eval_{family}.jsonl"),
                      [synthetic.as_multiple_choice(it) for it in evaluation])
    train += [synthetic.as_sft(it) for it in fine_tune]
    heldout += [synthetic.as_sft(it) for it in evaluation]
    counts[family] = {"eval_items": len(evaluation), "train_items": len(fine_tune)}
  random.Random(seed + 2).shuffle(train)
  files.write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
  files.write_jsonl(os.path.join(out_dir, "heldout.jsonl"), heldout)
  split = {"seed": seed, "tasks": counts}
  with open(split_file, "w", encoding="utf-8") as f:
    json.dump(split, f, indent=2)
  return split


def evaluation_tasks(settings: Settings, data_dir: str) -> dict[str, list[Item]]:
  """family -> the seed's evaluation items (eval_<family>.jsonl)."""
  from phds_jax.eval import scoring  # pylint: disable=g-import-not-at-top

  return {name: scoring.read_multiple_choice(os.path.join(data_dir, f"eval_{name}.jsonl")) for name in settings.synthetic_tasks}


def heldout_batches(settings: Settings, tokenizer, data_dir: str) -> list[dict[str, Any]]:
  """The evaluation items' answers (heldout.jsonl) packed for mean_nll (settings.heldout_loss_tokens)."""
  from phds_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  heldout = pipeline.read_sft(os.path.join(data_dir, "heldout.jsonl"), tokenizer)
  packed = pipeline.pack(heldout, settings.finetune["seq_len"], max_loss_tokens=settings.heldout_loss_tokens)
  return pipeline.eval_batches(packed, 16)
