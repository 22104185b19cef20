"""The decoder stack and `forward`, the public entry point that runs it at any declared k.

`forward(cfg, params, tokens, k=...)` accepts k as
  - None: k_pre (`cfg.num_experts_per_tok`);
  - a Python int: static, the MoE layers compute exactly k experts per token;
  - a tuple of ints, one per MoE layer: static per-layer k;
  - an int32 scalar or [B] array with a static `k_max`: traced, one compiled program for every k <= k_max.
Arguments are validated in Python (ValueError naming the argument) before anything is compiled.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.model import experts as experts_lib
from phds_jax.model import layers
from phds_jax.model import roe as roe_lib
from phds_jax.model import routing
from phds_jax.model.config import LayerRun, ModelConfig
from phds_jax.model.sharding import constrain

Params = dict[str, Any]

EXPERT_BACKENDS = ("auto", *experts_lib.BACKENDS)

# What a decoder layer keeps for the backward pass (training memory against recompute):
# "none" everything; "dots" only matmul outputs without batch dimensions (jax's
# dots_with_no_batch_dims_saveable); "full" only the layer's input, the rest is recomputed.
REMAT_POLICIES = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}

# Scanning a run of layers pays off from this many layers on; shorter runs are unrolled even when scanning
# (benchmarks/scan_bench.py, 2-core CPU: at 2 layers unrolled compiles 12% and trains 8% faster, from 4 on
# scanned is as fast or faster; docs/scan.md).
MIN_SCAN_LAYERS = 3


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); the mlp is MoE or dense by config."""

  cfg: ModelConfig
  is_moe: bool
  param_dtype: jnp.dtype = jnp.float32
  expert_backend: str = "auto"

  @nn.compact
  def __call__(self, x, cos, sin, mask, token_mask, k=None, width=None, soft_mask_eps=None, cache=None,
               cache_index=None, layer=0, roe_tau=None, roe_key=None, members: int = 1):
    cfg, dt = self.cfg, self.param_dtype
    h = layers.RMSNorm(cfg.rms_norm_eps, dt, name="input_layernorm")(x)
    attn, cache = layers.Attention(cfg, dt, name="self_attn")(h, cos, sin, mask, cache, cache_index, layer,
                                                              members)
    x = x + attn
    h = layers.RMSNorm(cfg.rms_norm_eps, dt, name="post_attention_layernorm")(x)
    if self.is_moe:
      out, stats = layers.SparseMoeBlock(cfg, dt, self.expert_backend, name="mlp")(
          h, k=k, width=width, soft_mask_eps=soft_mask_eps, token_mask=token_mask, roe_tau=roe_tau,
          roe_key=roe_key)
    else:
      out, stats = layers.MLP(cfg, cfg.intermediate_size, dt, name="mlp")(h), None
    return x + out, stats, cache


def _init_run(rng, cfg: ModelConfig, run: LayerRun, param_dtype, expert_backend: str) -> Params:
  """Random parameters of one run of equal layers, each leaf stacked on a leading [run.size] axis."""
  layer = DecoderLayer(cfg, run.is_moe, param_dtype, expert_backend)
  x = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
  cos, sin = layers.rope_cos_sin(jnp.zeros((1, 1), jnp.int32), cfg.resolved_head_dim, cfg.rope_theta, x.dtype)
  ones = jnp.ones((1, 1), jnp.int32)
  k = cfg.k_pre if run.is_moe else None
  init_one = lambda key: layer.init(key, x, cos, sin, layers.attention_mask(ones), ones != 0, k, k)["params"]
  return jax.vmap(init_one)(jax.random.split(rng, run.size))


class _Segment(NamedTuple):
  """Layers start .. stop - 1 of a run (absolute indices) computed by one scan: one static k and width."""

  start: int
  stop: int
  k: Optional[int]  # static k of every layer in it (None: dense, or traced)
  width: Optional[int]


def _segments(run: LayerRun, layer_k, layer_width) -> list[_Segment]:
  """A run split where its static (k, width) changes (a static per-layer k that differs between layers)."""
  if not run.is_moe:
    return [_Segment(run.start, run.stop, None, None)]
  out = []
  for i in range(run.size):
    slot = run.moe_start + i
    k = layer_k[slot] if isinstance(layer_k[slot], int) else None
    if out and (out[-1].k, out[-1].width) == (k, layer_width[slot]):
      out[-1] = out[-1]._replace(stop=run.start + i + 1)
    else:
      out.append(_Segment(run.start + i, run.start + i + 1, k, layer_width[slot]))
  return out


