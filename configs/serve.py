"""Serve one checkpoint at every k: an OpenAI-compatible HTTP server where k is a per-request field.

  python -m phds_jax.main --config=configs/serve.py --config.model_path=/ckpt/phds/hf_export
  phds-serve /ckpt/phds/hf_export --port=8000          # the same, flags mirror the serve block

Without model_path it serves the built-in default's PHDS export (workdir/tiny/phds/hf_export, left by
`python -m phds_jax.main --config=configs/tiny.py` run from the same directory). The model is sharded over
the local devices by `mesh`. Routes, request fields and limits: docs/serving.md; fields: the serve block of
phds_jax/cli/configs.py.
"""

from phds_jax.cli.configs import serve_config


def get_config(arg=None):
  return serve_config(arg)
