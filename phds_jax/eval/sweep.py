"""A k sweep of one model: how its next-token predictions and its forward time move as k is dialled.

For each k: agreement of the greedy next token with the reference k (k_pre by default), mean KL from the
reference distribution, routed expert parameters per token, and the median forward time after
compilation. This is `mode="sweep"` (configs/tiny.py); full evaluation suites build on it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from phds_jax.eval import scoring
from phds_jax.eval import settings
from phds_jax.eval.latency import median_seconds
from phds_jax.io import files
from phds_jax.io import hf
from phds_jax.io.load import load, load_run_model
from phds_jax.model.config import ModelConfig
from phds_jax.model.transformer import forward


def active_expert_params(cfg: ModelConfig, k: int) -> int:
  """Routed-expert parameters each token uses at top-k (all MoE layers together)."""
  per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
  return len(cfg.moe_layer_indices) * k * per_expert


def k_sweep(cfg: ModelConfig, params, tokens, ks: Sequence[int], *, reference_k: Optional[int] = None,
            repeats: int = 3, expert_backend: str = "auto") -> list[dict[str, Any]]:
  """One row per k: top-1 agreement and KL against `reference_k` (default k_pre), latency, params."""
  reference_k = reference_k or cfg.k_pre

  def run(k):
    return forward(cfg, params, tokens, k=k, expert_backend=expert_backend)

  ref_logp = jax.nn.log_softmax(run(reference_k).astype(jnp.float32))
  every = jnp.ones(ref_logp.shape[:-1], jnp.float32)
  rows = []
  for k in ks:
    same, kl = scoring.agreement_sums(ref_logp, jax.nn.log_softmax(run(k).astype(jnp.float32)), every)
    seconds = median_seconds(lambda k=k: run(k), repeats)
    rows.append(dict(k=int(k), top1_agreement=float(same / every.size),
                     mean_kl=float(kl / every.size), active_expert_params=active_expert_params(cfg, k),
                     forward_ms=1e3 * seconds, tokens_per_s=tokens.size / seconds))
    print(f"  k={k} done", flush=True)
  return rows


def format_table(rows: list[dict[str, Any]], reference_k: int) -> str:
  header = f"{'k':>3} {'agree@k' + str(reference_k):>10} {'KL':>9} {'expert params/tok':>18} {'ms/fwd':>8} {'tok/s':>9}"
  lines = [header, "-" * len(header)]
  for r in rows:
    lines.append(f"{r['k']:>3} {r['top1_agreement']:>10.3f} {r['mean_kl']:>9.4f} "
                 f"{r['active_expert_params']:>18,} {r['forward_ms']:>8.2f} {r['tokens_per_s']:>9.0f}")
  return "\n".join(lines)


def _model_for(config, workdir: str):
  """The model to sweep: `model_path` (HF or orbax), or a random preset exported and re-read as HF."""
  dtype = config.model.param_dtype
  if config.model_path:
    return load(config.model_path, dtype=dtype)
  name = config.model.preset
  cfg, params = load_run_model(config)
  hf_dir = os.path.join(workdir, "random_" + name.replace("-", "_"))
  hf.save_pretrained(cfg, params, hf_dir, overwrite=True)
  print(f"built a random {name} and exported it to {hf_dir}", flush=True)
  return load(hf_dir, dtype=dtype)


def run(config, workdir: str) -> list[dict[str, Any]]:
  """`mode="sweep"` entry point: prints the table and writes `workdir/sweep.json`."""
  files.makedirs(workdir)
  cfg, params = _model_for(config, workdir)
  ks = settings.k_grid(config.eval.k_values, cfg.num_experts)
  batch, seq_len = config.eval.batch_size, config.data.seq_len
  tokens = jax.random.randint(jax.random.key(config.seed + 1), (batch, seq_len), 0, cfg.vocab_size, jnp.int32)
  rows = k_sweep(cfg, params, tokens, ks, reference_k=config.eval.reference_k or None,
                 repeats=config.eval.latency.repeats, expert_backend=config.model.expert_backend)
  print(f"{cfg.model_type}: {sum(x.size for x in jax.tree.leaves(params)):,} parameters, "
        f"{cfg.num_experts} experts, k_pre={cfg.k_pre}, device={jax.devices()[0].platform}, "
        f"batch {batch} x {seq_len} tokens")
  print(format_table(rows, cfg.k_pre))
  out = os.path.join(workdir, "sweep.json")
  files.write_text(out, json.dumps({"model_type": cfg.model_type, "k_pre": cfg.k_pre, "rows": rows}, indent=2))
  print(f"wrote {out}")
  return rows