class Decoder(nn.Module):
  """tokens [B, L] -> logits [B, L, V] and the MoE layers' RouterStats, stacked [n_moe, ...].

  Each run of equal layers (`cfg.layer_runs`) keeps its parameters stacked on a leading layers axis and is
  computed by one `jax.lax.scan` (`scan_layers`, compiled once whatever the depth; runs shorter than
  MIN_SCAN_LAYERS unrolled) or by a Python loop over the same parameters (unrolled: one copy of the layer per
  layer in the program). Both compute the same function. A static per-layer k that differs between layers
  splits a run into scans of equal k.
  """

  cfg: ModelConfig
  param_dtype: jnp.dtype = jnp.float32
  skip_head: bool = False  # return the final-norm hidden states [B, L, H] instead of logits
  expert_backend: str = "auto"  # how routed experts are computed (model/experts.py); all give the same function
  remat: str = "none"  # REMAT_POLICIES name: what each layer keeps for the backward pass (no cache only)
  scan_layers: bool = True

  @nn.compact
  def __call__(self, tokens, positions, segment_ids, *, layer_k, layer_width, soft_mask_eps=None,
               cache=None, cache_index=None, kv_valid=None, roe_taus=None, roe_key=None, roe_members: int = 0):
    """layer_k / layer_width: one entry per MoE layer (k: int or int32 [B]; width: int). roe_taus: float32
    [num_moe_layers, B], each row's Gumbel temperature per MoE layer, with roe_key (Roster of Experts;
    one key, or one per row [B]). cache_index: one int, or int32 [B] (each row writes its own slot).
    roe_members > 1 without a cache: the B rows are that many members (member-major) over one clean
    context, each position computed as decoding against a clean cache computes it (layers.Attention).

    Without `cache`: returns (logits or hidden, stats), attention within segments. With `cache`
    ({"k", "v": [B, NL, S, KV, D]}, every layer's: `init_cache`) the tokens take slots cache_index..,
    attend to earlier valid slots (kv_valid [B, S]), and (logits, stats, new cache) is returned.
    """
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=self.param_dtype, name="embed_tokens",
                     embedding_init=nn.initializers.normal(cfg.initializer_range))
    x = constrain(embed(tokens), ("batch", "length", "embed"))  # [B, L, H]
    cos, sin = layers.rope_cos_sin(positions, cfg.resolved_head_dim, cfg.rope_theta, x.dtype)
    if cache is None:
      mask = layers.attention_mask(segment_ids)
    else:
      mask = layers.cache_attention_mask(kv_valid, cache_index, tokens.shape[1])
    context = (cos, sin, mask, segment_ids != 0, cache_index, max(roe_members, 1) if cache is None else 1)
    traced_k = None if isinstance(layer_k[0], int) else jnp.stack(layer_k)  # [n_moe, B]
    all_stats = []
    for run in cfg.layer_runs:
      stacked = self.param(run.name, _init_run, cfg, run, self.param_dtype, self.expert_backend)
      for seg in _segments(run, layer_k, layer_width):
        part = stacked if seg.stop - seg.start == run.size else jax.tree.map(
            lambda a, seg=seg, run=run: a[seg.start - run.start:seg.stop - run.start], stacked)
        first = run.moe_start + seg.start - run.start  # the segment's MoE slots: first .. first + n - 1
        slots = slice(first, first + seg.stop - seg.start) if run.is_moe else None
        x, stats, cache = self._layers(part, seg, run.is_moe, x, cache, context,
                                       None if slots is None else first + jnp.arange(seg.stop - seg.start),
                                       None if traced_k is None or slots is None else traced_k[slots],
                                       None if roe_taus is None or slots is None else roe_taus[slots],
                                       roe_key, soft_mask_eps)
        if run.is_moe:
          all_stats.append(stats)
    stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *all_stats)
    x = layers.RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x)
    if self.skip_head:
      out = x
    elif cfg.tie_word_embeddings:
      out = embed.attend(x)
    else:
      out = layers.dense(cfg.vocab_size, False, cfg, self.param_dtype, "lm_head")(x)
    if cache is None:
      return constrain(out, ("batch", "length", "vocab")) if not self.skip_head else out, stats
    return out, stats, cache

  def _layers(self, params, seg: _Segment, is_moe: bool, x, cache, context, moe_slots, k, taus, roe_key, eps):
    """Layers seg.start .. seg.stop - 1 on x [B, L, H], params stacked [n, ...]; k / taus [n, B] or None.
    Returns (x, stats stacked [n, ...] or None, cache)."""
    cos, sin, mask, token_mask, cache_index, members = context
    layer = DecoderLayer(self.cfg, is_moe, self.param_dtype, self.expert_backend)
    n = seg.stop - seg.start
    scan = self.scan_layers and n >= MIN_SCAN_LAYERS
    noisy = taus is not None

    def body(carry, xs):
      x, cache = carry
      layer_params, index, slot, k_layer, tau = xs
      x, stats, cache = layer.apply(
          {"params": layer_params}, x, cos, sin, mask, token_mask, seg.k if k_layer is None else k_layer,
          seg.width, eps, cache, cache_index, index, tau, _fold_in(roe_key, slot) if noisy else None, members)
      return (constrain(x, ("batch", "length", "embed")), cache), stats

    if self.remat != "none" and cache is None:
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=not scan)
    xs = (params, seg.start + jnp.arange(n, dtype=jnp.int32), moe_slots, k, taus)
    if scan:
      (x, cache), stats = jax.lax.scan(body, (x, cache), xs)
      return x, stats, cache
    per_layer = []
    for i in range(n):
      (x, cache), stats = body((x, cache), jax.tree.map(lambda a, i=i: a[i], xs))
      per_layer.append(stats)
    return x, None if per_layer[0] is None else jax.tree.map(lambda *s: jnp.stack(s), *per_layer), cache


