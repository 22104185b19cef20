"""Text generation at a declared k: one prefill, then KV-cached decoding, all in one jitted program.

Optionally by a Roster-of-Experts routing ensemble (`roe`), decoded against one clean cache.

Prompts of different lengths are left-padded into one batch (positions count real tokens only, as
transformers does); each prompt may get its own k (a traced int32 [B]); decoding is greedy, or samples
with temperature and nucleus (top-p) filtering; a prompt stops at its first stop token. Shapes are
bucketed (prompt length and new-token count rounded up) and temperature, top-p and seed are traced, so one
compiled program serves many calls.
"""

from __future__ import annotations

import functools
import logging
import numbers
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.model import roe as roe_lib
from phds_jax.model import sampling
from phds_jax.model.config import ModelConfig
from phds_jax.model.roe import RoE
from phds_jax.model.transformer import Decoder, init_cache, plan_k, project_logits, resolve_expert_backend

log = logging.getLogger("phds_jax")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("cfg", "layer_k", "layer_width", "max_new", "stop_ids",
                                             "expert_backend", "roe_members", "scan_layers"))
def generation_program(params, tokens, valid, k_traced, rng, limit, roe_taus, roe_key, temperature=0.0, top_p=1.0, *,
                       cfg, layer_k, layer_width, max_new, stop_ids, expert_backend, roe_members=0,
                       scan_layers=True):
  """tokens/valid [B, P] (left-padded) -> new tokens [B, max_new], -1 after a row's stop token.

  temperature / top_p: traced float32 scalars (one program for every sampling setting; 0 = greedy).

  max_new (static) sizes the cache; decoding stops after `limit` (traced) tokens or when all rows stopped.
  roe_members > 0: a Roster-of-Experts ensemble (roe_taus [n_moe, M * B], roe_key). The prompt but its last
  token is prefilled deterministically; from the last prompt token on, each step runs M * B rows for one
  token against the clean [B] cache and samples from the members' mean distribution.
  """
  batch, prompt_len = tokens.shape
  slots = prompt_len + max_new
  dtype = jax.tree.leaves(params)[0].dtype
  cache = init_cache(cfg, batch, slots, dtype)
  kv_valid = jnp.concatenate([valid, jnp.ones((batch, max_new), jnp.bool_)], axis=1)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
  model = Decoder(cfg, expert_backend=expert_backend, scan_layers=scan_layers)
  prefill_model = Decoder(cfg, expert_backend=expert_backend, skip_head=True, scan_layers=scan_layers)  # the head at one position only
  layer_k = layer_k if layer_k is not None else k_traced
  members = max(roe_members, 1)
  tile = lambda a: jnp.tile(a, (members,) + (1,) * (a.ndim - 1))  # [B, ...] -> [M * B, ...], member-major
  member_k = layer_k if roe_members == 0 or k_traced is None else tuple(tile(k) for k in layer_k)

  def run(tokens, positions, segments, cache, index, k=layer_k, roe_taus=None, roe_key=None, decoder=model):
    return decoder.apply({"params": params}, tokens, positions, segments, layer_k=k, layer_width=layer_width,
                         cache=cache, cache_index=index, kv_valid=kv_valid, roe_taus=roe_taus, roe_key=roe_key)

  def step(token, t, cache):
    """token [B] at slot prompt_len + t -> (next-token scores [B, V], cache)."""
    if roe_members == 0:
      logits, _, cache = run(token[:, None], (lengths + t)[:, None], jnp.ones((batch, 1), jnp.int32), cache,
                             prompt_len + t)
      return logits[:, 0], cache
    logits, _, cache = run(tile(token[:, None]), tile((lengths + t)[:, None]),
                           jnp.ones((members * batch, 1), jnp.int32), cache, prompt_len + t, k=member_k,
                           roe_taus=roe_taus, roe_key=jax.random.fold_in(roe_key, prompt_len + t))
    return roe_lib.ensemble_log_probs(logits, members)[:, 0], cache

  if roe_members == 0:
    hidden, _, cache = run(tokens, positions, valid.astype(jnp.int32), cache, 0, decoder=prefill_model)
    scores = project_logits(cfg, params, hidden[:, -1])
  else:
    if prompt_len > 1:
      _, _, cache = run(tokens[:, :-1], positions[:, :-1], valid[:, :-1].astype(jnp.int32), cache, 0,
                        decoder=prefill_model)
    scores, cache = step(tokens[:, -1], -1, cache)
  temperature = jnp.full((batch,), temperature, jnp.float32)
  top_p = jnp.full((batch,), top_p, jnp.float32)
  choose = lambda scores, key: sampling.sample(scores, temperature, top_p, jax.random.split(key, batch))
  rng, first = jax.random.split(rng)
  token = choose(scores, first)
  stops = jnp.asarray(stop_ids if stop_ids else (-2,), jnp.int32)

  def cond(state):
    t, _, _, done, _, _ = state
    return (t < limit) & ~jnp.all(done)

  def body(state):
    t, token, cache, done, out, rng = state
    out = out.at[:, t].set(jnp.where(done, -1, token))
    done = done | jnp.isin(token, stops)
    scores, cache = step(token, t, cache)
    rng, key = jax.random.split(rng)
    return t + 1, choose(scores, key), cache, done, out, rng

  out = jnp.full((batch, max_new), -1, jnp.int32)
  state = (jnp.int32(0), token, cache, jnp.zeros((batch,), jnp.bool_), out, rng)
  return jax.lax.while_loop(cond, body, state)[4]


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
             k: Union[None, int, Sequence[int]] = None, k_max: Optional[int] = None, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens: Optional[Sequence[int]] = None, seed: int = 0,
             bucket: int = 16, expert_backend: str = "auto", roe: Optional[RoE] = None,
             scan_layers: bool = True) -> list[list[int]]:
  """New token ids for each prompt (ragged lists of ids), decoded at top-k.

  k: None (k_pre), an int, or one int per prompt (one compiled program for the mix, computing k_max
    = max(k) experts, the others zero-weighted). stop_tokens: default the config's eos ids; a prompt's
    output ends with its first stop token. Prompts longer than max_position_embeddings - max_new_tokens
    are cut from the left with a warning.
  roe: decode with a Roster-of-Experts ensemble (pj.RoE(members, tau, seed)): each new token is chosen from
    the mean of the members' next-token distributions (greedy or sampled as above); the KV cache stays
    [B] (member 0's keys/values: the clean cache), so its memory does not grow with members. members = 1
    or tau = 0 is the deterministic model, decoded as without roe.
  scan_layers: scanned or unrolled decoder layers (see `forward`); the same tokens.
  """
  args, statics = _program_inputs(cfg, params, prompts, max_new_tokens=max_new_tokens, k=k, k_max=k_max,
                                  temperature=temperature, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                                  bucket=bucket, expert_backend=expert_backend, roe=roe, scan_layers=scan_layers)
  out = np.asarray(generation_program(*args, **statics))
  return [[int(t) for t in row[:max_new_tokens] if t >= 0] for row in out]


