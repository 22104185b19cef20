"""Decoder building blocks: RMSNorm, RoPE, attention (GQA, q/k norm, qkv bias, clip_qkv), SwiGLU, MoE.

Flax linen modules whose parameters keep transformers' module names (q_proj, gate, experts, ...), so the
HF name map is nearly mechanical. Kernels are stored [in, out] (HF Linear weights are [out, in]).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.model import expert_parallel
from phds_jax.model import experts as experts_lib
from phds_jax.model import routing
from phds_jax.model.config import ModelConfig


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) computed in float32, cast back, then scaled (as transformers does)."""

  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale * normed.astype(x.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """[D/2] float32 inverse frequencies, computed in float32 like transformers' default RoPE."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
  """positions int [B, L] -> cos, sin [B, L, D] in `dtype` (half-split layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(head_dim, theta)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B, L, N, D], cos/sin [B, L, D] -> rotated x (rotate-half convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """segment_ids int [B, L] -> bool [B, 1, 1, L, L]: causal and within one packed segment."""
  length = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None, None]


def cache_attention_mask(kv_valid: jax.Array, cache_index, length: int) -> jax.Array:
  """kv_valid bool [B, S] -> [B, 1, 1, L, S]: query i (slot cache_index + i) sees valid slots <= its own.

  cache_index: one int for every row, or int32 [B], each row's own first slot (serving's decode slots)."""
  slots = jnp.arange(kv_valid.shape[1])
  query_slots = jnp.asarray(cache_index)[..., None] + jnp.arange(length)  # [L] or [B, L]
  causal = slots <= query_slots[..., None]  # [L, S] or [B, L, S]
  return (causal & kv_valid[:, None, :])[:, None, None]


def write_cache(cache: jax.Array, new: jax.Array, layer, cache_index) -> jax.Array:
  """cache [B, NL, S, KV, D] (every layer's), new [B, L, KV, D] -> cache with `new` in layer `layer` (an int
  or int32 scalar) at slots cache_index .. + L - 1 (cache_index: one int, or int32 [B], one per row)."""
  new = new[:, None]
  if jnp.ndim(cache_index) == 0:
    return jax.lax.dynamic_update_slice(cache, new, (0, layer, cache_index, 0, 0))
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (layer, i, 0, 0)))(cache, new, cache_index)


# Query rows per causal chunk in self-attention (see `attend`). 256 rather than 128: on CPU the extra
# q/k/v slices and the less efficient 128-row batched dots cost more than the skipped scores at the
# lengths we run (full 8-layer forward at L = 512, benchmarks/moe_bench.py config: 2-4% faster).
ATTENTION_QUERY_CHUNK = 256


def dense(features, use_bias, cfg: ModelConfig, param_dtype, name):
  """nn.Dense with HF's initialisation (normal(initializer_range) kernel, zero bias); kernel [in, out]."""
  return nn.Dense(features, use_bias=use_bias, param_dtype=param_dtype, name=name,
                  kernel_init=nn.initializers.normal(cfg.initializer_range),
                  bias_init=nn.initializers.zeros)


