"""The FLOP model of one token through a MoE decoder at a routing width (used by plans, eval and benchmarks)."""

from __future__ import annotations

import numpy as np

from phds_jax.model import layout


def forward_flops_per_token(cfg, width: int, context: float) -> float:
  """Useful forward FLOPs of one token: 2 per weight of every matmul it uses (routed experts: `width` of
  them; the embedding lookup is free unless it is also the head) and causal attention over `context`
  keys on average (scores and values)."""
  flops = 0.0
  for spec in layout.param_layout(cfg):
    if len(spec.shape) < 2 or spec.role == "embed":
      continue
    size = float(np.prod(spec.shape))
    flops += 2 * size * (width / cfg.num_experts if spec.kind == "experts" else 1)
  if cfg.tie_word_embeddings:
    flops += 2 * cfg.vocab_size * cfg.hidden_size
  heads_width = cfg.num_attention_heads * cfg.resolved_head_dim
  return flops + cfg.num_hidden_layers * 2 * 2 * heads_width * context
