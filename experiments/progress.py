"""Progress lines and whole-file JSON writes, shared by the study's steps."""

from __future__ import annotations

import json
import os
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
