"""The trainer: loss goes down, frozen subsets stay put, resume is exact, sharding changes nothing."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import phds_jax as pj
from phds_jax.io import load as load_lib
from phds_jax.io import checkpoint
from phds_jax import errors
from phds_jax.data import pipeline as data
from phds_jax.model import losses
from phds_jax import main
from phds_jax.model import sharding
from phds_jax.train import data as train_data
from phds_jax.train import loop as train
from conftest import set_fields, toy_train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _sigterm_after(step):
  """Trainer.train_step that sends this process SIGTERM once `step` is done, as a scheduler would."""
  original = train.Trainer.train_step

  def train_step(self, state, batch, k):
    state, stats = original(self, state, batch, k)
    if int(state["step"]) == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return state, stats
  return train_step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One uninterrupted 30-step run (exported to HF), and the same config stopped at step 13
  (train.stop_at), resumed, stopped by SIGTERM after step 20, and resumed to the end: shared by the loss,
  resume, preemption, TensorBoard, history and export tests."""
  root = tmp_path_factory.mktemp("runs")
  handler_before = signal.getsignal(signal.SIGTERM)
  full = train.train_and_evaluate(toy_train_config(root / "a", **_SHARED), str(root / "a" / "w"))
  first = train.train_and_evaluate(toy_train_config(root / "b", **_SHARED, **{"train.stop_at": 13}),
                                   str(root / "b" / "w"))
  original = train.Trainer.train_step
  train.Trainer.train_step = _sigterm_after(20)
  try:
    terminated = train.train_and_evaluate(toy_train_config(root / "b", **_SHARED), str(root / "b" / "w"))
  finally:
    train.Trainer.train_step = original
  resumed = train.train_and_evaluate(toy_train_config(root / "b", **_SHARED), str(root / "b" / "w"))
  return {"full": full, "first": first, "terminated": terminated, "resumed": resumed, "a": root / "a" / "w",
          "b": root / "b" / "w", "sigterm_handler_before": handler_before,
          "sigterm_handler_after": signal.getsignal(signal.SIGTERM)}


_SHARED = {"train.steps": 30, "export_hf": True}


def test_training_decreases_validation_loss_at_every_k(runs):
  summary = runs["full"]
  first, last = summary["history"][0], summary["history"][-1]
  for k in (1, 2):
    assert last[f"val_loss_k{k}"] < 0.8 * first[f"val_loss_k{k}"]
  assert summary["best_step"] == 30 and os.path.isdir(runs["a"] / "best")
  assert [h["step"] for h in summary["history"]] == [0, 10, 20, 30]


def _trainer(tmp_path, **changes):
  config = toy_train_config(tmp_path, **changes)
  cfg, params = load_lib.load_run_model(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  return config, cfg, params, train.Trainer(cfg, config, mesh, config.train.steps)


def _toy_batches(tmp_path, config, n):
  tokenizer = data.load_tokenizer(config.tokenizer_path)
  rows, _, _ = train_data.build_rows(config, tokenizer)
  it = data.train_batches(rows, config.train.batch_size, seed=0)
  return [next(it) for _ in range(n)]


def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state(tmp_path):
  config, cfg, params, trainer = _trainer(tmp_path, **{"train.trainable": "attention,router"})
  paths = train.trainable_paths(cfg, params, config.train.trainable)
  assert paths and all("/self_attn/" in p or "/mlp/gate/" in p for p in paths)
  state = trainer.init_state(params, paths, seed=0)
  _, frozen_before = train.split_params(params, paths)
  frozen_before = jax.tree.map(np.array, frozen_before)
  trainable_before = jax.tree.map(np.array, state["trainable"])
  for batch in _toy_batches(tmp_path, config, 3):
    state, _ = trainer.train_step(state, trainer.global_batch(batch), 1)
  assert _leaves_equal(state["frozen"], frozen_before)
  assert not _leaves_equal(state["trainable"], trainable_before)
  assert _leaves_equal(train.split_params(params, paths)[1], frozen_before)  # the caller's params survive
  opt_paths = {"/".join(str(getattr(k, "key", k)) for k in path)
               for path, _ in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]}
  assert not [p for p in opt_paths if "experts" in p or "embed_tokens" in p]


def test_unknown_trainable_subset_is_an_error(tmp_path):
  _, cfg, params, _ = _trainer(tmp_path)
  with pytest.raises(ValueError, match="unknown subset 'atention'"):
    train.trainable_paths(cfg, params, "atention")
  with pytest.raises(ValueError, match="selects no parameter"):
    train.trainable_paths(cfg, params, "re:^nothing$")
  assert train.trainable_paths(cfg, params, "re:^lm_head/") == {"lm_head/kernel"}


