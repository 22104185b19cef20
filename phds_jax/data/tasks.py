"""Multiple-choice items: {"context": str, "choices": [str, ...], "answer": int} per JSONL line."""

from __future__ import annotations

from typing import Any

from phds_jax.data.pipeline import DataError, ReadStats, read_jsonl


class TaskFormatError(DataError):
  """A multiple-choice item is malformed; the message names the file and line."""


def read_multiple_choice(path: str) -> list[dict[str, Any]]:
  """Validated items from a JSONL file of {"context", "choices", "answer"}."""
  items = []
  for where, item in read_jsonl(path, ReadStats(), on_error="raise"):
    if not isinstance(item.get("context"), str):
      raise TaskFormatError(f'{where}: expected an object with a string "context"')
    choices = item.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
      raise TaskFormatError(f'{where}: "choices" must list at least two strings')
    answer = item.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
      raise TaskFormatError(f'{where}: "answer"={answer!r} is not an index into its {len(choices)} choices')
    items.append(item)
  if not items:
    raise TaskFormatError(f"{path}: no items")
  return items
