"""Checks a run's config before any heavy work: no model built, nothing compiled, no data read.

Each mode's check (registered in phds_jax/cli/modes.py) returns one line per mistake, each naming the
field and what to pass, so the command line can report them all at once. It reads only small files (a model directory's config.json or
model_config.json) and glob patterns; it never opens weights or data.
"""

from __future__ import annotations

import os
from typing import Optional


from phds_jax import errors
from phds_jax.data import pipeline
from phds_jax.data import synthetic
from phds_jax.eval import settings
from phds_jax.io import files
from phds_jax.model import sharding
from phds_jax.train import sparsity

DTYPES = ("float32", "bfloat16", "float16")

# Numeric fields: (low, high), each bound inclusive unless a tuple (value, "open"); None = unbounded.
# Every int / float field of the base config (and of the built-in run's blocks) is here; a test checks it.
_OPEN = "open"
RANGES = {
    "seed": (0, None), "compile_num_slices": (1, None), "log_every": (1, None),
    "data.val_fraction": (0.0, (1.0, _OPEN)), "data.seq_len": (2, None), "data.max_loss_tokens": (0, None),
    "data.seed": (0, None), "data.workers": (0, None),
    "phds.soft_mask_eps": ((0.0, _OPEN), (1.0, _OPEN)), "phds.anchor_start_frac": (0.0, 1.0),
    "phds.anchor_ramp_frac": (0.0, 1.0), "phds.anchor_k": (0, None), "phds.select_k": (0, None),
    "phds.export_k": (0, None), "phds.seed": (0, None),
    "train.steps": (1, None), "train.stop_at": (0, None), "train.batch_size": (1, None),
    "train.grad_accum": (1, None), "train.lb_coef": (None, None), "train.z_coef": (0.0, None),
    "optim.lr": (0.0, None), "optim.warmup_steps": (0, None), "optim.end_lr_frac": (0.0, 1.0),
    "optim.b1": (0.0, (1.0, _OPEN)), "optim.b2": (0.0, (1.0, _OPEN)), "optim.eps": (0.0, None),
    "optim.weight_decay": (0.0, None), "optim.grad_clip": (0.0, None),
    "eval.batch_size": (1, None), "eval.every": (1, None), "eval.reference_k": (0, None), "eval.limit": (0, None),
    "eval.max_rows": (0, None), "eval.roe_seed": (0, None), "eval.latency.batch_size": (1, None),
    "eval.latency.prompt_len": (1, None), "eval.latency.decode_tokens": (1, None),
    "eval.latency.repeats": (1, None),
    "convert.max_shard_size_gb": ((0.0, _OPEN), None),
    "checkpoint.every": (1, None), "checkpoint.keep": (1, None),
    "distributed.num_processes": (0, None), "distributed.process_id": (-1, None),
    "builtin.pretrain_items": (1, None), "builtin.finetune_items": (1, None), "builtin.eval_items": (1, None),
    "pretrain.steps": (1, None), "pretrain.batch_size": (1, None), "pretrain.seq_len": (2, None),
    "pretrain.lr": ((0.0, _OPEN), None), "pretrain.warmup_steps": (0, None),
    "serve.port": (0, 65535), "serve.slots": (1, None), "serve.roe_slots": (0, None), "serve.roe_members": (0, None),
    "serve.max_len": (2, None), "serve.max_tokens": (1, None), "serve.k_max": (0, None), "serve.max_waiting": (0, None),
    "serve.max_body_bytes": (1, None), "serve.drain_seconds": (0.0, None), "serve.timing_steps": (1, None),
}


def _bound_problem(value, bound, low: bool) -> bool:
  if bound is None:
    return False
  edge, is_open = (bound[0], True) if isinstance(bound, tuple) else (bound, False)
  if low:
    return value < edge or (is_open and value == edge)
  return value > edge or (is_open and value == edge)


