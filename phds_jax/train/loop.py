"""PHDS training: multi-k + curriculum-anchored SFT (or plain LM pre-training) of a MoE, sharded.

`train_and_evaluate(config, workdir)` loads or builds the model, builds the data, and runs `Trainer`:
each step draws k_train from the schedule (sparsity.py), runs a jitted, sharded, buffer-donating step
(gradient accumulation, AdamW, clipping, router losses) over the trainable subset only, evaluates
validation loss at k_pre and an eval grid every N steps, keeps the last N checkpoints plus the best one
by validation loss at k_pre, resumes from the latest checkpoint in the workdir, and can export the
selected model to Hugging Face format.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from phds_jax.data import pipeline as data_lib
from phds_jax.errors import CheckpointError, ConfigProblems, TrainingDivergedError, WorkdirMismatchError
from phds_jax.eval import scoring as evaluate
from phds_jax.eval import settings
from phds_jax.io import checkpoint as model_checkpoint
from phds_jax.io import files
from phds_jax.io import hf
from phds_jax.io.load import load_run_model, run_model_config
from phds_jax.io.paths import write_resolved
from phds_jax.model import layout
from phds_jax.model import losses
from phds_jax.model import sharding as sharding_lib
from phds_jax.model.config import ModelConfig, config_to_dict
from phds_jax.model.transformer import resolve_expert_backend
from phds_jax.train import data as data_setup
from phds_jax.train import metrics as metrics_lib
from phds_jax.train import sparsity


Params = dict[str, Any]

# ---- parameters: trainable subsets ---------------------------------------------------------------------


def _flat(tree: Params) -> dict[str, Any]:
  return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: dict[str, Any]) -> Params:
  return traverse_util.unflatten_dict(flat, sep="/")


def trainable_paths(cfg: ModelConfig, params: Params, spec: str) -> set[str]:
  """Paths `spec` selects (model/layout.py's trainable_paths: groups and/or `re:<regex>` entries), after
  checking that `params` hold only entries of the model's layout."""
  unknown = set(_flat(params)) - {s.name for s in layout.param_layout(cfg)}
  if unknown:
    raise ValueError(f"params hold entries the {cfg.model_type} layout does not know: {sorted(unknown)[:4]}")
  return layout.trainable_paths(cfg, spec)


def split_params(params: Params, paths: set[str]) -> tuple[Params, Params]:
  """(trainable, frozen) nested dicts holding the leaves in / not in `paths`."""
  flat = _flat(params)
  return (_unflat({p: v for p, v in flat.items() if p in paths}),
          _unflat({p: v for p, v in flat.items() if p not in paths}))


def merge_params(a: Params, b: Params) -> Params:
  return _unflat({**_flat(a), **_flat(b)})


# ---- optimizer --------------------------------------------------------------------------------------


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine or linear decay to `lr * end_lr_frac` at `total_steps`."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = optim.lr * optim.end_lr_frac
  if optim.decay == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_frac)
  elif optim.decay == "linear":
    decay = optax.linear_schedule(optim.lr, end, decay_steps)
  elif optim.decay == "constant":
    decay = optax.constant_schedule(optim.lr)
  else:
    raise ValueError(f"optim.decay={optim.decay!r}; choose cosine, linear or constant")
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def make_optimizer(optim, total_steps: int, cfg: ModelConfig) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW (no weight decay on vectors: norms, biases; a stacked parameter is a
  vector when one layer's slice is)."""
  matrices = {spec.name for spec in layout.param_layout(cfg) if len(spec.layer_shape) > 1}
  decayed = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(sharding_lib.path_keys(path)) in matrices, params)
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity(),
      optax.adamw(make_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decayed))


# ---- loss and steps ----------------------------------------------------------------------------------