def init_cache(cfg: ModelConfig, batch: int, slots: int, dtype) -> dict[str, jax.Array]:
  """An empty KV cache for every decoder layer: {"k", "v": [batch, NL, slots, KV, D]} (zeros)."""
  shape = (batch, cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.resolved_head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _fold_in(key: jax.Array, data: int) -> jax.Array:
  """A PRNG key (or each of a [B] array of keys) folded with `data`."""
  if key.ndim == 0:
    return jax.random.fold_in(key, data)
  return jax.vmap(jax.random.fold_in, (0, None))(key, data)


def project_logits(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
  """hidden [..., H] (from `forward(..., return_hidden=True)`) -> logits [..., V], as the model's head."""
  if cfg.tie_word_embeddings:
    return hidden @ params["embed_tokens"]["embedding"].T.astype(hidden.dtype)
  return hidden @ params["lm_head"]["kernel"].astype(hidden.dtype)


class _KPlan(NamedTuple):
  """How each MoE layer is told its k: static ints, or one traced int32 [B] array, plus compute widths."""

  static: Optional[tuple[int, ...]]  # one int per MoE layer
  traced: Optional[tuple[jax.Array, ...]]  # one int32 [B] per MoE layer
  widths: tuple[int, ...]


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
  """Random parameters (HF's init: normal(initializer_range) kernels, unit norms, zero biases)."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  plan = plan_k(cfg, None, None, None, batch_size=1)
  model = Decoder(cfg, param_dtype=jnp.dtype(dtype))

  @jax.jit
  def init(rng):
    return model.init(rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens),
                      layer_k=plan.static, layer_width=plan.widths)["params"]

  return init(rng)


def _is_static_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_range(name: str, value: int, low: int, high: int):
  if not low <= value <= high:
    raise ValueError(f"{name}={value} is out of range: it must lie in [{low}, {high}]")


def plan_k(cfg: ModelConfig, k, k_max: Optional[int], soft_mask_eps: Optional[float],
           batch_size: int) -> _KPlan:
  """Validates (k, k_max, soft_mask_eps) and resolves them into a per-MoE-layer plan."""
  num_experts, n_moe = cfg.num_experts, len(cfg.moe_layer_indices)
  if soft_mask_eps is not None:
    if not isinstance(soft_mask_eps, numbers.Real) or not 0.0 < float(soft_mask_eps) < 1.0:
      raise ValueError(f"soft_mask_eps={soft_mask_eps!r} must be a float in (0, 1), or None for hard top-k")
  if k_max is not None:
    if not _is_static_int(k_max):
      raise ValueError(f"k_max={k_max!r} must be a Python int in [1, {num_experts}]")
    _check_range("k_max", int(k_max), 1, num_experts)

  def width_of(k_layer):
    return routing.compute_width(k_static=k_layer, k_max=k_max, k_pre=cfg.k_pre,
                                 soft_mask_eps=soft_mask_eps)

  if k is None:
    k = cfg.k_pre
  if _is_static_int(k):
    _check_range("k", int(k), 1, num_experts if k_max is None else k_max)
    static = tuple(int(k) for _ in range(n_moe))
    return _KPlan(static, None, tuple(width_of(v) for v in static))
  if isinstance(k, (tuple, list)):
    if len(k) != n_moe:
      raise ValueError(f"per-layer k has {len(k)} entries; the model has {n_moe} MoE layers "
                       f"(layers {list(cfg.moe_layer_indices)})")
    if all(_is_static_int(v) for v in k):
      for i, value in enumerate(k):
        _check_range(f"k[{i}]", int(value), 1, num_experts if k_max is None else k_max)
      static = tuple(int(v) for v in k)
      return _KPlan(static, None, tuple(width_of(v) for v in static))
    traced = tuple(_traced_k(f"k[{i}]", jnp.int32(v) if _is_static_int(v) else v, k_max, batch_size)
                   for i, v in enumerate(k))
    return _KPlan(None, traced, tuple(width_of(None) for _ in range(n_moe)))
  traced = _traced_k("k", k, k_max, batch_size)
  return _KPlan(None, tuple(traced for _ in range(n_moe)), tuple(width_of(None) for _ in range(n_moe)))


def _traced_k(name: str, k, k_max: Optional[int], batch_size: int) -> jax.Array:
  """Validates one traced k (int array, scalar or [B]) and broadcasts it to int32 [B]."""
  if not hasattr(k, "dtype") or not hasattr(k, "shape"):
    raise ValueError(f"{name}={k!r} must be None, an int, a tuple of ints (one per MoE layer), "
                     "or an int32 array (scalar or [batch]) with k_max")
  if k_max is None:
    raise ValueError(f"{name} is an array (traced k): pass a static k_max, the largest k it may hold")
  if not jnp.issubdtype(k.dtype, jnp.integer):
    raise ValueError(f"{name} array must have an integer dtype, got {k.dtype}")
  if k.shape not in ((), (batch_size,)):
    raise ValueError(f"{name} array must be a scalar or have shape [batch]=({batch_size},), got {k.shape}")
  if not isinstance(k, jax.core.Tracer):
    values = np.asarray(k)
    if values.size and (values.min() < 1 or values.max() > k_max):
      raise ValueError(f"{name} array values must lie in [1, k_max={k_max}], got min {values.min()} "
                       f"max {values.max()}")
  return jnp.broadcast_to(jnp.asarray(k, jnp.int32), (batch_size,))


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """[B, L] segment ids -> [B, L] positions restarting at 0 at each new segment."""
  length = segment_ids.shape[1]
  index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], jnp.bool_),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - start_index


def resolve_expert_backend(expert_backend: str, platform: Optional[str] = None) -> str:
  """The backend `expert_backend` names ("auto": the default of `platform`, else of JAX's default
  backend), or ValueError listing them.

  Resolving "auto" before jit makes "auto" and the backend it stands for one compiled program.
  """
  if expert_backend == "auto":
    return experts_lib.default_backend(platform or jax.default_backend())
  if expert_backend not in experts_lib.BACKENDS:
    raise ValueError(f"expert_backend={expert_backend!r}; choose one of {EXPERT_BACKENDS}")
  return expert_backend


@functools.partial(jax.jit, static_argnames=("cfg", "layer_k", "layer_width", "soft_mask_eps",
                                             "return_aux", "return_hidden", "expert_backend", "remat",
                                             "scan_layers", "roe_members"))
def _forward_jit(params, tokens, positions, segment_ids, k_traced, roe_taus, roe_key, *, cfg, layer_k,
                 layer_width, soft_mask_eps, return_aux, return_hidden, expert_backend, remat, scan_layers,
                 roe_members=0):
  if layer_k is None:
    layer_k = k_traced
  logits, stats = Decoder(cfg, skip_head=return_hidden, expert_backend=expert_backend, remat=remat,
                          scan_layers=scan_layers).apply(
      {"params": params}, tokens, positions, segment_ids, layer_k=layer_k, layer_width=layer_width,
      soft_mask_eps=soft_mask_eps, roe_taus=roe_taus, roe_key=roe_key, roe_members=roe_members)
  if roe_members and not return_hidden:
    return roe_lib.ensemble_log_probs(logits, roe_members)
  if not return_aux:
    return logits
  total = routing.combine_stats(stats)
  aux = {
      "load_balance_loss": routing.load_balance_loss(total),
      "router_z_loss": routing.router_z_loss(total),
      "expert_counts": stats.expert_counts,  # [num_moe_layers, E]
  }
  return logits, aux


def forward(cfg: ModelConfig, params: Params, tokens, *, k=None, k_max: Optional[int] = None,
            soft_mask_eps: Optional[float] = None, positions=None, segment_ids=None,
            return_aux: bool = False, return_hidden: bool = False, expert_backend: str = "auto",
            remat: str = "none", scan_layers: bool = True, roe: Optional[roe_lib.RoE] = None):
  """Runs the decoder at a declared k.

  tokens: int [B, L]. positions: int [B, L] (default: restart at each segment). segment_ids: int [B, L],
  packed-example ids with 0 = padding (default: all ones; attention never crosses segments).
  Returns logits [B, L, V] in the params' dtype, and with `return_aux` a dict with the load-balance loss,
  the router z-loss (both float32 scalars) and per-MoE-layer expert selection counts [n_moe, E].
  With `return_hidden` the final-norm hidden states [B, L, H] come instead of logits (see project_logits).
  expert_backend: how the routed experts are computed ("auto", "chunked", "sorted", "ragged", "reference";
  see model/experts.py): an execution choice, every backend computes the same function.
  remat: what each layer keeps for a backward pass (REMAT_POLICIES: "none", "dots", "full"); the same
  function, less memory for more compute under jax.grad.
  scan_layers: compute each run of equal layers with one `jax.lax.scan` (True: the program's size and compile
  time do not grow with depth) or unrolled (False); the same function, parameters stacked either way.
  roe: a Roster-of-Experts ensemble (pj.RoE(members, tau, seed)): the members run as extra batch rows of
  one program and the result is the ensemble's float32 next-token log-probabilities [B, L, V], the log of
  the members' mean probabilities (members=1, tau=0: exactly log_softmax of the logits). Every position is
  computed as `generate` decodes it against its clean cache: a member's query at position t attends to the
  deterministic member's keys/values before t and to its own at t, so scores and generation are one
  algorithm (and one cost). With return_hidden the members' hidden states come instead, [members * B, L, H] member-major (project the
  positions needed, then pj.model.roe.ensemble_log_probs). Inference only: not with return_aux.
  """
  expert_backend = resolve_expert_backend(expert_backend)
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
  if not hasattr(tokens, "shape") or len(tokens.shape) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer array of shape [batch, length], got "
                     f"{getattr(tokens, 'dtype', type(tokens))} {getattr(tokens, 'shape', '')}")
  batch, length = tokens.shape
  if length == 0 or batch == 0:
    raise ValueError(f"tokens must be non-empty, got shape {tokens.shape}")
  for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
    if arr is not None and tuple(arr.shape) != (batch, length):
      raise ValueError(f"{name} must have the shape of tokens {tokens.shape}, got {arr.shape}")
  if roe is not None:
    if not isinstance(roe, roe_lib.RoE):
      raise ValueError(f"roe={roe!r} must be a pj.RoE(members=..., tau=..., seed=...)")
    if return_aux:
      raise ValueError("roe runs an inference ensemble: return_aux is not available with it")
    taus = roe.layer_taus(len(cfg.moe_layer_indices))  # validates a per-layer tuple's length
  plan = plan_k(cfg, k, k_max, soft_mask_eps, batch)
  tokens = jnp.asarray(tokens, jnp.int32)
  segment_ids = jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  positions = positions_from_segments(segment_ids) if positions is None else jnp.asarray(positions, jnp.int32)
  eps = None if soft_mask_eps is None else float(soft_mask_eps)
  traced, roe_taus, roe_key, members = plan.traced, None, None, 0
  if roe is not None:
    tokens, positions, segment_ids = roe.tile(tokens), roe.tile(positions), roe.tile(segment_ids)
    traced = None if traced is None else tuple(roe.tile(t) for t in traced)
    members = roe.members
    if members > 1:  # tau may be traced (roe passed through jit): rows with tau = 0 still route deterministically
      roe_taus, roe_key = roe.row_taus(len(taus), batch), jax.random.key(roe.seed)
  return _forward_jit(params, tokens, positions, segment_ids, traced, roe_taus, roe_key, cfg=cfg,
                      layer_k=plan.static, layer_width=plan.widths, soft_mask_eps=eps, return_aux=return_aux,
                      return_hidden=return_hidden, expert_backend=expert_backend, remat=remat,
                      scan_layers=bool(scan_layers), roe_members=members)
