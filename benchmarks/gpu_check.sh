#!/usr/bin/env bash
# One NVIDIA GPU, one command: the accelerator-marked parity tests, the MoE benchmark (every expert backend
# on the GPU; its default justified or not by the table) and a short training run, into one JSON.
#
#   pip install -e ".[cuda,test]" && bash benchmarks/gpu_check.sh [OUT.json]
#
# Writes OUT.json (default benchmarks/gpu_check.json): {"tests": {passed, failed, exit}, "moe_bench": ...,
# "train": {tokens_per_s, mfu, peak_memory_gib, ...}}. Exit status: the tests'.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/gpu_check.json}"
tmp="$(mktemp -d)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 2; }
python3 -m pytest -q -m accelerator tests/gpu_test.py --junitxml="$tmp/tests.xml"
tests_exit=$?
python3 benchmarks/moe_bench.py --out "$tmp/moe.json" --threads 8
python3 benchmarks/gpu_train_check.py --out "$tmp/train.json"
python3 - "$tmp" "$out" "$tests_exit" <<'PY'
import json, sys, xml.etree.ElementTree as ET
tmp, out, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
suite = ET.parse(f"{tmp}/tests.xml").getroot().find("testsuite")
tests = {"passed": int(suite.get("tests")) - int(suite.get("failures")) - int(suite.get("errors")) - int(suite.get("skipped")),
         "failed": int(suite.get("failures")) + int(suite.get("errors")), "exit": code}
result = {"tests": tests}
for name in ("moe", "train"):
  try:
    result[name] = json.load(open(f"{tmp}/{name}.json"))
  except FileNotFoundError:
    result[name] = None
json.dump(result, open(out, "w"), indent=2)
print(f"wrote {out}: tests {tests}")
PY
exit $tests_exit