class Trainer:
  """Jitted, sharded train and eval steps for one model/optimizer/mesh; k static or traced by config."""

  def __init__(self, cfg: ModelConfig, config, mesh: jax.sharding.Mesh, total_steps: int):
    self.cfg, self.config, self.mesh = cfg, config, mesh
    self.tx = make_optimizer(config.optim, total_steps, cfg)
    self.schedule = make_schedule(config.optim, total_steps)
    self.soft_eps = config.phds.soft_mask_eps if config.phds.mask == "soft" else None
    self.traced = config.phds.k_mode == "traced"
    train_ks = settings.parse_numbers(config.phds.k_values) if config.phds.enabled else [cfg.k_pre]
    self.k_max = max(train_ks) if self.traced else None  # without PHDS every step runs at k_pre
    self.n_moe = len(cfg.moe_layer_indices)
    self.expert_backend = resolve_expert_backend(config.model.expert_backend, mesh.devices.flat[0].platform)
    self.objective = losses.OBJECTIVES[config.train.objective]
    self.lb_coef = config.train.lb_coef if config.train.lb_coef >= 0 else cfg.router_aux_loss_coef
    self._steps: dict[Any, Any] = {}
    self.state_shardings = None

  def context(self):
    """The mesh and the config's axis rules, for everything that shards or traces."""
    return sharding_lib.use_mesh(self.mesh, dict(self.config.axis_rules), self.config.model.expert_dispatch)

  def param_sharding(self):
    """(param path, shape) -> NamedSharding: where `pj.load` places each parameter for this trainer."""
    with self.context():
      return layout.layout_sharding(self.mesh, self.cfg)

  # state ----------------------------------------------------------------------------------------------
  def init_state(self, params: Params, trainable: set[str], seed: int, *, copy: bool = True) -> dict[str, Any]:
    """The train state from `params`. copy=False hands the arrays over (the first step donates them);
    with copy=True the caller's arrays survive."""
    with self.context():
      return self._init_state(params, trainable, seed, copy)

  def _init_state(self, params, trainable, seed, copy):
    train_p, frozen_p = split_params(params, trainable)
    shardings = self._set_state_shardings(train_p, frozen_p)
    train_p = jax.device_put(train_p, shardings["trainable"], may_alias=not copy)
    frozen_p = jax.device_put(frozen_p, shardings["frozen"], may_alias=not copy)
    opt_state = jax.jit(self.tx.init, out_shardings=shardings["opt_state"])(train_p)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": train_p, "frozen": frozen_p,
             "opt_state": opt_state, "rng": jax.random.key_data(jax.random.key(seed))}
    return jax.device_put(state, self.state_shardings)

  def _set_state_shardings(self, train_p, frozen_p) -> dict[str, Any]:
    """The state's shardings (also kept as self.state_shardings) for parameters of these shapes."""
    axes = layout.axes_by_path(self.cfg)
    shardings = sharding_lib.param_shardings(self.mesh, {"trainable": train_p, "frozen": frozen_p}, axes)
    opt_shardings = sharding_lib.param_shardings(self.mesh, jax.eval_shape(self.tx.init, train_p), axes)
    repl = sharding_lib.replicated(self.mesh)
    self.state_shardings = {"step": repl, "trainable": shardings["trainable"], "frozen": shardings["frozen"],
                            "opt_state": opt_shardings, "rng": repl}
    return self.state_shardings

  def abstract_init(self, abstract_params: Params, trainable: set[str]) -> dict[str, Any]:
    """The train state as ShapeDtypeStructs with their shardings, from abstract parameters (no weights):
    what ahead-of-time compilation (phds_jax/plan/programs.py) lowers the step with."""
    with self.context():
      train_p, frozen_p = split_params(abstract_params, trainable)
      shardings = self._set_state_shardings(train_p, frozen_p)
      state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "trainable": train_p, "frozen": frozen_p,
               "opt_state": jax.eval_shape(self.tx.init, train_p),
               "rng": jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))}
      return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

  def compiled_train_step(self, abstract_state, abstract_batch, k):
    """The train step at k compiled ahead of time for the trainer's mesh (whatever devices it holds)."""
    k_static, k_traced = self.k_argument(k)
    if k_traced is not None:
      k_traced = tuple(jax.ShapeDtypeStruct(v.shape, jnp.int32) for v in k_traced)
    with self.context():
      return self._jitted_train_step(k_static, k_traced is not None).lower(
          abstract_state, abstract_batch, k_traced).compile()

  def abstract_state(self, state) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                        self.state_shardings)

  # k -----------------------------------------------------------------------------------------------------
  def k_argument(self, k):
    """The sampled k as the step receives it: static ints (one program per k), traced int32 scalars, or
    for a list (one k per micro-batch, traced only) int32 arrays [grad_accum], one per MoE layer."""
    if isinstance(k, list):
      if not self.traced or len(k) != self.config.train.grad_accum:
        raise ValueError(f"one k per micro-batch needs phds.k_mode=traced and {self.config.train.grad_accum} "
                         f"values, got {k} with k_mode={self.config.phds.k_mode}")
      per_micro = [self._per_layer(v) for v in k]
      return None, tuple(jnp.asarray(layer, jnp.int32) for layer in zip(*per_micro))
    if self.traced:
      return None, tuple(jnp.int32(v) for v in self._per_layer(k))
    return self._per_layer(k), None

  def _per_layer(self, k) -> tuple[int, ...]:
    return tuple(k) if isinstance(k, tuple) else (k,) * self.n_moe

  # steps -----------------------------------------------------------------------------------------------
  def _params_for_compute(self, trainable, frozen):
    params = merge_params(trainable, frozen)
    dtype = jnp.dtype(self.config.train.compute_dtype)
    return jax.tree.map(lambda p: p.astype(dtype), params)

  def _train_step(self, state, batch, k_traced, *, k_static):
    config, accum = self.config, self.config.train.grad_accum
    run = losses.RunSpec(k_static if k_static is not None else k_traced, self.k_max, self.soft_eps,
                         config.data.max_loss_tokens, self.expert_backend, config.train.remat,
                         config.model.scan_layers)
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    # k_traced of [accum] arrays: micro-batch j runs at k_traced[l][j] (phds.k_per_microbatch)
    k_micro = k_traced if k_traced is not None and k_traced[0].ndim == 1 else None

    def loss_fn(trainable, micro, k_j):
      params = self._params_for_compute(trainable, state["frozen"])
      terms = self.objective(self.cfg, params, micro, run if k_j is None else run._replace(k=k_j),
                             lb_coef=self.lb_coef, z_coef=config.train.z_coef)
      return (terms.token_loss_sum / total_weight + terms.extra_loss / accum,
              (terms.token_loss_sum, terms.weight, terms.metrics))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(carry, xs):
      grads, sums = carry
      (_, stats), g = grad_fn(state["trainable"], *xs)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, stats)), None

    zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
    # micro-batch j takes rows j, j + accum, ...: every device holds a slice of each micro-batch, so the
    # batch sharding carries over (a contiguous split would put each micro-batch on a few devices)
    micro_batches = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1), batch)
    first = jax.tree.map(lambda x: x[0], (micro_batches, k_micro))
    zero_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                              jax.eval_shape(lambda xs: loss_fn(state["trainable"], *xs)[1], first))
    (grads, (token_loss, weight, sums)), _ = jax.lax.scan(micro_step, (zeros, zero_stats),
                                                          (micro_batches, k_micro))
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    loss, grad_norm = token_loss / jnp.maximum(weight, 1.0), optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if config.train.on_nan == "skip":  # keep the old parameters and moments; the step counter moves on
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      trainable, opt_state = keep(trainable, state["trainable"]), keep(opt_state, state["opt_state"])
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
    new_state = dict(state, step=state["step"] + 1, trainable=trainable, opt_state=opt_state, rng=rng)
    stats = {"loss": loss, **{n: v / accum for n, v in sums.items()}, "grad_norm": grad_norm,
             "lr": self.schedule(state["step"]), "tokens": weight, "finite": finite}
    return new_state, stats

  def train_step(self, state, batch, k):
    """One optimizer step at k (an int, or a per-layer tuple) on a global batch of packed rows."""
    k_static, k_traced = self.k_argument(k)
    with self.context():
      return self._jitted_train_step(k_static, k_traced is not None)(state, batch, k_traced)

  def _jitted_train_step(self, k_static, traced: bool):
    if k_static not in self._steps:
      repl = sharding_lib.replicated(self.mesh)
      batch_sh = {key: sharding_lib.batch_sharding(self.mesh, 2) for key in data_lib.ROW_KEYS}
      k_sh = tuple(repl for _ in range(self.n_moe)) if traced else None
      self._steps[k_static] = jax.jit(
          functools.partial(self._train_step, k_static=k_static),
          in_shardings=(self.state_shardings, batch_sh, k_sh), out_shardings=(self.state_shardings, repl),
          donate_argnums=(0,))
    return self._steps[k_static]

  def eval_nll(self, state, batches: list[dict[str, np.ndarray]], k: int) -> float:
    """Mean NLL per trained token over `batches` at static k (hard top-k, as served)."""
    params = self._params_for_compute(state["trainable"], state["frozen"])
    with self.context():
      return evaluate.mean_nll(self.cfg, params, batches, k=k, max_loss_tokens=self.config.data.max_loss_tokens,
                               place=self.global_batch, expert_backend=self.expert_backend)["nll"]

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's rows -> one global array per key, sharded over the batch axes."""
    with self.context():
      sh = sharding_lib.batch_sharding(self.mesh, 2)
    return {key: jax.make_array_from_process_local_data(sh, np.asarray(local[key])) for key in data_lib.ROW_KEYS}


