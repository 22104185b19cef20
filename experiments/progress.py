"""Progress lines and whole-file JSON writes, shared by the study's steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, TextIO


def say(message: str, stream: TextIO | None = None):
  """One progress line, timestamped (a worker process writes them on stderr: its stdout is its log)."""
  print(f"[study {time.strftime('%H:%M:%S')}] {message}", file=stream or sys.stdout, flush=True)


def write_json(path: str, value: Any):
  """Writes `value` whole (a temporary file, then a rename), making the directory if needed."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def commit() -> str:
  """The repository's current commit (short), or "unknown" outside a git checkout."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