@pytest.mark.parametrize("k_mode, expected_programs", [("traced", 1), ("static", 2)])
def test_changing_k_compiles_once_per_mode(tmp_path, k_mode, expected_programs):
  config, cfg, params, trainer = _trainer(tmp_path, **{"phds.k_mode": k_mode})
  state = trainer.init_state(params, train.trainable_paths(cfg, params, "all"), seed=0)
  for i, batch in enumerate(_toy_batches(tmp_path, config, 4)):
    state, _ = trainer.train_step(state, trainer.global_batch(batch), 1 + i % 2)
  assert len(trainer._steps) == expected_programs
  step_fn = next(iter(trainer._steps.values()))
  assert step_fn._cache_size() == 1


def test_resume_equals_uninterrupted_run_bit_for_bit(runs):
  assert runs["first"]["steps"] == 13 and runs["first"]["stopped_by"] == "train.stop_at"
  # SIGTERM: the step in flight finishes, a checkpoint is saved, the run returns normally
  assert runs["terminated"]["steps"] == 20 and runs["terminated"]["stopped_by"] == "SIGTERM"
  assert runs["sigterm_handler_after"] is runs["sigterm_handler_before"]  # the trainer's handler is removed
  assert runs["resumed"]["steps"] == 30 and runs["resumed"]["stopped_by"] is None
  assert runs["resumed"]["history"] == runs["full"]["history"]
  _, final_a = checkpoint.load_model(str(runs["a"] / "best"))
  _, final_b = checkpoint.load_model(str(runs["b"] / "best"))
  assert _leaves_equal(final_a, final_b)


def test_selected_checkpoint_is_exported_to_hugging_face_format(runs):
  import phds_jax as pj

  cfg, best = pj.load(str(runs["a"] / "best"))
  hf_cfg, exported = pj.load(str(runs["a"] / "hf_export"))
  assert hf_cfg == cfg and _leaves_equal(best, exported)


def _scalar_events(path):
  """tag -> {step: value} from a TensorBoard event file (TFRecord frames around Event protos)."""
  from tensorboardX.proto import event_pb2

  raw, at, out = open(path, "rb").read(), 0, {}
  while at < len(raw):
    (length,) = struct.unpack("<Q", raw[at:at + 8])
    event = event_pb2.Event.FromString(raw[at + 12:at + 12 + length])
    for value in event.summary.value:
      out.setdefault(value.tag, {})[event.step] = value.simple_value
    at += 16 + length
  return out


def test_tensorboard_events_hold_every_metric(runs):
  logdir = runs["a"] / "tensorboard"
  (name,) = os.listdir(logdir)  # the resumed run appends a file of its own; this run wrote one
  scalars = _scalar_events(logdir / name)
  assert {"train/loss", "train/k", "train/grad_norm", "val_loss_k1", "val_loss_k2", "val_ppl_k1"} <= set(scalars)
  assert sorted(scalars["train/k"]) == list(range(1, 31))
  assert scalars["val_loss_k2"] == pytest.approx({h["step"]: h["val_loss_k2"] for h in runs["full"]["history"]})


_SHARDED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import jax
    from conftest import set_fields, toy_train_config
    from phds_jax.train import loop as train
    import pathlib
    tmp = pathlib.Path(sys.argv[1])
    changes = json.loads(sys.argv[3])
    summary = train.train_and_evaluate(toy_train_config(tmp, **changes), str(tmp / "w"))
    print(json.dumps({"devices": jax.device_count(), "history": summary["history"]}))
