"""Ablation of the soft mask: PHDS with soft_mask_eps 1e-3 and 1e-9, and with the hard mask (compute at
k_train); eps 1e-6 (the paper's value) is the reference run `phds` (experiments/phds.py).

  python experiments/soft_mask.py                    # tiny scale, seeds 0,1,2

Writes OUT/seed<s>/phds_eps_1e-3, phds_eps_1e-9, phds_hard_mask/ and their study_eval.json.
"""

import sys

import study

if __name__ == "__main__":
  study.main(__doc__.split("\n\n")[0], ["mask"], sys.argv[1:])
