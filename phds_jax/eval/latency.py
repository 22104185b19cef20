"""Latency and throughput at a declared k, measured after compilation (median of repeats).

prefill: one forward over [batch, prompt_len] tokens at static k -> tokens/s (with a Roster-of-Experts
ensemble: its scoring forward, members x batch rows).
decode: generate() with stop tokens off; ms per new token = (time for n tokens - time for 1) / (n - 1),
so the prefill and the program launch cancel out.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.eval.generate import generate
from phds_jax.model.config import ModelConfig
from phds_jax.model.roe import RoE
from phds_jax.model.transformer import forward


def interleaved_medians(fns: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, float]:
  """{name: fn} -> {name: median wall seconds of fn() (blocked until ready)}: one warm-up call each, then
  `repeats` rounds calling each fn once in turn, so drift in the machine's speed hits all of them alike."""
  times = {name: [] for name in fns}
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile and warm up
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of `fn()` (blocked until ready) over `repeats` calls after one warm-up call."""
  return interleaved_medians({"fn": fn}, repeats)["fn"]


def measure(cfg: ModelConfig, params, k: int, *, batch_size: int = 1, prompt_len: int = 128,
            decode_tokens: int = 16, repeats: int = 3, seed: int = 0, expert_backend: str = "auto",
            roe: Optional[RoE] = None) -> dict[str, Any]:
  """prefill tokens/s and decode ms/token at top-k for random prompts of `prompt_len` tokens (with `roe`,
  of that routing ensemble, which prefills its clean cache with the deterministic model and decodes M rows
  per sequence against it: `generate`'s algorithm, the one `forward(roe=...)` scores with)."""
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch_size, prompt_len)), jnp.int32)
  prefill = median_seconds(lambda: forward(cfg, params, tokens, k=k, expert_backend=expert_backend), repeats)
  prompts = np.asarray(tokens).tolist()

  def run(n):
    return lambda: generate(cfg, params, prompts, max_new_tokens=n, k=k, stop_tokens=[], bucket=decode_tokens,
                            expert_backend=expert_backend, roe=roe)

  one, many = median_seconds(run(1), repeats), median_seconds(run(decode_tokens), repeats)
  device = jax.devices()[0]
  return {"prefill_tokens_per_s": batch_size * prompt_len / prefill, "prefill_ms": 1e3 * prefill,
          "decode_ms_per_token": 1e3 * max(many - one, 0.0) / max(decode_tokens - 1, 1),
          "batch_size": batch_size, "prompt_len": prompt_len, "dtype": str(jax.tree.leaves(params)[0].dtype),
          "device": f"{device.platform}:{device.device_kind}"}