""")


def _run_sharded(tmp_path, devices, changes):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path), os.path.join(ROOT, "tests"),
                        json.dumps(changes)], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_device_sharded_training_matches_one_device(tmp_path):
  common = {"train.steps": 10, "eval.every": 5, "model.expert_backend": "reference"}
  assert jax.device_count() == 1  # this process: the one-device run
  one = train.train_and_evaluate(toy_train_config(tmp_path / "one", **common), str(tmp_path / "one" / "w"))
  eight = _run_sharded(tmp_path / "eight", 8, {**common, "mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 2})
  assert eight["devices"] == 8 and len(one["history"]) == len(eight["history"]) == 3
  for a, b in zip(one["history"], eight["history"]):
    for key in a:
      assert abs(a[key] - b[key]) <= 1e-5, (key, a[key], b[key])


def test_a_workdir_of_another_model_is_refused_untouched(runs, tmp_path):
  workdir = runs["a"]
  before = {p: os.path.getmtime(p) for p in workdir.rglob("*")}
  other = toy_train_config(tmp_path, **_SHARED, **{"model.overrides": {"vocab_size": 64, "num_hidden_layers": 1,
                                                                        "hidden_size": 48},
                                                   "train.batch_size": 4})
  with pytest.raises(errors.WorkdirMismatchError) as raised:
    train.train_and_evaluate(other, str(workdir))
  message = str(raised.value)
  assert "model.hidden_size: workdir 64, config 48" in message and "train.batch_size: workdir 8, config 4" in message
  assert "num_hidden_layers" not in message  # only the fields that differ
  assert {p: os.path.getmtime(p) for p in workdir.rglob("*")} == before  # nothing written, nothing resumed


def test_a_workdir_without_checkpoints_takes_the_new_identity(tmp_path):
  config = toy_train_config(tmp_path)
  cfg = load_lib.run_model_config(config)
  (tmp_path / "w").mkdir()
  train.check_workdir(str(tmp_path / "w"), train.run_identity(config, cfg.replace(hidden_size=48)), False)
  train.check_workdir(str(tmp_path / "w"), train.run_identity(config, cfg), False)  # nothing saved: no refusal
  with pytest.raises(errors.WorkdirMismatchError, match="train.trainable: workdir 'all', config 'router'"):
    train.check_workdir(str(tmp_path / "w"), train.run_identity(set_fields(config, **{"train.trainable": "router"}),
                                                                 cfg), True)


def test_non_finite_update_is_skipped_or_stops_the_run(tmp_path):
  config, cfg, params, trainer = _trainer(tmp_path, **{"train.on_nan": "skip"})
  poisoned = jax.tree.map(np.array, params)
  poisoned["lm_head"]["kernel"][0, 0] = np.nan  # every logit of the vocabulary's first entry: NaN loss
  state = trainer.init_state(poisoned, train.trainable_paths(cfg, poisoned, "all"), seed=0)
  before = jax.tree.map(np.array, state["trainable"])
  state, stats = trainer.train_step(state, trainer.global_batch(_toy_batches(tmp_path, config, 1)[0]), 1)
  assert not bool(stats["finite"]) and int(state["step"]) == 1
  after = jax.tree.map(np.array, state["trainable"])
  assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
  # the whole loop, on_nan=stop: the run ends at the step naming it, and no checkpoint holds NaNs
  model_dir = checkpoint.save_model(cfg, poisoned, str(tmp_path / "nan_model"))
  stop = toy_train_config(tmp_path / "s", **{"model_path": model_dir, "model.random_init": False,
                                             "eval.at_start": False, "checkpoint.every": 1})
  with pytest.raises(errors.TrainingDivergedError, match=r"step 1: loss nan.*the latest checkpoint is step None"):
    train.train_and_evaluate(stop, str(tmp_path / "s" / "w"))
  assert not os.path.isdir(tmp_path / "s" / "w" / "best")


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
  """Strided micro-batches (row j, j + accum, ...) sum to the full batch's token-weighted gradient (router
  losses off: they are averaged per micro-batch by design)."""
  results = {}
  for accum in (1, 4):
    config, cfg, params, trainer = _trainer(tmp_path / str(accum), **{
        "train.grad_accum": accum, "train.lb_coef": 0.0, "train.z_coef": 0.0})
    state = trainer.init_state(params, train.trainable_paths(cfg, params, "all"), seed=0)
    state, stats = trainer.train_step(state, trainer.global_batch(_toy_batches(tmp_path, config, 1)[0]), 2)
    results[accum] = (float(stats["loss"]), float(stats["grad_norm"]), jax.tree.map(np.asarray, state["trainable"]))
  assert results[1][0] == pytest.approx(results[4][0], rel=1e-6)
  assert results[1][1] == pytest.approx(results[4][1], rel=1e-5)  # the accumulated gradient's scale (Adam hides it)
  for a, b in zip(jax.tree.leaves(results[1][2]), jax.tree.leaves(results[4][2])):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_each_micro_batch_runs_at_its_own_k(tmp_path):
  """phds.k_per_microbatch: with k = [1, 2] micro-batch 0 (rows 0, 2, ...) runs at k=1 and micro-batch 1 at
  k=2; the step's loss is their token-weighted mean, and differs from [1, 1] and [2, 2]."""
  config, cfg, params, trainer = _trainer(tmp_path, **{"train.grad_accum": 2, "phds.k_per_microbatch": True,
                                                        "model.overrides.num_hidden_layers": 2})  # k matters more
  batch = _toy_batches(tmp_path, config, 1)[0]
  loss = {}
  for ks in ([1, 2], [1, 1], [2, 2]):
    state = trainer.init_state(params, train.trainable_paths(cfg, params, "all"), seed=0)
    loss[tuple(ks)] = float(trainer.train_step(state, trainer.global_batch(batch), ks)[1]["loss"])
  run = losses.RunSpec(None, k_max=2, soft_mask_eps=config.phds.soft_mask_eps,
                       max_loss_tokens=config.data.max_loss_tokens, expert_backend=trainer.expert_backend)
  sums = [losses.token_nll(cfg, params, {key: v[j::2] for key, v in batch.items()},
                           run._replace(k=(jnp.int32(k),) * trainer.n_moe))[:2] for j, k in enumerate((1, 2))]
  expected = float(sum(n for n, _ in sums) / sum(w for _, w in sums))
  assert loss[(1, 2)] == pytest.approx(expected, rel=1e-5)
  # k's effect on a random model is small; float32 rounding of a loss near 4 is ~5e-7
  assert min(abs(loss[(1, 2)] - loss[(1, 1)]), abs(loss[(1, 2)] - loss[(2, 2)])) > 1e-5
  with pytest.raises(ValueError, match="one k per micro-batch"):
    trainer.train_step(state, trainer.global_batch(batch), [1, 2, 2])


