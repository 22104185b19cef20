#!/usr/bin/env bash
# The whole study; arguments go to experiments/run_all.py (e.g. --scale=tiny, --dry-run, --seeds=0,1,2).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python experiments/run_all.py "$@"