def _describe_range(low, high) -> str:
  def edge(b):
    return b[0] if isinstance(b, tuple) else b
  left = "(" if isinstance(low, tuple) else "["
  right = ")" if isinstance(high, tuple) or high is None else "]"
  return f"{left}{'-inf' if low is None else edge(low)}, {'inf' if high is None else edge(high)}{right}"


def range_problems(config) -> list[str]:
  """Numeric fields outside their range (RANGES), one line each naming the field and the range."""
  out = []
  for dotted, (low, high) in RANGES.items():
    node = config
    for part in dotted.split("."):
      node = node.get(part) if hasattr(node, "get") else None
      if node is None:
        break
    if node is None or isinstance(node, bool):
      continue
    if _bound_problem(node, low, True) or _bound_problem(node, high, False):
      out.append(f"{dotted}={node!r} is outside {_describe_range(low, high)}")
  return out


def common_problems(config) -> list[str]:
  """Fields every mode reads: the expert backend and dispatch, the parameter dtype, numeric ranges."""
  from phds_jax.model.sharding import EXPERT_DISPATCHES  # pylint: disable=g-import-not-at-top
  from phds_jax.model.transformer import EXPERT_BACKENDS  # pylint: disable=g-import-not-at-top

  out = _choice(config, "model.expert_backend", EXPERT_BACKENDS)
  out += _choice(config, "model.expert_dispatch", EXPERT_DISPATCHES)
  out += _choice(config, "model.param_dtype", DTYPES + (("",) if config.mode == "convert" else ()))
  return out + range_problems(config)


class FileProblem(str):
  """A problem found by looking for a file here: where the job runs on other machines (`phds-launch`), the
  file may be there, so the launcher reports it as a note instead of refusing the job."""


def _file_problems(test, path: str, message: str) -> list[str]:
  """[FileProblem(message)] when `test(path)` is false, or the reason a path cannot be looked at here (a
  bucket without its fsspec backend)."""
  try:
    return [] if test(path) else [FileProblem(message)]
  except errors.PathError as e:
    return [FileProblem(str(e))]


def _model_dir_problem(field: str, path: str) -> Optional[str]:
  from phds_jax.io.load import detect_format  # pylint: disable=g-import-not-at-top

  try:
    detect_format(path)
  except errors.PathError as e:
    return FileProblem(str(e))
  except errors.CheckpointError:
    if not files.isdir(path):
      return FileProblem(f"{field}={path!r}: no such directory; pass an HF model directory or a phds_jax "
                         "checkpoint")
    return FileProblem(f"{field}={path!r}: neither an HF model directory (config.json) nor a phds_jax "
                       "checkpoint (model_config.json)")
  return None


def _model_config(path: str):
  """The ModelConfig of a model directory from its small config file, or None if it cannot be read."""
  from phds_jax.io import checkpoint
  from phds_jax.io import hf  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import detect_format  # pylint: disable=g-import-not-at-top

  try:
    if detect_format(path) == "hf":
      return hf.load_config(path)
    return checkpoint.load_model_config(path)
  except errors.PhdsError:
    return None


def _pattern_problems(field: str, value: str, required: bool) -> list[str]:
  patterns = [p for p in pipeline.split_sources(value) if not p.startswith(pipeline.HUB)]
  if not patterns and not value.strip():
    return [f"{field}: required; pass comma-separated files or glob patterns"] if required else []
  return [line for p in patterns for line in _file_problems(files.glob, p, f"{field}: {p!r} matches no file")]


def _data_problems(config) -> list[str]:
  """data.*: the sources (or a prepared dataset instead of them), their format, the mixture."""
  d = config.data
  out = _choice(config, "data.format", ("sft", "text")) + _choice(config, "data.on_error", ("skip", "raise"))
  if d.prepared:
    given = [f for f in ("train_files", "val_files") if d[f]]
    if given:
      out.append(f"data.prepared={d.prepared!r} holds the data: {' and '.join('data.' + f for f in given)} would "
                 "not be read; drop them (or data.prepared)")
    out += _prepared_problems(d.prepared)
    sources = None
  else:
    out += _pattern_problems("data.train_files", d.train_files, required=True)
    out += _pattern_problems("data.val_files", d.val_files, required=False)
    sources = len(pipeline.split_sources(d.train_files))
  try:
    pipeline.mixture_weights(d.mixture, sources)
  except ValueError as e:
    out.append(str(e))
  return out


