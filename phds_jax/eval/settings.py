"""How k grids and the eval job's fields are read: one parser, one policy, one message per mistake.

Light on purpose (no jax): the config checks read every field through here before any work starts.
"""

from __future__ import annotations

from typing import Optional


def parse_numbers(value, cast=int) -> tuple:
  """'2,4,8' / (2, 4, 8) / 4 -> (2, 4, 8) / (4,): how configs spell number lists on the command line."""
  if isinstance(value, str):
    parts = [p for p in value.replace(" ", "").strip("()[]").split(",") if p]
  elif isinstance(value, (int, float)):
    parts = [value]
  else:
    parts = list(value)
  try:
    return tuple(cast(p) for p in parts)
  except ValueError:
    raise ValueError(f"expected comma-separated {cast.__name__}s, got {value!r}") from None


def k_grid_problems(field: str, value, num_experts: Optional[int]) -> list[str]:
  """The mistakes of a k list (form, emptiness, each k in [1, num_experts]); num_experts None: form only."""
  try:
    ks = parse_numbers(value)
  except ValueError as e:
    return [f"{field}={value!r}: {e}"]
  if not ks:
    return [f"{field}: required; pass comma-separated k values"]
  bad = [k for k in ks if not 1 <= k <= (num_experts or k)]
  if not bad:
    return []
  if num_experts:
    return [f"{field}={value!r}: k={bad[0]} is outside [1, {num_experts}] (the model has {num_experts} experts)"]
  return [f"{field}={value!r}: k={bad[0]}, but k counts experts: 1 or more"]


def k_grid(value, num_experts: int, field: str = "eval.k_values") -> list[int]:
  """The sorted distinct k of a k list; ValueError naming `field` when one lies outside [1, num_experts]
  (the one policy of every mode: a k the model cannot run is a mistake, never silently dropped)."""
  problems = k_grid_problems(field, value, num_experts)
  if problems:
    raise ValueError(problems[0])
  return sorted(set(parse_numbers(value)))


def eval_roe_settings(config) -> tuple[list[tuple[int, float]], list[str]]:
  """(members, tau) pairs of `eval.roe` ("4:0.5,8:1.0"; members >= 2, tau > 0) and the problems of bad ones."""
  out, problems = [], []
  for entry in (e.strip() for e in config.eval.roe.split(",") if e.strip()):
    members, _, tau = entry.partition(":")
    try:
      pair = (int(members), float(tau))
    except ValueError:
      pair = None
    if pair is None or pair[0] < 2 or not pair[1] > 0:
      problems.append(f"eval.roe: entry {entry!r} must be members:tau with members >= 2 and tau > 0 (e.g. 4:0.5)")
    else:
      out.append(pair)
  return out, problems


def eval_checkpoints(config) -> tuple[dict[str, tuple[str, str]], list[str]]:
  """The eval job's checkpoints, label -> (config field, path), from `model_path` (labelled `eval.label`,
  default "model") and `eval.compare` ("label=path,label2=path2"), and the problems of malformed entries."""
  out, problems = {}, []
  if config.model_path:
    out[config.eval.label or "model"] = ("model_path", config.model_path)
  for entry in (e.strip() for e in config.eval.compare.split(",") if e.strip()):
    if "=" not in entry:
      problems.append(f"eval.compare: entry {entry!r} must be label=path")
      continue
    label, path = (part.strip() for part in entry.split("=", 1))
    out[label] = (f"eval.compare[{label}]", path)
  return out, problems
