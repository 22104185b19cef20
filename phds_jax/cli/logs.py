"""What the command lines print: our progress always, library logs (absl, orbax, transformers, gcsfs) only
when verbose."""

import logging
import os

from absl import logging as absl_logging


def set_log_levels(verbose: bool):
  """Library INFO logs only when verbose; our own progress goes to stdout either way."""
  if verbose:
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("phds_jax").setLevel(logging.INFO)
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("phds_jax").setLevel(logging.WARNING)
  logging.getLogger("gcsfs").setLevel(logging.ERROR)  # e.g. "could not determine bucket type" on every call
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # also silences "PyTorch was not found"
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