def _prepared_problems(path: str) -> list[str]:
  return _file_problems(files.isfile, os.path.join(path, "manifest.json"),
                        f"data.prepared={path!r}: no manifest.json there (make it with --config=configs/prepare.py; "
                        "an interrupted prepare writes it last)")


def prepare_problems(config) -> list[str]:
  """The prepare mode: sources, a tokenizer and where the prepared dataset goes."""
  d = config.data
  out = [] if d.prepared else ["data.prepared: required; the directory (local, relative or gs://) to write to"]
  tokenizer = config.tokenizer_path or config.model_path
  if not tokenizer:
    out.append("tokenizer_path: required (or model_path): the directory holding the tokenizer the runs will use")
  else:
    field = "tokenizer_path" if config.tokenizer_path else "model_path"
    out += _file_problems(files.isdir, tokenizer, f"{field}={tokenizer!r}: no such directory")
  out += _choice(config, "data.format", ("sft", "text")) + _choice(config, "data.on_error", ("skip", "raise"))
  out += _pattern_problems("data.train_files", d.train_files, required=True)
  return out + _pattern_problems("data.val_files", d.val_files, required=False)


def _choice(config, dotted: str, allowed) -> list[str]:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return [] if value in allowed else [f"{dotted}={value!r}; choose one of {', '.join(map(str, allowed))}"]


def _trainable_problems(spec: str) -> list[str]:
  from phds_jax.model import layout  # pylint: disable=g-import-not-at-top

  try:
    layout.parse_trainable(spec)
  except ValueError as e:
    return [str(e)]
  return []


def _random_model(config):
  """(problems, ModelConfig or None) of the random model `model.preset` + `model.overrides`."""
  from phds_jax.io.load import model_overrides  # pylint: disable=g-import-not-at-top
  from phds_jax.model.families import preset  # pylint: disable=g-import-not-at-top

  try:
    return [], preset(config.model.preset).replace(**model_overrides(config))
  except (errors.ConfigError, TypeError) as e:
    return [f"model.preset / model.overrides: {e}"], None


def _start_model(config) -> tuple[list[str], Optional[int]]:
  """Problems with where training starts (model_path or a random preset), and the model's expert count."""
  if config.model.random_init:
    problems, cfg = _random_model(config)
    if not (config.tokenizer_path or config.model_path):
      problems.append("tokenizer_path: required with model.random_init=True (a directory holding a tokenizer)")
    return problems, cfg.num_experts if cfg else None
  if not config.model_path:
    return [("model_path: required; pass an HF model directory or a phds_jax checkpoint "
             "(--config.model_path=/models/NAME), or set model.random_init=True to start from random weights "
             "of model.preset")], None
  problem = _model_dir_problem("model_path", config.model_path)
  if problem:
    return [problem], None
  cfg = _model_config(config.model_path)
  return [], cfg.num_experts if cfg else None


def train_problems(config) -> list[str]:
  out, num_experts = _start_model(config)
  if config.tokenizer_path:
    out += _file_problems(files.isdir, config.tokenizer_path, f"tokenizer_path={config.tokenizer_path!r}: no "
                          "such directory")
  return out + _data_problems(config) + _training_problems(config, num_experts)


def builtin_problems(config) -> list[str]:
  """The built-in run: its model is always the random preset; its data are the task families of
  `builtin.mixture` (phds_jax/data/synthetic.py)."""
  out, cfg = _random_model(config)
  try:
    synthetic.parse_mixture(config.builtin.mixture)
  except ValueError as e:
    out.append(f"builtin.mixture={config.builtin.mixture!r}: {e}")
  return out + _training_problems(config, cfg.num_experts if cfg else None)


