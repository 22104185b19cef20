"""Ablation of the soft mask: PHDS with soft_mask_eps 1e-3 and 1e-9, and with the hard mask (compute at
k_train); eps 1e-6 (the paper's value) is the reference run `phds` (experiments/phds.py).

  python -m experiments.soft_mask                    # tiny scale, seeds 0,1,2

Writes OUT/seed<s>/phds_eps_1e-3, phds_eps_1e-9, phds_hard_mask/ and their study_eval.json.
"""

if not __package__:  # run as a file: the package's imports need the repository root on the path
  raise SystemExit("run it from the repository root as a module: python -m experiments.soft_mask")

import sys

from experiments import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["mask"], sys.argv[1:])
