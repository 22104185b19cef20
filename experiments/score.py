"""Scoring the study's multiple-choice items per task (every model of the study, the base's report, RoE)."""

from __future__ import annotations

from typing import Any


def score_tasks(cfg, params, tokenizer, tasks: dict[str, list[dict[str, Any]]], k: int, *, roe=None,
                batch_size: int = 64) -> dict[str, dict[str, Any]]:
  """Each task's accuracy, its standard error, n, and per item the predicted choice, whether it is right and
  the answer's NLL (summed over its tokens) at top-k (with `roe`, of that routing ensemble); all tasks'
  items scored in one call (one compiled shape instead of one per task)."""
  from phds_jax.eval import scoring  # pylint: disable=g-import-not-at-top

  items = [it for task in tasks.values() for it in task]
  scored = scoring.multiple_choice(cfg, params, tokenizer, items, k=k, batch_size=batch_size, roe=roe)
  out, at = {}, 0
  for name, task in tasks.items():
    mine = scored["predictions"][at:at + len(task)]
    correct = [p == it["answer"] for p, it in zip(mine, task)]
    out[name] = {"acc": float(sum(correct) / len(task)), "n": len(task), "predictions": mine,
                 "acc_se": scoring.standard_error(correct), "correct": [int(c) for c in correct],
                 "answer_nll": [round(-v, 5) for v in scored["answer_logprobs"][at:at + len(task)]]}
    at += len(task)
  return out
