"""Router maths as pure functions: probabilities, top-k (static or traced k), the PHDS soft mask, losses.

Semantics (equal to transformers' OlmoeSparseMoeBlock / Qwen2MoeSparseMoeBlock at the same k):
  1. p = softmax(router_logits) over all experts, in float32;
  2. keep the k largest p (weights p, renormalised iff `norm_topk_prob`);
  3. soft mask (PHDS training): compute at max(k, k_pre) experts, ranks >= k get weight `eps` instead of p;
  4. traced k: compute at k_max experts and zero (hard) or eps (soft) ranks >= k, one program for all k.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

KType = Union[int, jax.Array]


class Routing(NamedTuple):
  """Which experts each token visits and with what weight.

  experts: int32 [T, W], expert ids in descending probability order (W = compute width).
  weights: float32 [T, W], combine weights; zero (or eps) where the rank is >= k.
  selected: bool [T, W], rank < k: the assignments that count for the load-balance loss.
  """

  experts: jax.Array
  weights: jax.Array
  selected: jax.Array


class RouterStats(NamedTuple):
  """Per-layer sums from which the HF load-balance loss and the z-loss are assembled across layers.

  expert_counts: float32 [E], (masked) number of tokens that selected each expert at rank < k.
  prob_sums: float32 [E], (masked) sum of router probabilities per expert.
  num_tokens: float32 [], number of (unmasked) tokens.
  z_sum: float32 [], (masked) sum over tokens of logsumexp(router_logits) ** 2.
  """

  expert_counts: jax.Array
  prob_sums: jax.Array
  num_tokens: jax.Array
  z_sum: jax.Array


def router_probs(router_logits: jax.Array) -> jax.Array:
  """[T, E] logits (any dtype) -> [T, E] float32 softmax over all experts."""
  return jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)


def compute_width(*, k_static: Optional[int], k_max: Optional[int], k_pre: int,
                  soft_mask_eps: Optional[float]) -> int:
  """Number of experts actually computed per token (static): k, k_max, or at least k_pre when soft."""
  width = k_static if k_static is not None else k_max
  if width is None:
    raise ValueError("traced k needs a static k_max")
  if soft_mask_eps is not None:
    width = max(width, k_pre)
  return width


def gumbel_scores(router_logits: jax.Array, probs: jax.Array, tau: jax.Array, key: jax.Array) -> jax.Array:
  """Ranking scores for Roster-of-Experts routing (arXiv 2509.17238): router_logits + tau * G with G i.i.d.
  Gumbel(0, 1) [T, E], whose top-k samples k experts without replacement from softmax(logits / tau); tokens
  with tau = 0 rank by `probs` itself, so their routing is exactly the deterministic one.

  router_logits, probs: [T, E]; tau: float32 [T] (one temperature per token, >= 0); key: a PRNG key, or
  one per token [T] (each token's noise then depends on its own key only).
  """
  if key.ndim == 0:
    noise = jax.random.gumbel(key, probs.shape, jnp.float32)
  else:
    noise = jax.vmap(lambda one: jax.random.gumbel(one, probs.shape[1:], jnp.float32))(key)
  noisy = router_logits.astype(jnp.float32) + tau[:, None] * noise
  return jnp.where(tau[:, None] > 0, noisy, probs)


def route(probs: jax.Array, *, k: KType, width: int, norm_topk_prob: bool,
          soft_mask_eps: Optional[float] = None, scores: Optional[jax.Array] = None) -> Routing:
  """Top-`width` routing of `probs` [T, E] with ranks >= k masked.

  k: a Python int (static) or an int32 array broadcastable to [T] (traced, per token); 1 <= k <= width.
  Hard routing zeroes ranks >= k; with `soft_mask_eps` they get weight eps and gradients still reach the
  kept probabilities. With `norm_topk_prob` the weights are divided by their sum (eps terms included).
  scores: [T, E] values to rank experts by instead of `probs` (gumbel_scores); the weights stay the chosen
  experts' probabilities.
  """
  if scores is None:
    top_p, experts = jax.lax.top_k(probs, width)  # [T, W] each
  else:
    _, experts = jax.lax.top_k(scores, width)
    top_p = jnp.take_along_axis(probs, experts, axis=-1)
  ranks = jnp.arange(width, dtype=jnp.int32)  # [W]
  if isinstance(k, int):
    selected = jnp.broadcast_to(ranks < k, top_p.shape)
  else:
    k_tok = jnp.broadcast_to(jnp.asarray(k, jnp.int32).reshape(-1), (top_p.shape[0],))  # [T]
    selected = ranks[None, :] < k_tok[:, None]
  fill = 0.0 if soft_mask_eps is None else soft_mask_eps
  weights = jnp.where(selected, top_p, jnp.asarray(fill, top_p.dtype))
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return Routing(experts=experts.astype(jnp.int32), weights=weights, selected=selected)


def router_stats(router_logits: jax.Array, probs: jax.Array, routing: Routing,
                 token_mask: Optional[jax.Array] = None) -> RouterStats:
  """Sums for the auxiliary losses of one layer. token_mask: [T] (1 = real token, 0 = padding)."""
  num_experts = probs.shape[-1]
  mask = jnp.ones(probs.shape[:1], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
  hits = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)  # [T, W, E]
  hits = hits * routing.selected[..., None].astype(jnp.float32)
  expert_counts = jnp.einsum("twe,t->e", hits, mask)
  prob_sums = jnp.einsum("te,t->e", probs, mask)
  z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)  # [T]
  return RouterStats(expert_counts=expert_counts, prob_sums=prob_sums, num_tokens=jnp.sum(mask),
                     z_sum=jnp.sum(jnp.square(z) * mask))


def combine_stats(stats: RouterStats) -> RouterStats:
  """Per-layer sums stacked [n_moe, ...] -> their totals (the layers' tokens are pooled, as transformers
  concatenates them)."""
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), stats)


def load_balance_loss(stats: RouterStats) -> jax.Array:
  """Switch-style loss with the exact formula of transformers' `load_balancing_loss_func`.

  E * sum_e (tokens routed to e / tokens) * (mean router probability of e), pooled over layers.
  The counts use the k actually routed at (k_train under the soft mask).
  """
  num_experts = stats.expert_counts.shape[-1]
  denom = jnp.maximum(stats.num_tokens, 1.0)
  return num_experts * jnp.sum((stats.expert_counts / denom) * (stats.prob_sums / denom))


def router_z_loss(stats: RouterStats) -> jax.Array:
  """Mean over (layer, token) of logsumexp(router_logits) ** 2 (ST-MoE)."""
  return stats.z_sum / jnp.maximum(stats.num_tokens, 1.0)
