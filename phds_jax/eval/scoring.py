"""Scoring at a declared k: mean NLL (perplexity), continuation log-likelihoods, multiple choice, agreement.

A multiple-choice item is {"context": str, "choices": [str, ...], "answer": int}. Each choice is scored
by the summed log-probability of its tokens after the context; `acc` takes the best sum, `acc_norm` the
best sum per character of the choice (lm-evaluation-harness's length normalisation).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.data.tasks import TaskFormatError, read_multiple_choice  # noqa: F401  (pj.evaluate's API)
from phds_jax.model.losses import RunSpec, token_nll, trained_positions
from phds_jax.model.config import ModelConfig
from phds_jax.model.roe import RoE, ensemble_argmax, ensemble_target_log_probs
from phds_jax.model.transformer import forward, project_logits, resolve_expert_backend

log = logging.getLogger("phds_jax")

Params = dict[str, Any]


@functools.partial(jax.jit, static_argnames=("cfg", "k", "expert_backend", "with_greedy"))
def _score_batch(cfg, params, tokens, segment_ids, where, targets, weights, k, expert_backend, roe=None,
                 with_greedy=False):
  """Summed log-probs of `targets` [B, C] predicted at positions `where` [B, C] (weights mask padding) and,
  with_greedy, whether every target is the argmax (else None)."""
  members = 1 if roe is None else roe.members
  hidden = forward(cfg, params, tokens, k=k, segment_ids=segment_ids, return_hidden=True,
                   expert_backend=expert_backend, roe=roe)  # [members * B, L, H]
  hidden = jnp.take_along_axis(hidden, jnp.tile(where, (members, 1))[..., None], axis=1)  # only where scored
  logits = project_logits(cfg, params, hidden)  # [members * B, C, V]
  picked = ensemble_target_log_probs(logits, targets, members)
  greedy = None
  if with_greedy:
    greedy = jnp.all((ensemble_argmax(logits, members) == targets) | (weights == 0), axis=-1)
  return jnp.sum(picked * weights, axis=-1), greedy


def continuation_logprobs(cfg: ModelConfig, params, pairs: Sequence[tuple[list[int], list[int]]], *, k: int,
                          batch_size: int = 32, truncate: bool = True, return_greedy: bool = False,
                          expert_backend: str = "auto", roe: Optional[RoE] = None):
  """Summed log p(continuation | context) for each (context ids, continuation ids) pair, at top-k.

  With return_greedy also a bool per pair: every continuation token is the argmax given its prefix.
  A pair longer than max_position_embeddings loses context tokens from the left (logged), or raises
  ValueError naming the pair when `truncate` is False. Pairs are batched in order of length and each batch
  is padded to its own length bucket (a multiple of 16): short pairs never pay for the longest one.
  roe: score with a Roster-of-Experts ensemble (pj.RoE): log-probabilities of the members' mean.
  """
  expert_backend = resolve_expert_backend(expert_backend)
  limit = cfg.max_position_embeddings
  for i, (context, continuation) in enumerate(pairs):
    if not continuation:
      raise ValueError(f"pair {i}: empty continuation")
    if len(context) + len(continuation) > limit:
      if not truncate:
        raise ValueError(f"pair {i}: {len(context) + len(continuation)} tokens exceed "
                         f"max_position_embeddings={limit}")
      log.warning("pair %d: %d tokens; dropping context from the left to fit %d", i,
                  len(context) + len(continuation), limit)
  out = np.zeros(len(pairs), np.float64)
  greedy = np.zeros(len(pairs), bool)
  order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
  for start in range(0, len(pairs), batch_size):
    where_in_pairs = order[start:start + batch_size]
    chunk = [pairs[i] for i in where_in_pairs]
    max_len = min(limit, _bucket(max(len(c) + len(x) for c, x in chunk)))
    max_cont = min(max_len - 1, _bucket(max(len(x) for _, x in chunk), 4))
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
    scores, is_greedy = _score_batch(cfg, params, jnp.asarray(tokens), jnp.asarray(segments),
                                     jnp.asarray(where), jnp.asarray(targets), jnp.asarray(weights), k,
                                     expert_backend, roe, return_greedy)
    out[where_in_pairs] = np.asarray(scores)[:len(chunk)]
    if return_greedy:
      greedy[where_in_pairs] = np.asarray(is_greedy)[:len(chunk)]
  return (out, greedy) if return_greedy else out


def _bucket(n: int, multiple: int = 16) -> int:
  """Rounds up so that few distinct shapes get compiled."""
  return -(-n // multiple) * multiple


def projected_positions(batches: Sequence[dict[str, np.ndarray]]) -> int:
  """max_loss_tokens for mean_nll / next_token_agreement that still scores every trained token of
  `batches`: the most trained tokens of any row, rounded up to a multiple of 16; 0 (all positions) when
  that is the row length (text). SFT rows train on answers only, so this skips most of the
  [rows, length, vocabulary] logits."""
  if not batches:
    return 0
  most = max(int((batch["weights"] > 0).sum(axis=1).max()) for batch in batches)
  cap = _bucket(max(most, 1))
  return cap if cap < batches[0]["weights"].shape[1] else 0


def multiple_choice(cfg: ModelConfig, params, tokenizer, items: Sequence[dict[str, Any]], *, k: int,
                    batch_size: int = 32, truncate: bool = True, expert_backend: str = "auto",
                    roe: Optional[RoE] = None) -> dict[str, Any]:
  """acc, acc_norm (each with its standard error over items, *_se), the item count n, the predicted choices
  (raw and length-normalised) and the answer's log-probability (summed over its tokens) per item at top-k
  (with `roe`, by a routing ensemble)."""
  pairs = []
  for item in items:
    context = tokenizer.encode(item["context"], add_special_tokens=False)
    pairs += [(context, tokenizer.encode(choice, add_special_tokens=False)) for choice in item["choices"]]
  scores = continuation_logprobs(cfg, params, pairs, k=k, batch_size=batch_size, truncate=truncate,
                                 expert_backend=expert_backend, roe=roe)
  predicted, predicted_norm, answer_logprobs = [], [], []
  at = 0
  for item in items:
    s = scores[at:at + len(item["choices"])]
    lengths = np.array([max(1, len(c)) for c in item["choices"]], np.float64)
    predicted.append(int(np.argmax(s)))
    predicted_norm.append(int(np.argmax(s / lengths)))
    answer_logprobs.append(float(s[item["answer"]]))
    at += len(item["choices"])
  answers = np.array([item["answer"] for item in items])
  correct, correct_norm = np.array(predicted) == answers, np.array(predicted_norm) == answers
  return {"acc": float(np.mean(correct)), "acc_se": standard_error(correct),
          "acc_norm": float(np.mean(correct_norm)), "acc_norm_se": standard_error(correct_norm),
          "predictions": predicted, "predictions_norm": predicted_norm, "answer_logprobs": answer_logprobs,
          "n": len(items)}


def standard_error(values) -> float:
  """Standard error of the mean of per-item values (sample standard deviation / sqrt(n)); 0 for n < 2."""
  values = np.asarray(values, np.float64)
  return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def mean_nll(cfg: ModelConfig, params, batches: Sequence[dict[str, np.ndarray]], *, k: int,
             max_loss_tokens: int = 0, place: Optional[Callable] = None,
             expert_backend: str = "auto", roe: Optional[RoE] = None) -> dict[str, float]:
  """Mean NLL per trained token of packed rows (data.eval_batches) at top-k, its perplexity, the count.

  place: host batch -> device arrays (the trainer shards them over its mesh); default jnp.asarray.
  roe: the NLL of a Roster-of-Experts ensemble's next-token distribution (pj.RoE).
  """
  place = place or (lambda batch: {key: jnp.asarray(v) for key, v in batch.items()})
  expert_backend = resolve_expert_backend(expert_backend)
  total, count = 0.0, 0.0
  for batch in batches:
    if roe is not None:
      nll_sum, weight = _ensemble_nll_batch(cfg, params, place(batch), k, max_loss_tokens, expert_backend, roe)
    else:
      nll_sum, weight = _nll_batch(cfg, params, place(batch), RunSpec(k, max_loss_tokens=max_loss_tokens,
                                                                      expert_backend=expert_backend))
    total, count = total + float(nll_sum), count + float(weight)
  nll = total / max(count, 1.0)
  return {"nll": nll, "ppl": float(np.exp(min(nll, 80.0))), "tokens": int(count)}


@functools.partial(jax.jit, static_argnames=("cfg", "run"))
def _nll_batch(cfg, params, batch, run):
  nll_sum, weight, _ = token_nll(cfg, params, batch, run)
  return nll_sum, weight


@functools.partial(jax.jit, static_argnames=("cfg", "k", "max_loss_tokens", "expert_backend"))
def _ensemble_nll_batch(cfg, params, batch, k, max_loss_tokens, expert_backend, roe):
  hidden = forward(cfg, params, batch["inputs"], k=k, positions=batch["positions"],
                   segment_ids=batch["segment_ids"], return_hidden=True, expert_backend=expert_backend,
                   roe=roe)  # [members * B, L, H]
  weights, targets = trained_positions(max_loss_tokens, batch["weights"], batch["targets"])
  _, hidden = trained_positions(max_loss_tokens, roe.tile(batch["weights"]), hidden)  # each member's own rows
  picked = ensemble_target_log_probs(project_logits(cfg, params, hidden), targets, roe.members)
  return -jnp.sum(picked * weights), jnp.sum(weights)


def next_token_agreement(cfg: ModelConfig, params, batches: Sequence[dict[str, np.ndarray]], *, k: int,
                         reference_k: int, max_loss_tokens: int = 0,
                         expert_backend: str = "auto") -> dict[str, float]:
  """Over the trained positions of `batches`: share of greedy next tokens equal to those at reference_k,
  and the mean KL(reference || k) of the next-token distributions. max_loss_tokens > 0 projects only that
  many positions per row to the vocabulary (those with the largest weights; see mean_nll)."""
  expert_backend = resolve_expert_backend(expert_backend)
  same, kl, count = 0.0, 0.0, 0.0
  for batch in batches:
    s, d, c = _agreement_batch(cfg, params, {key: jnp.asarray(v) for key, v in batch.items()}, k, reference_k,
                               max_loss_tokens, expert_backend)
    same, kl, count = same + float(s), kl + float(d), count + float(c)
  return {"top1_agreement": same / max(count, 1.0), "mean_kl": kl / max(count, 1.0)}


@functools.partial(jax.jit, static_argnames=("cfg", "k", "reference_k", "max_loss_tokens", "expert_backend"))
def _agreement_batch(cfg, params, batch, k, reference_k, max_loss_tokens, expert_backend):
  def logp(k_value):
    hidden = forward(cfg, params, batch["inputs"], k=k_value, positions=batch["positions"],
                     segment_ids=batch["segment_ids"], return_hidden=True, expert_backend=expert_backend)
    _, hidden = trained_positions(max_loss_tokens, batch["weights"], hidden)
    return jax.nn.log_softmax(project_logits(cfg, params, hidden).astype(jnp.float32), axis=-1)

  w = trained_positions(max_loss_tokens, batch["weights"])[0]
  same, kl = agreement_sums(logp(reference_k), logp(k), w)
  return same, kl, jnp.sum(w)


def agreement_sums(ref_logp: jax.Array, logp: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The one definition of cross-k agreement: (sum of weights where the greedy next tokens agree, sum of
  weighted KL(reference || other)). ref_logp, logp: [..., vocab] log-probabilities; weights: [...]."""
  same = jnp.sum((jnp.argmax(ref_logp, -1) == jnp.argmax(logp, -1)) * weights)
  kl = jnp.sum(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1) * weights)
  return same, kl
