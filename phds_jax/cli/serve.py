"""`phds-serve [MODEL] [--port=8000 ...]`: the serve mode without a config file. One flag per field of the
config's serve block (phds_jax/cli/configs.py), plus the model, tokenizer, dtype and expert backend; the same
checks and messages as `python -m phds_jax.main --config=configs/serve.py`."""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
  from phds_jax.cli.configs import serve_fields  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="phds-serve", description="OpenAI-compatible server; k is a per-request field "
                              "(docs/serving.md).")
  p.add_argument("model", nargs="?", default=None, help="HF directory, phds_jax checkpoint, gs:// path or model id "
                 "(default: the built-in default's export, workdir/tiny/phds/hf_export)")
  p.add_argument("--tokenizer", default="", help="tokenizer directory (default: the model's)")
  p.add_argument("--dtype", default="float32", help="parameter dtype: float32 | bfloat16 | float16")
  p.add_argument("--expert-backend", default="auto", help="auto | chunked | sorted | ragged | reference")
  p.add_argument("--verbose", action="store_true", help="library logs and tracebacks")
  for name, value in serve_fields().items():
    kind = type(value)
    p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value, metavar=kind.__name__.upper(),
                   help=f"serve.{name} (default {value!r})")
  return p


def main(argv=None) -> None:
  from phds_jax.platforms import use_cpu_without_accelerator  # pylint: disable=g-import-not-at-top

  use_cpu_without_accelerator()
  args = parser().parse_args(argv)
  from phds_jax.cli import modes  # pylint: disable=g-import-not-at-top
  from phds_jax.cli.configs import serve_config, serve_fields  # pylint: disable=g-import-not-at-top
  from phds_jax.cli.logs import set_log_levels  # pylint: disable=g-import-not-at-top
  from phds_jax.errors import ConfigProblems, PhdsError  # pylint: disable=g-import-not-at-top

  config = serve_config()
  if args.model is not None:
    config.model_path = args.model
  config.tokenizer_path, config.model.param_dtype = args.tokenizer, args.dtype
  config.model.expert_backend, config.verbose = args.expert_backend, args.verbose
  for name in serve_fields():
    config.serve[name] = getattr(args, name)
  set_log_levels(args.verbose)
  try:
    modes.run(config, source="phds-serve")
  except ConfigProblems as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (PhdsError, ValueError, FileNotFoundError) as e:
    if args.verbose:
      raise
    print(f"error: {e}\n(run again with --verbose for the traceback)", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
