"""A tiny base that knows its tasks and needs its experts: an OLMoE-shaped MoE (16 experts, k_pre = 4)
trained from scratch at k_pre on the synthetic task families (phds_jax/data/synthetic.py), then measured:
accuracy per family at every k on each seed's evaluation items, and which experts each family uses.

  python -m experiments.synthetic_base                 # build once (cached), report into experiments/
  python -m experiments.synthetic_base --seeds=0,1,2 --report=experiments/BASE.md

What it is evidence for: a model whose accuracy depends on k the way the paper's pretrained MoEs do (good at
k_pre, clearly worse at k = 1, mostly on the families that store facts in the experts), so a fine-tuning
method that changes the k-dependence can be seen to. What it is not: a language model. Its "pre-training" is
supervised training on the same families the study later fine-tunes on (other items, and one family never
fine-tuned on), in a 51-token vocabulary; what it shows about real SFT data and real MoEs is by analogy.
"""

from __future__ import annotations

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.synthetic_base")

import argparse
import json
import os
import time
from typing import Any, Sequence

from experiments import data
from experiments import specialisation
from experiments.progress import say, write_json
from experiments.score import score_tasks
from experiments.settings import DEFAULT, ROOT, Settings


def base_dir(settings: Settings, cache: str) -> str:
  """Where the base is trained once: keyed by the study's version and the recipe."""
  tag = "_".join(f"{key}{value}" for key, value in sorted(settings.synthetic_base.items()) if key != "mixture")
  mixture = "-".join(f"{f}{w}" for f, w in settings.synthetic_base["mixture"].items())
  return os.path.join(settings.base_root or os.path.join(cache, "study"),
                      f"v{settings.version}_synthetic_{tag}_{mixture}")


def model_overrides(settings: Settings) -> dict[str, Any]:
  """The tiny-olmoe preset's shape for the synthetic vocabulary (model_overrides last: a test shrinks it)."""
  from phds_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  recipe = settings.synthetic_base
  return {"vocab_size": synthetic.VOCAB_SIZE, "hidden_size": recipe["hidden_size"], "num_attention_heads": 4,
          "num_key_value_heads": 4, "num_hidden_layers": recipe["layers"], "num_experts": recipe["num_experts"],
          "num_experts_per_tok": recipe["k_pre"], "moe_intermediate_size": recipe["expert_size"],
          "intermediate_size": recipe["expert_size"], "max_position_embeddings": 256, "tie_word_embeddings": True,
          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **settings.model_overrides}


def pretrain_config(settings: Settings, directory: str):
  """The base's run: every family's items (synthetic.sample, weighted by the mixture) as prompt/response
  pairs, loss on the answers, at k_pre, from random weights."""
  from phds_jax.cli import configs  # pylint: disable=g-import-not-at-top

  recipe = settings.synthetic_base
  c = configs.base_config()
  c.mode, c.model.random_init, c.model.preset = "train", True, "tiny-olmoe"
  c.model.overrides = model_overrides(settings)
  c.tokenizer_path = os.path.join(directory, "tokenizer")
  c.data.format, c.data.train_files = "sft", os.path.join(directory, "pretrain.jsonl")
  c.data.seq_len, c.data.max_loss_tokens, c.data.val_fraction = recipe["seq_len"], 32, 0.02
  c.phds.enabled = False
  c.train.steps, c.train.batch_size, c.train.compute_dtype = recipe["steps"], recipe["batch_size"], "float32"
  c.optim.lr, c.optim.warmup_steps = recipe["lr"], recipe["warmup_steps"]
  c.eval.k_values = ",".join(str(k) for k in range(1, recipe["k_pre"] + 1))  # the base's loss at every k
  c.eval.every, c.eval.at_start = recipe["steps"], False
  c.checkpoint.every, c.log_every, c.export_hf = recipe["steps"], 100, False
  return c


def build(settings: Settings, cache: str, progress=say) -> str:
  """The base's best checkpoint, trained once into base_dir (an interrupted build resumes)."""
  from phds_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from phds_jax.io import checkpoint, files  # pylint: disable=g-import-not-at-top
  from phds_jax.train import loop  # pylint: disable=g-import-not-at-top

  directory = base_dir(settings, cache)
  best = os.path.join(directory, "run", "best")
  if os.path.isfile(os.path.join(best, checkpoint.CONFIG_FILE)):
    progress(f"synthetic base: cached in {best}")
    return best
  recipe = settings.synthetic_base
  os.makedirs(directory, exist_ok=True)
  synthetic.write_tokenizer(os.path.join(directory, "tokenizer"))
  data_file = os.path.join(directory, "pretrain.jsonl")
  if not os.path.isfile(data_file):
    items = synthetic.sample_mixture(recipe["mixture"], recipe["items"], seed=-1)
    files.write_jsonl(data_file, [synthetic.as_sft(it) for it in items])
  progress(f"synthetic base: training {recipe['num_experts']} experts at k_pre={recipe['k_pre']} for "
           f"{recipe['steps']} steps on {recipe['items']:,} items into {directory} (once) ...")
  loop.train_and_evaluate(pretrain_config(settings, directory), os.path.join(directory, "run"))
  return best