# ---- model and data set-up -------------------------------------------------------------------------------


# ---- checkpoints -------------------------------------------------------------------------------------------


def _manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep, create=True,
                                         enable_async_checkpointing=config.checkpoint.async_save)
  return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options,
                               item_names=("state", "data", "meta"))


def _save(manager, step, state, iterator, meta):
  # the data position is the same on every process (data.train_batches): one JSON for any process count
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=ocp.args.JsonSave(iterator.get_state()),
                                             meta=ocp.args.JsonSave(meta)))


def _restore(manager, step, abstract_state, iterator):
  state_dir = os.path.join(str(manager.directory), str(step), "state")
  with ocp.StandardCheckpointer() as checkpointer:
    stored = traverse_util.flatten_dict(checkpointer.metadata(state_dir).item_metadata.tree)
  if any("layers_0" in path for path in stored):
    raise CheckpointError(
        f"{state_dir} was written before decoder layers were stacked (one entry per layer): this version "
        "cannot resume it. Start a new run from its model instead: model_path=<workdir>/best (pj.load "
        "converts a per-layer model checkpoint), or finish the run with the phds_jax it started with")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  iterator.set_state(restored["data"])
  return restored["state"], restored["meta"]


# ---- the workdir's identity and stop requests ---------------------------------------------------------