def lower_generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], **options) -> jax.stages.Lowered:
  """The program `generate(cfg, params, prompts, **options)` runs, lowered (for .compile().memory_analysis())."""
  args, statics = _program_inputs(cfg, params, prompts, **options)
  return generation_program.lower(*args, **statics)


def _program_inputs(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                    k: Union[None, int, Sequence[int]] = None, k_max: Optional[int] = None,
                    temperature: float = 0.0, top_p: float = 1.0, stop_tokens: Optional[Sequence[int]] = None,
                    seed: int = 0, bucket: int = 16, expert_backend: str = "auto",
                    roe: Optional[RoE] = None, scan_layers: bool = True) -> tuple[tuple, dict]:
  """Validates `generate`'s arguments (ValueError naming one) -> (arrays, static arguments) of `generation_program`."""
  if not isinstance(prompts, (list, tuple)) or not prompts:
    raise ValueError("prompts must be a non-empty list of token-id lists")
  for i, p in enumerate(prompts):
    if not len(p) or not all(isinstance(t, numbers.Integral) and 0 <= t < cfg.vocab_size for t in p):
      raise ValueError(f"prompts[{i}] must be a non-empty list of token ids in [0, {cfg.vocab_size})")
  ensemble = None
  if roe is not None:
    if not isinstance(roe, RoE):
      raise ValueError(f"roe={roe!r} must be a pj.RoE(members=..., tau=..., seed=...)")
    taus = roe.layer_taus(len(cfg.moe_layer_indices))  # validates a per-layer tuple's length
    ensemble = roe if roe.members > 1 and any(t > 0 for t in taus) else None
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
  if temperature < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
  room = cfg.max_position_embeddings - max_new_tokens
  if room < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within "
                     f"max_position_embeddings={cfg.max_position_embeddings}")
  prompts = [list(p) for p in prompts]
  for i, p in enumerate(prompts):
    if len(p) > room:
      log.warning("prompts[%d] has %d tokens; keeping the last %d (max_position_embeddings=%d)", i, len(p),
                  room, cfg.max_position_embeddings)
      prompts[i] = p[-room:]
  batch = len(prompts)
  if k is not None and not isinstance(k, numbers.Integral):
    if len(k) != batch:
      raise ValueError(f"k has {len(k)} entries; pass one int, or one per prompt ({batch})")
    k_max = k_max or int(max(k))
    k = jnp.asarray(np.asarray(k, np.int32))
  plan = plan_k(cfg, k, k_max, None, batch)
  expert_backend = resolve_expert_backend(expert_backend)
  prompt_len = _round_up(max(len(p) for p in prompts), bucket)
  max_new = _round_up(max_new_tokens, bucket)
  if prompt_len + max_new > cfg.max_position_embeddings:
    prompt_len = max(len(p) for p in prompts)
    max_new = max_new_tokens
  tokens = np.zeros((batch, prompt_len), np.int32)
  valid = np.zeros((batch, prompt_len), bool)
  for i, p in enumerate(prompts):
    tokens[i, prompt_len - len(p):] = p
    valid[i, prompt_len - len(p):] = True
  if stop_tokens is None:
    stop_tokens = cfg.eos_ids
  roe_taus = None if ensemble is None else ensemble.row_taus(len(cfg.moe_layer_indices), batch)
  roe_key = None if ensemble is None else jax.random.key(ensemble.seed)
  args = (params, jnp.asarray(tokens), jnp.asarray(valid), plan.traced, jax.random.key(seed),
          jnp.int32(max_new_tokens), roe_taus, roe_key, jnp.float32(temperature), jnp.float32(top_p))
  statics = dict(cfg=cfg, roe_members=ensemble.members if ensemble else 0, layer_k=plan.static,
                 layer_width=plan.widths, max_new=max_new, stop_ids=tuple(int(t) for t in stop_tokens),
                 expert_backend=expert_backend, scan_layers=bool(scan_layers))
  return args, statics