def evaluation_items(settings: Settings, seed: int) -> dict[str, list[dict[str, Any]]]:
  """family -> the seed's evaluation items (the study's split)."""
  return {family: evaluation for family, (evaluation, _) in data.seed_items(settings, seed).items()}


def tokenizer_dir(best: str) -> str:
  """The tokenizer of the base whose best checkpoint is `best` (base_dir/run/best -> base_dir/tokenizer)."""
  return os.path.join(os.path.dirname(os.path.dirname(best)), "tokenizer")


def measure(settings: Settings, path: str, seeds: Sequence[int], progress=say) -> dict[str, Any]:
  """Accuracy per seed, family and k (with the mean over families), the k_pre - k=1 gap per seed, and the
  expert use per family at k_pre (specialisation.summary) on seed 0's items."""
  from phds_jax.data import pipeline, synthetic  # pylint: disable=g-import-not-at-top
  from phds_jax.io.load import load  # pylint: disable=g-import-not-at-top

  cfg, params = load(path)
  tokenizer = pipeline.load_tokenizer(tokenizer_dir(path))
  ks = list(range(1, cfg.k_pre + 1))
  accuracy, items_per_seed = {}, 0
  for seed in seeds:
    by_family = {family: [synthetic.as_multiple_choice(it) for it in items]
                 for family, items in evaluation_items(settings, seed).items()}
    items_per_seed = sum(len(items) for items in by_family.values())
    accuracy[str(seed)] = {}
    for k in ks:
      row = {family: task["acc"] for family, task in score_tasks(cfg, params, tokenizer, by_family, k).items()}
      row["mean"] = sum(row.values()) / len(by_family)
      accuracy[str(seed)][str(k)] = row
    progress(f"seed {seed}: mean accuracy " + " ".join(f"k{k}={accuracy[str(seed)][str(k)]['mean']:.3f}"
                                                       for k in ks) + f" ({items_per_seed} items)")
  use = specialisation.expert_use(cfg, params, tokenizer, evaluation_items(settings, seeds[0]), cfg.k_pre)
  gaps = {seed: rows[str(cfg.k_pre)]["mean"] - rows["1"]["mean"] for seed, rows in accuracy.items()}
  return {"k_pre": cfg.k_pre, "ks": ks, "chance": 0.1, "accuracy": accuracy, "gap_k_pre_minus_k1": gaps,
          "items_per_seed": items_per_seed,
          "specialisation": specialisation.summary(use), "recipe": settings.synthetic_base}


def markdown(report: dict[str, Any]) -> str:
  """The base's report: accuracy per family and k (mean over seeds), the gap per seed, specialisation."""
  seeds = sorted(report["accuracy"])
  families = [f for f in report["accuracy"][seeds[0]]["1"] if f != "mean"]
  mean = lambda k, f: sum(report["accuracy"][s][str(k)][f] for s in seeds) / len(seeds)
  lines = ["# The synthetic base", "", f"Recipe: `{json.dumps(report['recipe'])}`; {report['items_per_seed']} "
           f"evaluation items per seed, seeds {', '.join(seeds)}; chance {report['chance']:.2f}.", "",
           "| k | " + " | ".join(families) + " | mean |", "|---" * (len(families) + 2) + "|"]
  for k in report["ks"]:
    mark = " (k_pre)" if k == report["k_pre"] else ""
    lines.append(f"| {k}{mark} | " + " | ".join(f"{mean(k, f):.3f}" for f in families) + f" | {mean(k, 'mean'):.3f} |")
  gaps = ", ".join(f"seed {s}: {g:+.3f}" for s, g in sorted(report["gap_k_pre_minus_k1"].items()))
  spec = report["specialisation"]
  lines += ["", f"Accuracy at k_pre minus at k = 1, per seed: {gaps}.", "",
            "Expert use at k_pre per MoE layer (entropy / log E: 1 = every expert alike; mutual information of "
            "family and expert / log E: 0 = the family tells nothing about the expert):", "",
            "| layer | " + " | ".join(f"entropy {f}" for f in families) + " | entropy pooled | mutual information |",
            "|---" * (len(families) + 3) + "|"]
  for layer, pooled in enumerate(spec["entropy_pooled"]):
    lines.append(f"| {layer} | " + " | ".join(f"{spec['entropy'][f][layer]:.3f}" for f in families)
                 + f" | {pooled:.3f} | {spec['mutual_information'][layer]:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv=None, settings: Settings = DEFAULT):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seeds", default="0,1,2", help="evaluation splits to measure the base on")
  parser.add_argument("--cache", default="", help="'' = $PHDS_CACHE or ~/.cache/phds_jax")
  parser.add_argument("--report", default=os.path.join(ROOT, "experiments", "BASE.md"),
                      help="markdown report (a .json with the numbers is written next to it)")
  args = parser.parse_args(argv)
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  from phds_jax.io import files  # pylint: disable=g-import-not-at-top

  start = time.time()
  path = build(settings, args.cache or files.cache_dir())
  report = measure(settings, path, seeds)
  report["seconds"] = round(time.time() - start, 1)
  write_json(os.path.splitext(args.report)[0] + ".json", report)
  with open(args.report, "w", encoding="utf-8") as f:
    f.write(markdown(report))
  say(f"wrote {args.report} ({report['seconds']:.0f} s)")
  return report


if __name__ == "__main__":
  main()
