"""Training objectives: token NLL and the router losses, behind one pluggable signature.

An objective maps (model, params, a micro-batch, how to run the model) to `LossTerms`; the trainer sums
them over micro-batches and minimises token_loss_sum / (trained tokens in the step) + extra_loss / micro-
batches. `OBJECTIVES` names them for `train.objective`; a new objective (say, distillation from k_pre to
k_train) is one function registered there.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from phds_jax.model.config import ModelConfig
from phds_jax.model.transformer import forward, project_logits


class RunSpec(NamedTuple):
  """How the objective runs the model: the declared k and the execution choices (all static but k)."""

  k: Any  # static ints (one per MoE layer) or traced int32 scalars
  k_max: Any = None
  soft_mask_eps: Any = None
  max_loss_tokens: int = 0
  expert_backend: str = "auto"
  remat: str = "none"  # model.transformer.REMAT_POLICIES name
  scan_layers: bool = True  # scanned or unrolled decoder layers (the same function)


class LossTerms(NamedTuple):
  token_loss_sum: jax.Array  # summed over trained tokens (normalised by the step's token count)
  weight: jax.Array  # trained tokens in this micro-batch
  extra_loss: jax.Array  # per-micro-batch mean terms (router losses)
  metrics: dict[str, jax.Array]  # per-micro-batch scalars to log (averaged over micro-batches)


def token_nll(cfg: ModelConfig, params, batch: dict[str, jax.Array], run: RunSpec):
  """Summed next-token NLL over weighted positions, the weight sum, and the router auxiliaries.

  With run.max_loss_tokens > 0 only that many positions per row (those with the largest weights) get
  logits: SFT batches train on few tokens and the vocabulary projection dominates otherwise.
  """
  hidden, aux = forward(cfg, params, batch["inputs"], k=run.k, k_max=run.k_max, soft_mask_eps=run.soft_mask_eps,
                        positions=batch["positions"], segment_ids=batch["segment_ids"], return_aux=True,
                        return_hidden=True, expert_backend=run.expert_backend, remat=run.remat,
                        scan_layers=run.scan_layers)
  weights, hidden, targets = trained_positions(run.max_loss_tokens, batch["weights"], hidden, batch["targets"])
  logits = project_logits(cfg, params, hidden).astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(nll * weights), jnp.sum(weights), aux


def trained_positions(max_loss_tokens: int, weights: jax.Array, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """(weights, *arrays) at the max_loss_tokens positions per row with the largest weights ([B, L, ...] ->
  [B, C, ...]), or unchanged when max_loss_tokens is 0: only those positions need the vocabulary projection."""
  if not max_loss_tokens:
    return (weights, *arrays)
  _, index = jax.lax.top_k(weights, max_loss_tokens)  # [B, C]
  take = lambda a: jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)
  return (take(weights), *(take(a) for a in arrays))


def nll_and_router_losses(cfg: ModelConfig, params, batch, run: RunSpec, *, lb_coef: float,
                          z_coef: float) -> LossTerms:
  """The PHDS objective: token NLL on trained tokens plus lb_coef x load-balance + z_coef x router z-loss."""
  nll_sum, weight, aux = token_nll(cfg, params, batch, run)
  router = lb_coef * aux["load_balance_loss"] + z_coef * aux["router_z_loss"]
  return LossTerms(nll_sum, weight, router, {"load_balance": aux["load_balance_loss"],
                                             "z_loss": aux["router_z_loss"]})


Objective = Callable[..., LossTerms]
OBJECTIVES: dict[str, Objective] = {"nll": nll_and_router_losses}
