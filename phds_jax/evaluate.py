"""Evaluation at a declared k: log-likelihood scoring and multiple-choice accuracy.

An item is {"context": str, "choices": [str, ...], "answer": int}. Each choice is scored by the summed
log-probability of its tokens after the context; `acc` takes the best sum, `acc_norm` the best sum per
byte of the choice (lm-evaluation-harness's length normalisation).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.data import DataError, ReadStats, read_jsonl
from phds_jax.model.config import ModelConfig
from phds_jax.model.transformer import forward, project_logits


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


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def _score_batch(cfg, params, tokens, segment_ids, where, targets, weights, k):
  """Summed log-probs of `targets` [B, C] predicted at positions `where` [B, C] (weights mask padding)."""
  hidden = forward(cfg, params, tokens, k=k, segment_ids=segment_ids, return_hidden=True)
  hidden = jnp.take_along_axis(hidden, where[..., None], axis=1)  # [B, C, H]: logits only where scored
  logp = jax.nn.log_softmax(project_logits(cfg, params, hidden).astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(picked * weights, axis=-1)


def continuation_logprobs(cfg: ModelConfig, params, pairs: Sequence[tuple[list[int], list[int]]], *, k: int,
                          batch_size: int = 32) -> np.ndarray:
  """Summed log p(continuation | context) for each (context ids, continuation ids) pair, at top-k."""
  max_len = _bucket(min(cfg.max_position_embeddings, max(len(c) + len(x) for c, x in pairs)))
  max_cont = _bucket(max(len(x) for _, x in pairs), 4)
  out = np.zeros(len(pairs), np.float64)
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    tokens = np.zeros((batch_size, max_len), np.int32)
    segments = np.zeros((batch_size, max_len), np.int32)
    where = np.zeros((batch_size, max_cont), np.int32)
    targets = np.zeros((batch_size, max_cont), np.int32)
    weights = np.zeros((batch_size, max_cont), np.float32)
    for row, (context, continuation) in enumerate(chunk):
      seq = (list(context) + list(continuation))[-max_len:]  # keep the end: the continuation
      n = min(len(continuation), len(seq) - 1, max_cont)
      tokens[row, :len(seq)] = seq
      segments[row, :len(seq)] = 1
      where[row, :n] = np.arange(len(seq) - n - 1, len(seq) - 1)
      targets[row, :n] = seq[len(seq) - n:]
      weights[row, :n] = 1.0
    scores = _score_batch(cfg, params, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(where),
                          jnp.asarray(targets), jnp.asarray(weights), k)
    out[start:start + len(chunk)] = np.asarray(scores)[:len(chunk)]
  return out


def _bucket(n: int, multiple: int = 16) -> int:
  """Rounds up so that few distinct shapes get compiled."""
  return -(-n // multiple) * multiple


def multiple_choice(cfg: ModelConfig, params, tokenizer, items: Sequence[dict[str, Any]], *, k: int,
                    batch_size: int = 32) -> dict[str, Any]:
  """acc, acc_norm and the predicted choice per item at top-k."""
  pairs, owners = [], []
  for i, item in enumerate(items):
    context = tokenizer.encode(item["context"], add_special_tokens=False)
    for choice in item["choices"]:
      pairs.append((context, tokenizer.encode(choice, add_special_tokens=False)))
      owners.append(i)
  scores = continuation_logprobs(cfg, params, pairs, k=k, batch_size=batch_size)
  predicted, predicted_norm = [], []
  at = 0
  for item in items:
    n = len(item["choices"])
    s = scores[at:at + n]
    lengths = np.array([max(1, len(c.encode("utf-8"))) for c in item["choices"]])
    predicted.append(int(np.argmax(s)))
    predicted_norm.append(int(np.argmax(s / lengths)))
    at += n
  answers = np.array([item["answer"] for item in items])
  return {"acc": float(np.mean(np.array(predicted) == answers)),
          "acc_norm": float(np.mean(np.array(predicted_norm) == answers)),
          "predictions": predicted, "n": len(items)}