class Attention(nn.Module):
  """Causal self-attention with grouped KV heads; q/k RMSNorm over the whole projection (OLMoE) or per head
  (Qwen3), clip_qkv and q/k/v/o biases by config."""

  cfg: ModelConfig
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, layer=0, members: int = 1):
    """x [B, L, H], cos/sin [B, L, D], mask bool [B, 1, 1, L, S] -> ([B, L, H], new cache or None).

    Without a cache S = L. With the decoder's KV cache {"k", "v": [B, NL, S, KV, D]} the new keys/values
    are written in decoder layer `layer` (int or int32 scalar) at slots cache_index .. cache_index + L - 1,
    and attention runs over that layer's S slots (the mask says which).
    With M * B rows against a B-row cache (Roster-of-Experts members, member-major) the cache is clean:
    only member 0's keys/values are written, and each member attends to the cached slots before
    cache_index plus its own new keys/values (`attend_members`).
    Without a cache, `members` > 1 (rows M * B, member-major) computes every position as that decoding
    does: member m's query at position t sees member 0's (clean) keys/values before t and its own at t.
    """
    cfg = self.cfg
    d, n, kv = cfg.resolved_head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q = dense(n * d, cfg.qkv_bias, cfg, self.param_dtype, "q_proj")(x)
    k = dense(kv * d, cfg.qkv_bias, cfg, self.param_dtype, "k_proj")(x)
    v = dense(kv * d, cfg.qkv_bias, cfg, self.param_dtype, "v_proj")(x)
    if cfg.qk_norm == "projection":
      q = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="k_norm")(k)
    if cfg.clip_qkv is not None:
      q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    b, length, _ = x.shape
    q, k = q.reshape(b, length, n, d), k.reshape(b, length, kv, d)
    if cfg.qk_norm == "head":  # [B, L, N, D]: one RMSNorm over each head's D
      q = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="k_norm")(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = v.reshape(b, length, kv, d)
    o_proj = dense(cfg.hidden_size, cfg.o_bias, cfg, self.param_dtype, "o_proj")
    new_cache = None
    if cache is not None:
      members = b // cache["k"].shape[0]  # > 1: Roster-of-Experts members share one clean cache
      rows = b // members
      new_cache = {name: write_cache(cache[name], own[:rows].astype(cache[name].dtype), layer, cache_index)
                   for name, own in (("k", k), ("v", v))}
      this_layer = {name: jax.lax.dynamic_index_in_dim(c, layer, axis=1, keepdims=False)
                    for name, c in new_cache.items()}  # [B, S, KV, D]
      if members > 1:
        split = lambda t: t.reshape((members, rows) + t.shape[1:])  # member-major rows -> [M, B, ...]
        q = split(q).reshape(members, rows, length, kv, n // kv, d).transpose(0, 1, 3, 4, 2, 5)
        own_k, own_v = (split(t).transpose(0, 1, 3, 2, 4) for t in (k, v))  # [M, B, KV, L, D]
        past_k, past_v = (this_layer[name].transpose(0, 2, 1, 3) for name in ("k", "v"))  # [B, KV, S, D]
        before = jnp.arange(past_k.shape[2]) < jnp.asarray(cache_index)[..., None]  # [S] or [B, S]
        past_mask = mask & (before if before.ndim == 1 else before[:, None, None, None, :])
        out = attend_members(q, own_k, own_v, past_k, past_v, past_mask, d ** -0.5)  # [M, B, KV, G, L, D]
        return o_proj(out.transpose(0, 1, 4, 2, 3, 5).reshape(b, length, n * d)), new_cache
      k, v = this_layer["k"], this_layer["v"]
    elif members > 1:
      rows = b // members
      split = lambda t: t.reshape((members, rows) + t.shape[1:])  # member-major rows -> [M, B, ...]
      q = split(q).reshape(members, rows, length, kv, n // kv, d).transpose(0, 1, 3, 4, 2, 5)
      own_k, own_v = (split(t).transpose(0, 1, 3, 2, 4) for t in (k, v))  # [M, B, KV, L, D]
      before = jnp.tril(jnp.ones((length, length), jnp.bool_), -1)  # key position < query position
      out = attend_members(q, own_k, own_v, own_k[0], own_v[0], mask[:rows] & before, d ** -0.5, own="diagonal")
      return o_proj(out.transpose(0, 1, 4, 2, 3, 5).reshape(b, length, n * d)), None
    q = q.reshape(b, length, kv, n // kv, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, L, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    causal_chunk = ATTENTION_QUERY_CHUNK if cache is None else None
    out = attend(q, k, v, mask, d ** -0.5, causal_chunk)  # [B, KV, G, L, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, length, n * d)
    return o_proj(out), new_cache


def attend(q, k, v, mask, scale: float, causal_chunk: Optional[int] = None):
  """Softmax attention. q [B, KV, G, L, D], k/v [B, KV, S, D], mask bool [B, 1, 1, L, S] -> [B, KV, G, L, D].

  Scores are q.k * scale (scaled after the product, as transformers does).

  With `causal_chunk` (self-attention under a causal mask, S == L) queries go in chunks and each chunk
  scores only the keys up to its last position: (n + 1) / 2n of the full L x L product for n chunks.
  """
  length = q.shape[3]
  if causal_chunk is None or length <= causal_chunk:
    bounds = [(0, length)]
  else:
    bounds = [(start, min(start + causal_chunk, length)) for start in range(0, length, causal_chunk)]
  outs = []
  for start, end in bounds:
    keys = slice(0, end if causal_chunk else k.shape[2])
    scores = jnp.einsum("bkgld,bksd->bkgls", q[:, :, :, start:end], k[:, :, keys]) * scale
    scores = jnp.where(mask[..., start:end, keys], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    outs.append(jnp.einsum("bkgls,bksd->bkgld", probs, v[:, :, keys]))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


def attend_members(q, own_k, own_v, past_k, past_v, past_mask, scale: float, own: str = "causal"):
  """M routing-ensemble members of B sequences attending to one shared ("clean") context.

  q [M, B, KV, G, L, D]; own_k/own_v [M, B, KV, L, D], each member's keys/values of its L tokens;
  past_k/past_v [B, KV, S, D], the shared ones; past_mask bool [B, 1, 1, L, S], the shared slots a query may
  see -> [M, B, KV, G, L, D]. own="causal" (decoding L new tokens after a cache): each query also sees its
  member's own keys up to its position; own="diagonal" (every position of a sequence at once, the shared
  keys being member 0's): only its own key at its position. One softmax (float32 scores, as `attend`).
  """
  floor = jnp.finfo(jnp.float32).min
  past = jnp.einsum("mbkgld,bksd->mbkgls", q, past_k) * scale
  if own == "diagonal":
    mine = jnp.einsum("mbkgld,mbkld->mbkgl", q, own_k)[..., None] * scale  # [M, B, KV, G, L, 1]
  else:
    causal = jnp.tril(jnp.ones((q.shape[4], q.shape[4]), jnp.bool_))
    mine = jnp.where(causal, (jnp.einsum("mbkgld,mbkjd->mbkglj", q, own_k) * scale).astype(jnp.float32), floor)
  scores = jnp.concatenate([jnp.where(past_mask[None], past.astype(jnp.float32), floor),
                            mine.astype(jnp.float32)], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1).astype(own_v.dtype)
  slots = past_k.shape[2]
  shared = jnp.einsum("mbkgls,bksd->mbkgld", probs[..., :slots], past_v)
  if own == "diagonal":
    return shared + probs[..., slots:] * own_v[:, :, :, None]  # [M, B, KV, G, L, 1] x [M, B, KV, 1, L, D]
  return shared + jnp.einsum("mbkglj,mbkjd->mbkgld", probs[..., slots:], own_v)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  cfg: ModelConfig
  intermediate_size: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.param_dtype
    h = nn.silu(dense(self.intermediate_size, False, cfg, dt, "gate_proj")(x))
    h = h * dense(self.intermediate_size, False, cfg, dt, "up_proj")(x)
    return dense(cfg.hidden_size, False, cfg, dt, "down_proj")(h)


class RoutedExperts(nn.Module):
  """E stacked SwiGLU experts: gate_proj/up_proj [E, H, I], down_proj [E, I, H]."""

  cfg: ModelConfig
  param_dtype: jnp.dtype = jnp.float32
  backend: str = "auto"  # experts.BACKENDS name or "auto"

  @nn.compact
  def __call__(self, x, experts, weights):
    """x [T, H], experts/weights [T, W] -> [T, H]."""
    cfg = self.cfg
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    init = nn.initializers.normal(cfg.initializer_range)
    w = experts_lib.ExpertWeights(
        gate=self.param("gate_proj", init, (e, h, i), self.param_dtype),
        up=self.param("up_proj", init, (e, h, i), self.param_dtype),
        down=self.param("down_proj", init, (e, i, h), self.param_dtype))
    w = jax.tree.map(lambda p: p.astype(x.dtype), w)
    return expert_parallel.moe_ffn(x, experts, weights, w, self.backend)


class SparseMoeBlock(nn.Module):
  """Router + routed experts (+ Qwen's sigmoid-gated shared expert). Returns output and router stats."""

  cfg: ModelConfig
  param_dtype: jnp.dtype = jnp.float32
  expert_backend: str = "auto"

  @nn.compact
  def __call__(self, x, *, k, width: int, soft_mask_eps: Optional[float], token_mask, roe_tau=None,
               roe_key=None):
    """x [B, L, H]; k static int or int32 [B] (traced); token_mask [B, L] -> ([B, L, H], RouterStats).

    roe_tau: float32 [B], each row's Gumbel temperature (Roster of Experts; 0 = deterministic), with
    roe_key, this layer's PRNG key (one, or one per row [B]); None routes every row deterministically."""
    cfg = self.cfg
    b, length, hidden = x.shape
    flat = x.reshape(b * length, hidden)
    router_logits = dense(cfg.num_experts, False, cfg, self.param_dtype, "gate")(flat)  # [T, E]
    probs = routing.router_probs(router_logits)
    k_tok = k if isinstance(k, int) else jnp.repeat(jnp.asarray(k, jnp.int32), length)
    scores = None
    if roe_tau is not None:
      key = roe_key if roe_key.ndim == 0 else jnp.repeat(roe_key, length)  # per row -> per token
      scores = routing.gumbel_scores(router_logits, probs, jnp.repeat(roe_tau, length), key)
    routed = routing.route(probs, k=k_tok, width=width, norm_topk_prob=cfg.norm_topk_prob,
                           soft_mask_eps=soft_mask_eps, scores=scores)
    weights = routed.weights.astype(router_logits.dtype)  # transformers casts to the hidden dtype
    out = RoutedExperts(cfg, self.param_dtype, self.expert_backend, name="experts")(flat, routed.experts, weights)
    if cfg.shared_expert_intermediate_size:
      shared = MLP(cfg, cfg.shared_expert_intermediate_size, self.param_dtype, name="shared_expert")(flat)
      gate = dense(1, False, cfg, self.param_dtype, "shared_expert_gate")(flat)
      out = out + jax.nn.sigmoid(gate) * shared
    stats = routing.router_stats(router_logits, probs, routed, token_mask.reshape(-1))
    return out.reshape(b, length, hidden), stats