def test_load_balance_coefficient_defaults_to_the_models_own(tmp_path):
  config = toy_train_config(tmp_path)
  config.model.overrides.router_aux_loss_coef = 0.001  # as Qwen's checkpoints say
  cfg = load_lib.run_model_config(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  assert train.Trainer(cfg, config, mesh, 1).lb_coef == cfg.router_aux_loss_coef == 0.001
  config.train.lb_coef = 0.05
  assert train.Trainer(cfg, config, mesh, 1).lb_coef == 0.05


def test_without_phds_the_k_set_is_not_read(tmp_path):
  """phds.enabled=False trains at k_pre: a k set the model could not run (k=9 of 8 experts) is neither
  refused by the config check nor used for the traced k's bound."""
  from phds_jax.cli import config_check

  config = toy_train_config(tmp_path, **{"phds.enabled": False, "phds.k_values": "9"})
  cfg = load_lib.run_model_config(config)
  assert train.Trainer(cfg, config, sharding.make_mesh(dict(config.mesh)), 1).k_max == cfg.k_pre
  assert not [p for p in config_check.train_problems(config) if "phds.k_values" in p]
  config.phds.enabled = True
  assert any(p.startswith("phds.k_values='9'") for p in config_check.train_problems(config))


def test_an_oracle_is_selected_and_exported_at_its_own_k(tmp_path):
  """A fixed-k run (phds.k_values=1, hard mask, no anchoring) selects by the validation loss at k=1, not at
  k_pre=2, and exports with num_experts_per_tok=1."""
  config = toy_train_config(tmp_path, **{
      "train.steps": 6, "eval.every": 2, "checkpoint.every": 6, "phds.k_values": "1", "phds.anchor": False,
      "phds.mask": "hard", "phds.export_k": 1, "export_hf": True, "eval.at_start": True})
  summary = main.run(config, str(tmp_path / "oracle"))
  assert summary["select_k"] == 1
  by_k1 = min(summary["history"], key=lambda row: row["val_loss_k1"])
  assert summary["best_step"] == by_k1["step"] and summary["best_val_loss"] == by_k1["val_loss_k1"]
  assert summary["selected_phase"] == ("start" if by_k1["step"] == 0 else "fixed_k")
  with open(tmp_path / "oracle" / "hf_export" / "config.json") as f:
    assert json.load(f)["num_experts_per_tok"] == 1
  assert pj.load(str(tmp_path / "oracle" / "best"))[0].k_pre == 2  # the checkpoint itself keeps its k_pre


def test_selection_after_anchoring_began(tmp_path):
  """phds.select_after_anchor: only evaluations after the anchoring phase began can be selected (here steps
  4 and 6 of 6, anchoring from step 3), and the summary says so. With lr 0 every evaluation ties, so the
  first eligible one (step 4) is selected; without the restriction it would be step 0. Micro-batches draw
  their own k."""
  config = toy_train_config(tmp_path, **{
      "train.steps": 6, "eval.every": 2, "checkpoint.every": 6, "phds.anchor_start_frac": 0.5,
      "phds.select_after_anchor": True, "train.grad_accum": 2, "phds.k_per_microbatch": True, "optim.lr": 0.0})
  summary = main.run(config, str(tmp_path / "anchored"))
  assert [row["step"] for row in summary["history"]] == [0, 2, 4, 6]
  assert len({row["val_loss_k2"] for row in summary["history"]}) == 1
  assert (summary["best_step"], summary["selected_phase"], summary["select_k"]) == (4, "anchoring", 2)
  config.phds.anchor, config.phds.k_mode = False, "static"
  with pytest.raises(errors.ConfigProblems) as info:
    main.run(config, str(tmp_path / "refused"))
  assert any(p.startswith("phds.select_after_anchor=True needs anchoring") for p in info.value.problems)
  assert any(p.startswith("phds.k_per_microbatch=True needs phds.k_mode=traced") for p in info.value.problems)


_RUN_CONFIG = textwrap.dedent("""
    import json, sys
    import ml_collections
    from phds_jax import main
    with open(sys.argv[1]) as f:
      main.run(ml_collections.ConfigDict(json.load(f)), sys.argv[2])
""")


def _kill_points(workdir, seed=0):
  """(how, predicate of the seconds since start) for each run to kill: while an asynchronous save is being
  written (orbax's temporary step directory exists), and a random moment after a random step's checkpoint."""
  import random
  rng = random.Random(seed)
  checkpoints = workdir / "checkpoints"

  def names():
    return os.listdir(checkpoints) if checkpoints.is_dir() else []

  step, delay = rng.choice([12, 15, 18, 21]), rng.uniform(0.0, 0.2)
  committed = {"at": None}

  def after_step(elapsed):
    if committed["at"] is None and any(n.isdigit() and int(n) >= step for n in names()):
      committed["at"] = elapsed
    return committed["at"] is not None and elapsed >= committed["at"] + delay

  return [("during an asynchronous save", lambda elapsed: any("tmp" in n for n in names())),
          (f"{delay:.2f} s after the step-{step} checkpoint", after_step)]


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_no_checkpoint_and_ends_bit_identical(runs, tmp_path):
  """SIGKILL (no chance to clean up) during an asynchronous save and at a random moment, then run to the end:
  every restart resumes from an intact checkpoint and the final state equals the uninterrupted run's."""
  import time
  import orbax.checkpoint as ocp
  config = toy_train_config(tmp_path, **_SHARED, **{"checkpoint.async_save": True, "checkpoint.every": 3,
                                                    "mode": "train"})
  (tmp_path / "config.json").write_text(config.to_json())
  workdir = tmp_path / "w"
  argv = [sys.executable, "-c", _RUN_CONFIG, str(tmp_path / "config.json"), str(workdir)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  killed = []
  for how, due in _kill_points(workdir):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    start = time.monotonic()
    while proc.poll() is None and not due(time.monotonic() - start):
      time.sleep(0.01)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      killed.append(how)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
  assert len(killed) == 2, killed  # every planned kill landed before its run could finish
  main.run(config, str(workdir))  # the last restart runs to the end (in this process: nothing to kill)
  with ocp.StandardCheckpointer() as checkpointer:
    ours = checkpointer.restore(workdir / "checkpoints" / "30" / "state")
    uninterrupted = checkpointer.restore(runs["a"] / "checkpoints" / "30" / "state")
  assert _leaves_equal(ours, uninterrupted)
  _, best = checkpoint.load_model(str(workdir / "best"))
  _, best_uninterrupted = checkpoint.load_model(str(runs["a"] / "best"))
  assert _leaves_equal(best, best_uninterrupted)
  history = json.loads((workdir / "summary.json").read_text())["history"]
  assert history == runs["full"]["history"]


def test_weight_decay_skips_norms_and_biases_also_when_stacked(tmp_path):
  """AdamW's weight decay applies to matrices only: a stacked norm scale [NL, H] is a vector per layer."""
  config = toy_train_config(tmp_path, **{"optim.weight_decay": 0.5, "optim.warmup_steps": 0})
  cfg = pj.preset("tiny-qwen-moe")  # stacked runs, q/k/v biases, norms
  params = pj.init_params(cfg, jax.random.key(0))
  tx = train.make_optimizer(config.optim, 10, cfg)
  updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(params)
  moved = {"/".join(sharding.path_keys(path)): bool(jnp.any(u != 0))
           for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert not moved["layers_0_to_1/input_layernorm/scale"] and not moved["layers_0_to_1/self_attn/q_proj/bias"]
  assert not moved["norm/scale"]
  assert moved["layers_0_to_1/self_attn/q_proj/kernel"] and moved["layers_0_to_1/mlp/experts/gate_proj"]
  assert moved["embed_tokens/embedding"]
