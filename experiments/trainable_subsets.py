"""Claim (e): which parameters PHDS should tune as k drops. PHDS trained on attention only, experts only,
router only (train.trainable); "all" is the reference run `phds` (experiments/phds.py).

  python -m experiments.trainable_subsets            # tiny scale, seeds 0,1,2
  python -m experiments.trainable_subsets --groups=subsets,phds   # with the reference run

Writes OUT/seed<s>/phds_train_<subset>/ and their study_eval.json.
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.trainable_subsets")

import sys

from experiments import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["subsets"], sys.argv[1:])
