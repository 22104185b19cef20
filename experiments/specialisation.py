"""Do the experts specialise? Which experts each task family's tokens are routed to, per MoE layer, and how
much the family tells about the expert: the entropy of each family's expert use and the mutual information
between family and expert (normalised by log E: 0 = every family uses the experts alike, 1 = the expert
determines the family)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def expert_use(cfg, params, tokenizer, items_by_family: Mapping[str, Sequence[dict[str, Any]]], k: int,
               batch_size: int = 64) -> dict[str, np.ndarray]:
  """family -> [moe layers, E] counts of the top-k selections made by the tokens of its items' contexts
  (the question, without the answer)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  import phds_jax as pj  # pylint: disable=g-import-not-at-top

  out = {}
  for family, items in items_by_family.items():
    ids = [tokenizer.encode(item["context"], add_special_tokens=False) for item in items]
    length = max(len(i) for i in ids)
    total = np.zeros((len(cfg.moe_layer_indices), cfg.num_experts))
    for start in range(0, len(ids), batch_size):
      chunk = ids[start:start + batch_size]
      tokens = np.zeros((batch_size, length), np.int32)
      segments = np.zeros((batch_size, length), np.int32)  # 0 = padding: not counted
      for row, seq in enumerate(chunk):
        tokens[row, :len(seq)], segments[row, :len(seq)] = seq, 1
      _, aux = pj.forward(cfg, params, jnp.asarray(tokens), k=k, segment_ids=jnp.asarray(segments),
                          return_aux=True)
      total += np.asarray(aux["expert_counts"], np.float64)
    out[family] = total
  return out


def _entropy(p: np.ndarray) -> np.ndarray:
  p = p / p.sum(axis=-1, keepdims=True)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def summary(use: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Per layer: each family's expert-use entropy / log E (1 = uniform over the experts), the pooled one, and
  the family-expert mutual information / log E; each family's most used experts per layer."""
  families = list(use)
  counts = np.stack([use[f] for f in families])  # [F, L, E]
  num_experts = counts.shape[-1]
  pooled = counts.sum(axis=0)  # [L, E]
  family_weight = counts.sum(axis=-1) / counts.sum(axis=(0, 2))  # [F, L]: each family's share of tokens
  within = np.sum(family_weight * _entropy(counts), axis=0)  # [L]
  mutual = _entropy(pooled) - within
  return {
      "entropy": {f: (_entropy(counts[i]) / np.log(num_experts)).round(3).tolist() for i, f in enumerate(families)},
      "entropy_pooled": (_entropy(pooled) / np.log(num_experts)).round(3).tolist(),
      "mutual_information": (mutual / np.log(num_experts)).round(3).tolist(),
      "top_experts": {f: [np.argsort(-layer)[:3].tolist() for layer in counts[i]] for i, f in enumerate(families)},
  }