def _training_problems(config, num_experts: Optional[int]) -> list[str]:
  """The PHDS, training and optimizer settings, the k grids against the model, the mesh and batch."""
  out = _choice(config, "phds.mask", ("soft", "hard")) + _choice(config, "phds.k_mode", ("traced", "static"))
  out += _choice(config, "train.on_nan", ("stop", "skip"))
  out += _choice(config, "train.remat", ("none", "dots", "full"))
  out += _choice(config, "phds.anchor_shape", sparsity.SHAPES)
  out += _choice(config, "optim.decay", ("cosine", "linear", "constant"))
  if config.phds.enabled:  # else every step runs at k_pre and phds.k_values is not read
    out += settings.k_grid_problems("phds.k_values", config.phds.k_values, num_experts)
  out += settings.k_grid_problems("eval.k_values", config.eval.k_values, num_experts)
  out += _selection_problems(config, num_experts)
  out += _trainable_problems(config.train.trainable)
  out += sharding.mesh_and_batch_problems(config)
  return out


def _selection_problems(config, num_experts: Optional[int]) -> list[str]:
  """phds.select_k / export_k (0 or a k of the model), select_after_anchor, k_per_microbatch."""
  out = []
  for field in ("select_k", "export_k"):
    if config.phds[field]:
      out += settings.k_grid_problems(f"phds.{field}", str(config.phds[field]), num_experts)
  if config.phds.select_after_anchor and not (config.phds.enabled and config.phds.anchor):
    out.append("phds.select_after_anchor=True needs anchoring (phds.enabled=True and phds.anchor=True)")
  if config.phds.k_per_microbatch and config.phds.k_mode != "traced":
    out.append("phds.k_per_microbatch=True needs phds.k_mode=traced (static k would compile a program per "
               "combination of micro-batch k)")
  return out


def eval_problems(config) -> list[str]:
  checkpoints, out = settings.eval_checkpoints(config)
  labels = list(checkpoints)
  paths = dict(checkpoints.values())  # field -> checkpoint directory
  if not paths:
    out.append("model_path: required; pass the checkpoint to evaluate (HF directory or phds_jax checkpoint)")
  if config.eval.agreement_with and config.eval.agreement_with not in labels:
    out.append(f"eval.agreement_with={config.eval.agreement_with!r} is not a checkpoint label; the labels are "
               f"{labels}")
  for field, path in paths.items():
    problem = _model_dir_problem(field, path)
    if problem:
      out.append(problem)
      continue
    cfg = _model_config(path)
    out += settings.k_grid_problems("eval.k_values", config.eval.k_values, cfg.num_experts if cfg else None)
  for path in (p.strip() for p in config.eval.task_files.split(",") if p.strip()):
    out += _file_problems(files.isfile, path, f"eval.task_files: {path!r} does not exist")
  out += settings.eval_roe_settings(config)[1]
  out += _pattern_problems("eval.text_files", config.eval.text_files, required=False)
  out += _pattern_problems("eval.sft_files", config.eval.sft_files, required=False)
  if config.data.prepared:  # its validation rows are scored like eval.sft_files
    out += _prepared_problems(config.data.prepared)
    out += [f"eval.{f}: not read when data.prepared is set (its validation rows are scored); drop one"
            for f in ("text_files", "sft_files") if config.eval[f]]
  return list(dict.fromkeys(out))


