#!/usr/bin/env bash
# The whole study; arguments go to python -m experiments.run_all (e.g. --scale=tiny, --dry-run, --seeds=0,1,2).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m experiments.run_all "$@"
