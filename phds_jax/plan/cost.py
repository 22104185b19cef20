"""The FLOP model of one token through a MoE decoder at a routing width (used by plans, eval and benchmarks),
and the bytes expert parallelism's token dispatch moves."""

from __future__ import annotations

import numpy as np

from phds_jax.model import layout


def forward_flops_per_token(cfg, width: int, context: float) -> float:
  """Useful forward FLOPs of one token: 2 per weight of every matmul it uses (routed experts: `width` of
  them; the embedding lookup is free unless it is also the head) and causal attention over `context`
  keys on average (scores and values)."""
  flops = 0.0
  for spec in layout.param_layout(cfg):
    if len(spec.layer_shape) < 2 or spec.role == "embed":  # vectors (norms, biases) are no matmul
      continue
    size = float(np.prod(spec.shape))
    flops += 2 * size * (width / cfg.num_experts if spec.kind == "experts" else 1)
  if cfg.tie_word_embeddings:
    flops += 2 * cfg.vocab_size * cfg.hidden_size
  heads_width = cfg.num_attention_heads * cfg.resolved_head_dim
  return flops + cfg.num_hidden_layers * 2 * 2 * heads_width * context


def dispatch_bytes(tokens: float, width: int, hidden: int, group: int, itemsize: int) -> dict[str, float]:
  """Bytes one device sends for one MoE layer's forward under expert parallelism over `group` devices, for
  `tokens` local tokens routed to `width` experts each (model/expert_parallel.py):
    - all_to_all_expected: each assignment leaves the device unless its expert is local (1 / group of them
      for uniform routing), there and back;
    - all_to_all_buffers: what the ragged all-to-alls' receive buffers hold (room for the worst case: the
      group's every assignment on one device, and every result back);
    - all_gather: the group's tokens gathered on every member and the outputs reduce-scattered."""
  row = float(hidden * itemsize)
  return {"all_to_all_expected": 2 * tokens * width * row * (group - 1) / group,
          "all_to_all_buffers": (group + 1) * tokens * width * row,
          "all_gather": 2 * (group - 1) * tokens * row}
