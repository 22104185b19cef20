"""Claims (b) and (d): PHDS (multi-k over the whole grid, soft mask eps 1e-6, every parameter trained)
with and without curriculum anchoring on the lowest k; selected by validation loss at k_pre (paper).

  python -m experiments.phds                         # tiny scale: phds, phds_no_anchor, seeds 0,1,2
  python -m experiments.phds --scale=qwen --dry-run --config.model_path=/models/Qwen1.5-MoE-A2.7B

Writes OUT/seed<s>/{phds,phds_no_anchor}/ and their study_eval.json; the base is evaluated too.
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.phds")

import sys

from experiments import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["phds"], sys.argv[1:])