IDENTITY_FILE = "run_identity.json"


def run_identity(config, cfg: ModelConfig) -> dict[str, Any]:
  """What a workdir's checkpoints must agree with to be resumed: the model, and the settings that shape
  the training state or the data stream (other fields, e.g. the step count or eval grid, may change)."""
  identity = {"model": config_to_dict(cfg), "model.param_dtype": config.model.param_dtype,
              "train.trainable": config.train.trainable, "train.batch_size": config.train.batch_size,
              "data.seq_len": config.data.seq_len}
  if config.data.prepared:  # a run resumes only on the data it started with (and its mixture)
    identity.update({"data.prepared": data_setup.fingerprint(config), "data.mixture": config.data.mixture})
  return json.loads(json.dumps(identity))  # as stored: tuples become lists


def identity_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """One line per differing field ("model.hidden_size: workdir 32, config 64")."""
  lines = []
  for key in sorted(set(stored) | set(current)):
    old, new = stored.get(key), current.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      lines += [f"{key}.{name}: workdir {old.get(name)!r}, config {new.get(name)!r}"
                for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    elif old != new:
      lines.append(f"{key}: workdir {old!r}, config {new!r}")
  return lines


def check_workdir(workdir: str, identity: dict[str, Any], has_outputs: bool):
  """Refuses a workdir whose checkpoints come from another run (WorkdirMismatchError naming the fields);
  records this run's identity where nothing was saved yet."""
  path = os.path.join(workdir, IDENTITY_FILE)
  if has_outputs and files.isfile(path):
    differences = identity_differences(json.loads(files.read_text(path)), identity)
    if differences:
      listed = "\n".join(f"  - {d}" for d in differences)
      raise WorkdirMismatchError(f"{workdir} holds checkpoints of another model or of incompatible settings; "
                                 f"it is neither resumed nor overwritten. Use another workdir or remove this one. "
                                 f"Differences:\n{listed}")
    return
  if jax.process_index() == 0:
    files.write_text(path, json.dumps(identity, indent=2, sort_keys=True))


class StopRequest:
  """Asks the loop to finish its step, save and return: SIGTERM in a single-process run; on several
  processes, JAX's preemption sync point (its service catches SIGTERM and the TPU maintenance notice, and
  every process stops at the same step)."""

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager, self.reason, self._previous = manager, None, None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    self.reason = signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    if self.reason is None and jax.process_count() > 1 and self.manager.reached_preemption(step):
      self.reason = "preemption"
    return self.reason is not None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ---- the loop ------------------------------------------------------------------------------------------


def read_history(path: str) -> list[dict[str, Any]]:
  """Validation rows of every evaluation so far, across restarts (a re-done step keeps its last row)."""
  if not files.isfile(path):
    return []
  by_step = {}
  for line in files.read_text(path).splitlines(keepends=True):
    if line.endswith("\n"):  # a last line without one was torn by a killed process (see _drop_torn_line)
      row = json.loads(line)
      by_step[row["step"]] = row
  return [by_step[s] for s in sorted(by_step)]


def _drop_torn_line(path: str) -> None:
  """Cuts a last line a killed process left unfinished, so the next appended row starts on its own line."""
  if jax.process_index() != 0 or files.is_bucket(path) or not os.path.isfile(path):
    return  # a bucket object is written whole (_append_line)
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def _append_line(path: str, line: str) -> None:
  """Appends one line: locally in place; a bucket object cannot grow, so it is rewritten whole."""
  if files.is_bucket(path):
    files.write_text(path, (files.read_text(path) if files.isfile(path) else "") + line + "\n")
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(line + "\n")


def _merge_history(stored: list[dict[str, Any]], evaluated: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
  by_step = {row["step"]: row for row in stored}
  by_step.update(evaluated)
  return [by_step[s] for s in sorted(by_step)]


def selection_k(config, cfg: ModelConfig) -> int:
  """phds.select_k, or when 0: the one k of a fixed-k run (phds.k_values=K, an oracle), else k_pre."""
  if config.phds.select_k:
    return int(config.phds.select_k)
  ks = settings.parse_numbers(config.phds.k_values)
  return ks[0] if config.phds.enabled and len(ks) == 1 else cfg.k_pre


def eval_grid(config, cfg: ModelConfig) -> list[int]:
  """The validation k grid: eval.k_values (each a k of the model), k_pre and the selection k."""
  return sorted(set(settings.k_grid(config.eval.k_values, cfg.num_experts)) | {cfg.k_pre, selection_k(config, cfg)})


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training in `workdir`; returns a summary with the selected checkpoint: the best
  validation loss at `selection_k` (after anchoring began, with phds.select_after_anchor)."""
  files.makedirs(workdir)
  model_checkpoint.recover_replaced(os.path.join(workdir, "best"))
  manager = _manager(workdir, config)
  has_outputs = manager.latest_step() is not None or files.isdir(os.path.join(workdir, "best"))
  cfg = run_model_config(config)
  check_workdir(workdir, run_identity(config, cfg), has_outputs)
  total = config.train.steps
  finished = _finished_summary(workdir, config, manager)
  if finished is not None:
    _say(f"{workdir} has finished its {total} steps; nothing left to do (outputs in {workdir})")
    return finished
  write_resolved(config, workdir)
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  global_batch = config.train.batch_size
  if global_batch % (config.train.grad_accum * jax.process_count()):
    raise ValueError(f"train.batch_size={global_batch} must divide by grad_accum x processes")
  trainer = Trainer(cfg, config, mesh, total)
  tokenizer = data_lib.load_tokenizer(config.tokenizer_path or config.model_path)
  _check_vocabulary(config, cfg, tokenizer)
  run_data = data_setup.build(config, tokenizer, global_batch, jax.process_index(), jax.process_count())
  _say(run_data.summary)
  _say(f"loading {'a random ' + config.model.preset if not config.model_path else config.model_path} "
       f"sharded over mesh {dict(mesh.shape)} ...")
  cfg, params = load_run_model(config, trainer.param_sharding())
  trainable = trainable_paths(cfg, params, config.train.trainable)
  state = trainer.init_state(params, trainable, config.seed, copy=False)
  del params
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["trainable"]))
  n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["frozen"]))
  _say(f"model {cfg.model_type}: {n_train:,} trainable, {n_frozen:,} frozen parameters; mesh {dict(mesh.shape)}")
  iterator, val_batches = run_data.iterator, run_data.val_batches
  schedule = (sparsity.schedule_from_config(config.phds, total) if config.phds.enabled
              else sparsity.KSchedule(k_values=(cfg.k_pre,), seed=config.phds.seed))
  meta = {"best_val_loss": None, "best_step": None}
  start = 0
  if manager.latest_step() is not None:
    start = int(manager.latest_step())
    state, meta = _restore(manager, start, trainer.abstract_state(state), iterator)
    _say(f"resumed from {manager.directory} at step {start}")
  writer = metrics_lib.SummaryWriter(os.path.join(workdir, "tensorboard"))
  progress = metrics_lib.Progress(total, start_step=start)
  _say(f"training {total - start} steps (the first ones compile) ...")
  grid = eval_grid(config, cfg)
  select_k = selection_k(config, cfg)
  is_writer = jax.process_index() == 0  # logs, history, TensorBoard, summary and exports: process 0 only
  history_file = os.path.join(workdir, "eval_history.jsonl")
  evaluated: dict[int, dict[str, Any]] = {}  # this run's rows (every process; the file is process 0's)
  _drop_torn_line(history_file)

  def evaluate(step):
    losses = {k: trainer.eval_nll(state, val_batches, k) for k in grid}
    row = {f"val_loss_k{k}": v for k, v in losses.items()}
    evaluated[step] = {"step": step, **row}
    writer.scalars(step, {**row, **{f"val_ppl_k{k}": float(np.exp(min(v, 50))) for k, v in losses.items()}})
    progress.log(step, {f"val@k{select_k}": losses[select_k],
                        **{f"k{k}": round(v, 4) for k, v in losses.items()}})
    if is_writer:
      _append_line(history_file, json.dumps({"step": step, **row}))
      writer.sync()
    eligible = not config.phds.select_after_anchor or schedule.phase(step) == "anchoring"
    if eligible and (meta["best_val_loss"] is None or losses[select_k] < meta["best_val_loss"]):
      meta.update(best_val_loss=losses[select_k], best_step=step)
      model_checkpoint.save_model(cfg, merge_params(state["trainable"], state["frozen"]),
                                  os.path.join(workdir, "best"), overwrite=True)
    return losses

  if start == 0 and val_batches and config.eval.at_start:
    evaluate(0)
  last, stopped_by, skipped, train_loss = start, None, [], {}
  accum_draws = config.train.grad_accum if config.phds.k_per_microbatch else None
  stop = StopRequest(manager)
  with stop, writer:
    for step in range(start, total):
      k = schedule.sample(step, trainer.n_moe, draws=accum_draws)
      batch = trainer.global_batch(next(iterator))
      state, stats = trainer.train_step(state, batch, k)
      last = step + 1
      if not bool(stats["finite"]):  # one scalar to the host per step
        _non_finite(config, manager, last, stats)
        skipped.append(last)
      k_mean = float(np.mean(k))
      writer.scalars(last, {"train/k": k_mean})  # the k of every step
      if last % config.log_every == 0 or last == total:
        stats = {name: float(v) for name, v in jax.device_get(stats).items()}
        writer.scalars(last, {f"train/{n}": v for n, v in stats.items()})
        train_loss[last] = stats["loss"]
        progress.log(last, {"loss": stats["loss"], "k": k if isinstance(k, int) else k_mean,
                            "lr": stats["lr"], "gnorm": stats["grad_norm"]})
      if val_batches and (last % config.eval.every == 0 or last == total):
        evaluate(last)
      if last == config.train.stop_at:
        stopped_by = "train.stop_at"
      elif stop.reached(last):
        stopped_by = stop.reason
      if last % config.checkpoint.every == 0 or last == total or stopped_by:
        _save(manager, last, state, iterator, dict(meta))
      if stopped_by:
        _say(f"stopping at step {last} ({stopped_by}); the checkpoint is saved: run again to resume")
        break
    manager.wait_until_finished()
  summary = {"workdir": workdir, "steps": last, "stopped_by": stopped_by, "skipped_steps": skipped,
             "best_step": meta["best_step"], "best_val_loss": meta["best_val_loss"], "select_k": select_k,
             "selected_phase": None if meta["best_step"] is None else schedule.phase(meta["best_step"]),
             "eval_k": grid,
             "train_loss": train_loss, "history": _merge_history(read_history(history_file), evaluated)}
  if is_writer:
    files.write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  if config.export_hf and meta["best_step"] is not None and last == total:
    best_cfg, best_params = model_checkpoint.load_model(os.path.join(workdir, "best"))
    if config.phds.export_k:
      best_cfg = best_cfg.replace(num_experts_per_tok=int(config.phds.export_k))
    tokenizer_dir = config.tokenizer_path or config.model_path
    hf.save_pretrained(best_cfg, best_params, os.path.join(workdir, "hf_export"), overwrite=True,
                       copy_files_from=tokenizer_dir or None)
    _say(f"exported the selected checkpoint (step {meta['best_step']}, num_experts_per_tok="
         f"{best_cfg.k_pre}) to {os.path.join(workdir, 'hf_export')}")
  _say(f"best validation loss at k={select_k}{' (k_pre)' if select_k == cfg.k_pre else ''}: "
       f"{meta['best_val_loss']} (step {meta['best_step']}, {summary['selected_phase']}); outputs in {workdir}")
  return summary


def _finished_summary(workdir: str, config, manager: ocp.CheckpointManager) -> Optional[dict[str, Any]]:
  """The stored summary of a run that already reached train.steps (and exported, when asked), else None."""
  path = os.path.join(workdir, "summary.json")
  latest = manager.latest_step()
  if latest is None or latest < config.train.steps or not files.isfile(path):
    return None
  summary = json.loads(files.read_text(path))
  exported = not config.export_hf or files.isdir(os.path.join(workdir, "hf_export"))
  return summary if summary.get("steps") == config.train.steps and exported else None


def _check_vocabulary(config, cfg: ModelConfig, tokenizer) -> None:
  """A tokenizer with ids the model's embedding does not hold is a config mistake (it ends in a nan loss)."""
  if len(tokenizer) > cfg.vocab_size:
    where = config.tokenizer_path or config.model_path
    raise ConfigProblems("config", [
        f"tokenizer_path={where!r}: the tokenizer has {len(tokenizer):,} tokens but the model's vocab_size is "
        f"{cfg.vocab_size:,}; pass this model's tokenizer, or a larger model.overrides.vocab_size for a random "
        "model"])


def _non_finite(config, manager: ocp.CheckpointManager, step: int, stats: dict[str, jax.Array]):
  """A step whose loss or gradient norm is not finite: stop (nothing of it is saved) or report the skip."""
  loss, grad_norm = float(stats["loss"]), float(stats["grad_norm"])
  if config.train.on_nan == "skip":
    _say(f"step {step}: loss {loss}, gradient norm {grad_norm}: update skipped (train.on_nan=skip)")
    return
  manager.wait_until_finished()
  raise TrainingDivergedError(
      f"step {step}: loss {loss}, gradient norm {grad_norm} (not finite); nothing of this step was saved, the "
      f"latest checkpoint is step {manager.latest_step()}. Lower optim.lr, or set train.on_nan=skip to skip "
      "such updates")


def _say(message: str):
  """What a person running the job reads: one line on stdout, from process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)
