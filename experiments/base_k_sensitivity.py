"""Does the built-in base behave like a pretrained MoE? Its held-out LM loss at every k as pre-training
goes on (issue 13, item 2: the study needs a base whose loss rises as k drops below k_pre).

  python -m experiments.base_k_sensitivity --steps=480 --text_docs=4000 --out=/tmp/base_k
  python -m experiments.base_k_sensitivity --num_experts=16 --k_pre=4 --k_values=1,2,3,4,8,16 \
      --out=/tmp/base_k16

Pre-trains configs/tiny.py's base (4 layers, 8 experts, k_pre = 2; LM on the wheel's English text, as the
built-in job does; --num_experts / --k_pre change its experts) for --steps steps and evaluates the
held-out split (2.5% of the documents) at --k_values every --every steps. Prints the table and writes
OUT/base_k.json. 480 steps took 23 minutes on 2 shared CPU cores.
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.base_k_sensitivity")

import argparse
import json
import os
import time

from experiments.runs import load_config_file
from phds_jax.train import builtin
from phds_jax import platforms
from phds_jax.train import loop as train


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=480, help="pre-training steps")
  parser.add_argument("--text_docs", type=int, default=4000, help="documents in the text corpus")
  parser.add_argument("--every", type=int, default=120, help="evaluate every N steps")
  parser.add_argument("--num_experts", type=int, default=8, help="routed experts per MoE layer")
  parser.add_argument("--k_pre", type=int, default=2, help="the top-k the base is pre-trained at")
  parser.add_argument("--k_values", default="1,2,4,8", help="k grid of the held-out evaluation")
  parser.add_argument("--out", required=True, help="output directory (resumes a run left there)")
  args = parser.parse_args()
  platforms.use_cpu_without_accelerator()
  config = load_config_file("configs/tiny.py")
  config.builtin.text_docs, config.pretrain.steps = args.text_docs, args.steps
  config.model.overrides.num_experts, config.model.overrides.num_experts_per_tok = args.num_experts, args.k_pre
  run = builtin.pretrain_config(config, builtin.prepare_data(config))
  run.eval.k_values, run.eval.every, run.eval.at_start = args.k_values, args.every, True
  run.checkpoint.every, run.data.val_fraction = args.every, 0.025  # ~300 held-out rows: short evaluations
  start = time.time()
  summary = train.train_and_evaluate(run, args.out)
  ks, k_pre = summary["eval_k"], summary["select_k"]
  print(f"\nheld-out LM loss by k (k_pre = {k_pre}), {args.text_docs} documents")
  print(f"{'step':>6} " + " ".join(f"{f'k={k}':>8}" for k in ks) + f" {f'k={ks[0]} - k_pre':>12}")
  for row in summary["history"]:
    cells = " ".join(f"{row[f'val_loss_k{k}']:>8.4f}" for k in ks)
    print(f"{row['step']:>6} {cells} {row[f'val_loss_k{ks[0]}'] - row[f'val_loss_k{k_pre}']:>12.4f}")
  with open(os.path.join(args.out, "base_k.json"), "w", encoding="utf-8") as f:
    json.dump({"args": vars(args), "seconds": round(time.time() - start), "history": summary["history"]}, f,
              indent=2)


if __name__ == "__main__":
  main()
