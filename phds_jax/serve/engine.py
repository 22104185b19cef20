"""The serving engine: decode slots advanced together by one compiled step, each slot with its own k.

JetStream's shape: `prefill` fills one request's KV cache, `insert` writes it into a free slot of the
decode state, `generate` advances every slot by one token, `free` releases a slot. The decode state holds
per slot the KV cache, the number of cached tokens, the next input token, k per MoE layer (traced int32),
the sampling settings (temperature, top-p, seed) and, in an ensemble engine, the Roster-of-Experts
members, temperatures and seed. Nothing about a request is static, so the compiled programs are fixed
when the engine is built: one prefill and one insert per prompt-length bucket, one decode step per
(expert width, row bucket): a step computes the smallest width >= the largest k among the busy slots, over
the first rows up to the highest busy slot (rounded up to a row bucket; requests take the lowest free
slot), so a lightly loaded server does not pay for its idle slots. Requests' k, sampling settings, seeds
and ensembles never add a program.

Prefill caches all prompt tokens but the last; the decode step then runs the last prompt token, so the
first new token comes from the same step as every later one (and an ensemble's members, which share the
deterministic "clean" cache, each route that token with their own noise, as `pj.generate` does).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.model.config import ModelConfig
from phds_jax.model.sampling import sample
from phds_jax.model.transformer import Decoder, init_cache

TOP_LOGPROBS = 5  # alternatives returned per token (OpenAI's completions allow up to 5)

_PROGRAMS = tuple(f"jit({name})" for name in ("_prefill", "_insert", "_decode_step", "_empty_state"))
_compiled: collections.Counter = collections.Counter()


def _count_compile(event: str, duration: float, **kwargs) -> None:
  del duration
  if event == "/jax/core/compile/backend_compile_duration" and kwargs.get("fun_name") in _PROGRAMS:
    _compiled[kwargs["fun_name"]] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compiled_programs() -> int:
  """Programs of every engine in this process compiled (or loaded from the persistent cache) so far: flat
  once the engines are warmed up."""
  return sum(_compiled.values())


class Prefix(NamedTuple):
  """One prompt's cache rows {"k", "v": [1, NL, P, KV, D]} (every layer's); `length` tokens are real."""

  cache: dict
  length: int


class StepResult(NamedTuple):
  """What one decode step returns per slot (one host copy): token int32 [S], its log-probability float32
  [S], the most likely tokens and their log-probabilities [S, TOP_LOGPROBS]."""

  token: np.ndarray
  logprob: np.ndarray
  top_tokens: np.ndarray
  top_logprobs: np.ndarray


@dataclasses.dataclass(frozen=True)
class SlotSettings:
  """A request's decode settings, written into its slot. k: one int per MoE layer. roe: (members, taus (one per
  MoE layer), seed), members <= the engine's `members`; None decodes deterministically."""

  k: tuple[int, ...]
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  roe: Optional[tuple[int, tuple[float, ...], int]] = None


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Prompt-length buckets: 16, 64, 256, ... (x4: each costs a compile at start-up) up to the cache length."""
  out, size = [], smallest
  while size < max_len:
    out.append(size)
    size *= 4
  return tuple(out) + (max_len,)


def default_widths(k_max: int) -> tuple[int, ...]:
  """Expert widths with a compiled decode step: 1, 2, 4, ... and k_max (a step computes the smallest width
  >= its busy slots' largest k)."""
  out, w = [], 1
  while w < k_max:
    out.append(w)
    w *= 2
  return tuple(out) + (k_max,)


def default_rows(slots: int) -> tuple[int, ...]:
  """Row buckets of the decode step: 1 (one user), slots / 4 and slots."""
  return tuple(sorted({1, max(1, slots // 4), slots}))


class Engine:
  """Decode slots over one model. `members` > 1 makes an ensemble engine: every slot runs `members` routings
  (a request may use fewer) against its one clean cache."""

  def __init__(self, cfg: ModelConfig, params: Any, *, slots: int, max_len: int,
               buckets: Optional[Sequence[int]] = None, widths: Optional[Sequence[int]] = None,
               k_max: Optional[int] = None, members: int = 1, expert_backend: str = "chunked",
               rows: Optional[Sequence[int]] = None):
    if max_len > cfg.max_position_embeddings:
      raise ValueError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    self.cfg, self.params = cfg, params
    self.slots, self.max_len, self.members = slots, max_len, members
    self.n_moe = len(cfg.moe_layer_indices)
    self.k_max = k_max or cfg.num_experts
    self.buckets = tuple(sorted(set(buckets or default_buckets(max_len))))
    self.widths = tuple(sorted(set(widths or default_widths(self.k_max))))
    self.rows = tuple(sorted(set(rows or default_rows(slots))))
    if self.rows[-1] != slots or self.rows[0] < 1:
      raise ValueError(f"row buckets {self.rows} must lie in [1, slots={slots}] and include slots")
    if self.buckets[-1] > max_len or self.widths[-1] != self.k_max or self.widths[0] < 1:
      raise ValueError(f"buckets {self.buckets} must fit max_len={max_len}; widths {self.widths} must lie in "
                       f"[1, k_max={self.k_max}] and include k_max")
    self.dtype = jax.tree.leaves(params)[0].dtype
    statics = dict(cfg=cfg, members=members, expert_backend=expert_backend)
    self._prefill = _prefill_program(cfg, self.k_max, expert_backend)  # shared by the engines of one model
    self._insert = jax.jit(functools.partial(_insert), donate_argnums=(0,))  # its own cache: counts per engine
    self._step = jax.jit(functools.partial(_decode_step, **statics), static_argnames=("width", "rows"),
                         donate_argnums=(1,))
    self._empty = jax.jit(self._empty_state)
    self.busy_k = np.zeros((slots, self.n_moe), np.int32)  # host copy: each busy slot's k (0 = free)

  # -- programs -------------------------------------------------------------------------------------
  def init_decode_state(self) -> dict:
    """Every slot free: an empty cache [S, NL, T, KV, D] and neutral settings. Made by a compiled
    program, so its arrays are placed as the other programs' outputs are (one compiled version each)."""
    return self._empty()

  def _empty_state(self) -> dict:
    cfg, s = self.cfg, self.slots
    state = {
        "cache": init_cache(cfg, s, self.max_len, self.dtype),
        "length": jnp.zeros((s,), jnp.int32), "token": jnp.zeros((s,), jnp.int32),
        "k": jnp.ones((s, self.n_moe), jnp.int32), "temperature": jnp.zeros((s,), jnp.float32),
        "top_p": jnp.ones((s,), jnp.float32), "seed": jnp.zeros((s,), jnp.uint32),
    }
    if self.members > 1:
      state.update(tau=jnp.zeros((s, self.n_moe), jnp.float32), roe_members=jnp.ones((s,), jnp.int32),
                   roe_seed=jnp.zeros((s,), jnp.uint32))
    return state

  def bucket_for(self, length: int) -> int:
    """The smallest prompt bucket holding `length` cached tokens (ValueError when none does)."""
    for b in self.buckets:
      if length <= b:
        return b
    raise ValueError(f"a prompt of {length + 1} tokens does not fit the largest bucket ({self.buckets[-1]} + 1)")

  def prefill(self, prompt: Sequence[int], k: Sequence[int]) -> Prefix:
    """Caches all of `prompt` (token ids) but its last token, at per-layer `k`."""
    cached = len(prompt) - 1
    bucket = self.bucket_for(cached)
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :cached] = prompt[:-1]
    cache = self._prefill(self.params, jnp.asarray(tokens), jnp.int32(cached), jnp.asarray(k, jnp.int32))
    return Prefix(cache, cached)

  def insert(self, prefix: Prefix, state: dict, slot: int, last_token: int, settings: SlotSettings) -> dict:
    """`state` with `prefix` and `settings` written into `slot` (its next input: `last_token`)."""
    if len(settings.k) != self.n_moe or not all(1 <= v <= self.k_max for v in settings.k):
      raise ValueError(f"k={settings.k} needs {self.n_moe} values in [1, {self.k_max}]")
    row = {"length": np.int32(prefix.length), "token": np.int32(last_token),
           "k": np.asarray(settings.k, np.int32), "temperature": np.float32(settings.temperature),
           "top_p": np.float32(settings.top_p), "seed": np.uint32(settings.seed % 2**32)}
    if self.members > 1:
      members, taus, seed = settings.roe or (1, (0.0,) * self.n_moe, 0)
      if not 1 <= members <= self.members:
        raise ValueError(f"roe members={members} must lie in [1, {self.members}]")
      row.update(tau=np.asarray(taus, np.float32), roe_members=np.int32(members), roe_seed=np.uint32(seed % 2**32))
    elif settings.roe is not None and settings.roe[0] > 1:
      raise ValueError("this engine decodes deterministically: an ensemble needs an engine with members > 1")
    self.busy_k[slot] = settings.k
    return self._insert(state, prefix.cache, jnp.int32(slot), row)

  def width_for(self, ks: Sequence[int]) -> int:
    """The smallest compiled width >= max(ks)."""
    top = max(ks, default=1)
    return next(w for w in self.widths if w >= top)

  def rows_for(self, highest_busy: int) -> int:
    """The smallest row bucket holding slots 0 .. highest_busy."""
    return next(r for r in self.rows if r > highest_busy)

  def step_shape(self) -> tuple[int, int]:
    """(expert width, rows) of the next decode step, from the busy slots."""
    busy = np.flatnonzero(self.busy_k.any(axis=1))
    width = self.width_for(self.busy_k.max(axis=1) if busy.size else [1])
    return width, self.rows_for(int(busy[-1]) if busy.size else 0)

  def generate(self, state: dict) -> tuple[dict, StepResult]:
    """One decode step for the slots up to the highest busy one, rounded up to a row bucket (free slots
    among them compute too; their output is ignored). The result has one row per slot stepped."""
    width, rows = self.step_shape()
    state, out = self._step(self.params, state, width=width, rows=rows)
    return state, StepResult(*jax.device_get(out))

  def free(self, slot: int) -> None:
    """Releases `slot` (its k no longer sets the step's width)."""
    self.busy_k[slot] = 0

  def warm_up(self, report=None) -> None:
    """Compiles every program (each bucket's prefill and insert, each width's step); report(message) after
    each."""
    state = self.init_decode_state()
    for bucket in self.buckets:
      prefix = self.prefill([0] * (bucket + 1), (1,) * self.n_moe)
      state = self.insert(prefix, state, 0, 0, SlotSettings((1,) * self.n_moe))
      if report:
        report(f"prompt bucket {bucket}")
    self.busy_k[:] = 0
    for width in self.widths:
      for rows in self.rows:
        self.busy_k[rows - 1] = width
        state, _ = self.generate(state)
        self.busy_k[:] = 0
        if report:
          report(f"decode step at width {width}, {rows} rows")


@functools.lru_cache(maxsize=None)
def _prefill_program(cfg: ModelConfig, width: int, expert_backend: str):
  return jax.jit(functools.partial(_prefill, cfg=cfg, width=width, expert_backend=expert_backend))


def _prefill(params, tokens, length, k, *, cfg: ModelConfig, width: int, expert_backend: str):
  """tokens [1, P] (the first `length` real), k int32 [n_moe] -> the cache {"k", "v": [1, NL, P, KV, D]}."""
  bucket = tokens.shape[1]
  cache = init_cache(cfg, 1, bucket, jax.tree.leaves(params)[0].dtype)
  valid = jnp.arange(bucket)[None] < length  # [1, P]
  n_moe = len(cfg.moe_layer_indices)
  model = Decoder(cfg, expert_backend=expert_backend, skip_head=True)
  _, _, cache = model.apply({"params": params}, tokens, jnp.arange(bucket, dtype=jnp.int32)[None],
                            valid.astype(jnp.int32), layer_k=tuple(k[i][None] for i in range(n_moe)),
                            layer_width=(width,) * n_moe, cache=cache, cache_index=0, kv_valid=valid)
  return cache


def _insert(state, cache, slot, row):
  """Writes one prefix (cache [1, NL, P, ...], P <= T) and one slot's settings into `state` (every leaf of
  the state has the slot on its first axis)."""
  state = dict(state)
  state["cache"] = {name: jax.lax.dynamic_update_slice(state["cache"][name], cache[name].astype(
      state["cache"][name].dtype), (slot, 0, 0, 0, 0)) for name in ("k", "v")}
  state.update({name: state[name].at[slot].set(value) for name, value in row.items()})
  return state


def _decode_step(params, state, *, cfg: ModelConfig, members: int, expert_backend: str, width: int, rows: int):
  """The next token of slots 0 .. rows - 1: each slot's cache holds `length` tokens, `token` goes in at
  position `length`. The other slots' state passes through unchanged."""
  if rows == state["length"].shape[0]:
    return _step_rows(params, state, cfg=cfg, members=members, expert_backend=expert_backend, width=width)
  head, out = _step_rows(params, jax.tree.map(lambda a: a[:rows], state), cfg=cfg, members=members,
                         expert_backend=expert_backend, width=width)
  return jax.tree.map(lambda full, part: full.at[:rows].set(part), state, head), out


def _position_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
  """uint32 [S] seeds, int32 [S] positions -> one PRNG key per row: key(seed) folded with the position, so a
  row's randomness depends on its own request only."""
  return jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(seeds, positions)


def _step_rows(params, state, *, cfg: ModelConfig, members: int, expert_backend: str, width: int):
  """Every row's next token (see _decode_step)."""
  slots = state["length"].shape[0]
  n_moe = len(cfg.moe_layer_indices)
  length = state["length"]
  tile = lambda a: jnp.tile(a, (members,) + (1,) * (a.ndim - 1))  # [S, ...] -> [M * S, ...] member-major
  rows = members * slots
  kv_valid = jnp.ones((slots, state["cache"]["k"].shape[2]), jnp.bool_)  # causality masks the rest
  roe_taus = roe_keys = None
  if members > 1:
    member = jnp.repeat(jnp.arange(members), slots)  # [M * S]
    roe_taus = tile(state["tau"]).T * (member >= 1)[None]  # [n_moe, M * S]; member 0 is deterministic
    roe_keys = jax.vmap(jax.random.fold_in)(tile(_position_keys(state["roe_seed"], length)), member)
  logits, _, cache = Decoder(cfg, expert_backend=expert_backend).apply(
      {"params": params}, tile(state["token"])[:, None], tile(length)[:, None], jnp.ones((rows, 1), jnp.int32),
      layer_k=tuple(tile(state["k"][:, i]) for i in range(n_moe)), layer_width=(width,) * n_moe,
      cache=state["cache"], cache_index=length, kv_valid=kv_valid, roe_taus=roe_taus, roe_key=roe_keys)
  logp = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)  # [M * S, V]
  if members > 1:  # the mean of each slot's first roe_members members' probabilities
    used = jnp.arange(members)[:, None] < state["roe_members"][None]  # [M, S]
    weight = jnp.where(used, -jnp.log(state["roe_members"].astype(jnp.float32))[None], -jnp.inf)
    logp = jax.nn.logsumexp(logp.reshape(members, slots, -1) + weight[..., None], axis=0)
  token = sample(logp, state["temperature"], state["top_p"], _position_keys(state["seed"], length))
  top_logprobs, top_tokens = jax.lax.top_k(logp, TOP_LOGPROBS)
  chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
  state = dict(state, cache=cache, token=token, length=jnp.minimum(length + 1, kv_valid.shape[1] - 1))
  return state, (token, chosen, top_tokens.astype(jnp.int32), top_logprobs)
