"""Next-token choice per row, with every setting traced (one compiled program for any temperature, top-p and
seed): greedy where a row's temperature is 0, else a draw from softmax(scores / temperature) restricted to
the top-p nucleus. Used by `pj.generate` and the serving engine."""

import jax
import jax.numpy as jnp


def sample(scores: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array) -> jax.Array:
  """scores float [B, V] (logits or log-probabilities), temperature/top_p float32 [B], keys [B] -> int32 [B].

  The nucleus keeps the most likely tokens whose probabilities before them sum below top_p (the top token
  always stays). The vocabulary sort it needs runs only when some sampled row has top_p < 1, the draw
  only when some row samples: a greedy batch costs one argmax.
  """
  scores = scores.astype(jnp.float32)
  sampled = temperature > 0
  scaled = scores / jnp.where(sampled, temperature, 1.0)[:, None]

  def nucleus(scaled):
    order = jnp.argsort(-scaled, axis=-1)
    sorted_scores = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_scores, axis=-1)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, scaled, -jnp.inf)

  def draw(scaled):
    filtered = jax.lax.cond(jnp.any(sampled & (top_p < 1.0)), nucleus, lambda x: x, scaled)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

  greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  drawn = jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, scaled)
  return jnp.where(sampled, drawn, greedy)
