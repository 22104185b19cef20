"""The study's runs (the base, the oracles, PHDS and its ablations) and the config each fine-tunes with."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional, Sequence

from experiments.settings import ROOT, Scale, Settings

GROUPS = ("baseline", "oracles", "phds", "subsets", "mask", "kset")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  group: str
  fields: dict[str, Any]  # dotted config fields set on top of the scale's fine-tuning config
  claim: str


def runs(scale: Scale) -> list[Run]:
  """Every run of the study at `scale`. "phds" (wide k set, soft mask eps 1e-6, anchoring, all parameters
  trained) is the reference the ablations change one thing of; it appears once, in the group "phds"."""
  phds = {"phds.k_values": scale.wide_k, "phds.mask": "soft", "phds.soft_mask_eps": 1e-6, "phds.anchor": True,
          "phds.anchor_start_frac": scale.anchor_start_frac, "train.trainable": "all"}
  out = [Run("base", "baseline", {}, "a")]
  for k in scale.k_grid:  # oracles: fixed k, hard top-k, selected at their own k; evaluated at every k
    fields = {"phds.k_values": str(k), "phds.mask": "hard", "phds.anchor": False, "phds.k_mode": "static"}
    out.append(Run(f"oracle_k{k}", "oracles", fields, "b,c"))  # oracle_k{k_pre}: plain SFT at k_pre
  out.append(Run("phds", "phds", phds, "b,c,d"))
  out.append(Run("phds_no_anchor", "phds", {**phds, "phds.anchor": False}, "d"))
  for subset in ("attention", "experts", "router"):
    out.append(Run(f"phds_train_{subset}", "subsets", {**phds, "train.trainable": subset}, "e"))
  for eps, name in ((1e-3, "1e-3"), (1e-9, "1e-9")):
    out.append(Run(f"phds_eps_{name}", "mask", {**phds, "phds.soft_mask_eps": eps}, "ablation"))
  out.append(Run("phds_hard_mask", "mask", {**phds, "phds.mask": "hard"}, "ablation"))
  for name, fields in (("phds_bf16", {}), ("phds_eps_1e-3_bf16", {"phds.soft_mask_eps": 1e-3}),
                       ("phds_hard_mask_bf16", {"phds.mask": "hard"})):  # where pod runs compute
    out.append(Run(name, "mask", {**phds, **fields, "train.compute_dtype": "bfloat16"}, "ablation"))
  out.append(Run("phds_narrow_k", "kset", {**phds, "phds.k_values": scale.narrow_k}, "ablation"))
  return out


def select(scale: Scale, groups: Sequence[str]) -> list[Run]:
  """The runs of `groups`, the base first whenever any run is chosen (every comparison needs it)."""
  unknown = set(groups) - set(GROUPS)
  if unknown:
    raise SystemExit(f"unknown group(s) {sorted(unknown)}; the groups are {list(GROUPS)}")
  chosen = [r for r in runs(scale) if r.group in groups]
  if any(r.group != "baseline" for r in chosen) or "baseline" in groups:
    chosen = [r for r in runs(scale) if r.name == "base"] + [r for r in chosen if r.name != "base"]
  return chosen


def load_config_file(relative: str, arg: Optional[str] = None):
  """`get_config(arg)` of a configs/*.py file (relative to the repository root)."""
  spec = importlib.util.spec_from_file_location("study_config", os.path.join(ROOT, relative))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def finetune_config(settings: Settings, run: Run, base_path: str, tokenizer: str, data_dir: str, seed: int,
                    scale: Scale):
  """The fine-tuning config of `run` at tiny scale (phds_jax.train.loop.train_and_evaluate) from the
  synthetic base at `base_path`."""
  from experiments import synthetic_base  # pylint: disable=g-import-not-at-top
  from phds_jax.cli import configs  # pylint: disable=g-import-not-at-top

  config = configs.base_config()
  f = settings.finetune
  config.model.preset, config.model.overrides = "tiny-olmoe", synthetic_base.model_overrides(settings)
  config.mode, config.model_path, config.tokenizer_path, config.seed = "train", base_path, tokenizer, seed
  config.data.format, config.data.val_files = "sft", ""
  config.data.train_files = os.path.join(data_dir, "train.jsonl")
  config.data.seq_len, config.data.max_loss_tokens = f["seq_len"], f["max_loss_tokens"]
  config.data.val_fraction, config.data.seed, config.phds.seed = f["val_fraction"], seed, seed
  config.train.steps, config.train.batch_size = scale.steps, f["batch_size"]
  config.train.compute_dtype = "float32"
  config.optim.lr, config.optim.warmup_steps = f["lr"], f["warmup_steps"]
  config.eval.k_values, config.eval.every, config.checkpoint.every = str(scale.k_pre), f["every"], f["every"]
  config.eval.at_start = False  # select among the fine-tuned checkpoints (the paper), never the base itself
  config.checkpoint.keep, config.export_hf, config.log_every = 1, False, 30
  return configs.set_fields(config, run.fields)