def serve_problems(config) -> list[str]:
  import importlib.util  # pylint: disable=g-import-not-at-top

  missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
  if missing:
    return [f"serve needs {', '.join(missing)}: pip install 'phds_jax[serve]' (or -e '.[serve]' in a checkout)"]
  if not config.model_path:
    return ["model_path: required. To serve the built-in default, run `python -m phds_jax.main "
            "--config=configs/tiny.py` here first (it exports workdir/tiny/phds/hf_export), or pass "
            "--config.model_path=DIR (`phds-serve DIR`: an HF directory, a phds_jax checkpoint, gs://... or a "
            "model id)"]
  problem = _model_dir_problem("model_path", config.model_path)
  if problem:
    return [problem]
  out = []
  cfg = _model_config(config.model_path)
  s = config.serve
  if cfg is not None:
    if s.k_max > cfg.num_experts:
      out.append(f"serve.k_max={s.k_max} exceeds the model's {cfg.num_experts} experts")
    if s.max_len > cfg.max_position_embeddings:
      out.append(f"serve.max_len={s.max_len} exceeds the model's max_position_embeddings="
                 f"{cfg.max_position_embeddings}")
  for field in ("buckets", "widths", "rows"):
    text = s[field]
    try:
      values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
      out.append(f"serve.{field}={text!r} must be comma-separated integers")
      continue
    if any(v < 1 for v in values):
      out.append(f"serve.{field}={text!r}: each value must be >= 1")
    elif field == "buckets" and values and max(values) >= s.max_len:
      out.append(f"serve.buckets={text!r}: a bucket holds the prompt but its last token, so each must be < "
                 f"serve.max_len={s.max_len}")
    elif field == "rows" and values and max(values) != s.slots:
      out.append(f"serve.rows={text!r} must end at serve.slots={s.slots}")
    elif field == "widths" and values and cfg is not None and max(values) != (s.k_max or cfg.num_experts):
      out.append(f"serve.widths={text!r} must end at k_max={s.k_max or cfg.num_experts} (serve.k_max, or the "
                 "number of experts)")
  return out


def sweep_problems(config) -> list[str]:
  out, num_experts = _plan_model(config)
  return out + settings.k_grid_problems("eval.k_values", config.eval.k_values, num_experts)


def convert_problems(config) -> list[str]:
  out = []
  if not config.model_path:
    out.append("model_path: required; pass the checkpoint to convert (HF directory or phds_jax checkpoint)")
  else:
    problem = _model_dir_problem("model_path", config.model_path)
    out += [problem] if problem else []
  if not config.convert.dst:
    out.append("convert.dst: required; pass the output directory")
  elif not config.convert.overwrite:
    out += _file_problems(lambda p: not files.exists(p), config.convert.dst, f"convert.dst={config.convert.dst!r} "
                          "exists; pass --config.convert.overwrite=True to replace it")
  out += _choice(config, "convert.to", ("", "hf", "orbax"))
  return out


def plan_problems(config) -> list[str]:
  """Mistakes in a plan's config (compile_topology): the slice, the model shapes, the training settings."""
  from phds_jax.plan import topology  # pylint: disable=g-import-not-at-top

  if config.mode != "train":
    return [f"compile_topology plans training; mode={config.mode!r} (use mode=train)"]
  try:
    spec = topology.parse_slice(config.compile_topology, config.compile_num_slices)
  except ValueError as e:
    return [str(e)]
  out, num_experts = _plan_model(config)
  out += _choice(config, "phds.mask", ("soft", "hard")) + _choice(config, "phds.k_mode", ("traced", "static"))
  out += _choice(config, "train.remat", ("none", "dots", "full"))
  out += settings.k_grid_problems("phds.k_values", config.phds.k_values, num_experts)
  out += _trainable_problems(config.train.trainable)
  del spec  # the mesh and batch are checked against the slice's devices once they are described (phds_jax/plan/programs.py)
  return out


def _plan_model(config) -> tuple[list[str], Optional[int]]:
  if config.model_path:
    problem = _model_dir_problem("model_path", config.model_path)
    if problem:
      return [problem], None
    cfg = _model_config(config.model_path)
    return [], cfg.num_experts if cfg else None
  problems, cfg = _random_model(config)
  return problems, cfg.num_experts if cfg else None
