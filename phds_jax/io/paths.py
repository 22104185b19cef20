"""Where a run's files go."""

from __future__ import annotations

import os


def write_resolved(config, workdir: str):
  """Writes `workdir/config.json`, the resolved config of this run (process 0 only)."""
  import jax  # pylint: disable=g-import-not-at-top  (config files import this module)

  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))
