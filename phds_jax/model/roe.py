"""Roster of Experts (RoE, arXiv 2509.17238): one MoE as a training-free ensemble of noisy routings.

Each of `members` routings picks experts by Gumbel-top-k, top_k(router_logits + tau * G) with G i.i.d.
Gumbel(0, 1) (routing.gumbel_scores); member 0 keeps tau = 0, the deterministic model. The members run as
extra batch rows of one program (member-major: row m * B + b is member m of sequence b) and the ensemble's
next-token distribution is the mean of the members' probabilities.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Union

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RoE:
  """members: routings per sequence (>= 1; member 0 is deterministic). tau: Gumbel temperature, one float
  for every MoE layer or a tuple with one per MoE layer (>= 0; 0 = that layer routes deterministically).
  seed: the noise's PRNG seed (same seed, same routings)."""

  members: int = 1
  tau: Union[float, tuple[float, ...]] = 0.0
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.members, numbers.Integral) or isinstance(self.members, bool) or self.members < 1:
      raise ValueError(f"RoE members={self.members!r} must be an int >= 1 (member 0 is the deterministic model)")
    taus = self.tau if isinstance(self.tau, (tuple, list)) else (self.tau,)
    for value in taus:
      if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"RoE tau={self.tau!r} must be a float >= 0 or a tuple of them (one per MoE layer)")
    if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
      raise ValueError(f"RoE seed={self.seed!r} must be an int")
    if isinstance(self.tau, list):
      object.__setattr__(self, "tau", tuple(self.tau))

  def layer_taus(self, num_moe_layers: int) -> tuple:
    """One temperature per MoE layer (floats, or tracers inside jit); ValueError when a tuple has the wrong
    length."""
    if not isinstance(self.tau, tuple):
      return (self.tau,) * num_moe_layers
    if len(self.tau) != num_moe_layers:
      raise ValueError(f"RoE tau has {len(self.tau)} entries; the model has {num_moe_layers} MoE layers")
    return self.tau

  def row_taus(self, num_moe_layers: int, batch: int) -> jax.Array:
    """float32 [num_moe_layers, members * batch]: each row's temperature per layer (member 0's rows 0)."""
    taus = jnp.asarray(self.layer_taus(num_moe_layers), jnp.float32)[:, None]
    noisy = (jnp.arange(self.members * batch) >= batch).astype(jnp.float32)[None, :]
    return taus * noisy

  def tile(self, array: jax.Array) -> jax.Array:
    """[B, ...] -> [members * B, ...]: every member's copy of the batch, member-major."""
    return jnp.tile(array, (self.members,) + (1,) * (array.ndim - 1))


def _flatten(roe: RoE):
  return (roe.tau, roe.seed), roe.members


def _unflatten(members: int, children) -> RoE:
  """Rebuilds an RoE inside jit, where tau and seed are tracers (validated when it was made)."""
  roe = object.__new__(RoE)
  for name, value in (("members", members), ("tau", children[0]), ("seed", children[1])):
    object.__setattr__(roe, name, value)
  return roe


# A pytree: members is static (it sets shapes), tau and seed are traced, so one compiled program serves every
# temperature and seed of an ensemble size.
jax.tree_util.register_pytree_node(RoE, _flatten, _unflatten)


def ensemble_log_probs(logits: jax.Array, members: int) -> jax.Array:
  """[members * B, L, V] member logits -> [B, L, V] float32 log of the members' mean probabilities
  (members = 1: exactly log_softmax of the logits)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if members == 1:
    return logp
  logp = logp.reshape((members, -1) + logp.shape[1:])
  return jax.nn.logsumexp(logp, axis=0) - jnp.log(jnp.float32(members))


def _member_major(array: jax.Array, members: int) -> jax.Array:
  return array.reshape((members, -1) + array.shape[1:])


def ensemble_target_log_probs(logits: jax.Array, targets: jax.Array, members: int) -> jax.Array:
  """[members * B, C, V] member logits, targets int [B, C] -> [B, C] float32 log of the members' mean
  probability of each target: one logsumexp pass over the vocabulary per member, no [.., V] log-probs."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [M * B, C]
  picked = jnp.take_along_axis(logits, jnp.tile(targets, (members, 1))[..., None], axis=-1)[..., 0] - lse
  if members == 1:
    return picked
  return jax.nn.logsumexp(_member_major(picked, members), axis=0) - jnp.log(jnp.float32(members))


def ensemble_argmax(logits: jax.Array, members: int) -> jax.Array:
  """[members * B, C, V] member logits -> int32 [B, C], the most likely token of the members' mean."""
  logits = logits.astype(jnp.float32)
  if members == 1:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
  return jnp.argmax(jnp.sum(_member_major(probs, members), axis=0), axis=-1).astype(jnp.int32)
