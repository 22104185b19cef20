"""docs/configs.md, generated: every config field with its default and the comment it has in the source
(phds_jax/cli/configs.py; the built-in run's `builtin` and `pretrain` blocks from configs/tiny.py).

  python -m phds_jax.cli.config_docs > docs/configs.md     # tests/docs_test.py fails when the file drifts
"""

from __future__ import annotations

import os
import re

from phds_jax.cli import configs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ASSIGN = re.compile(r"^\s*(?:c|config)\.([\w.]+)\s*=\s*(.*?)\s*(?:#\s?(.*))?$")
_MORE = re.compile(r"^\s*#\s{2,}(.*)$")  # a comment continued on the next line, indented under the first
_ABOVE = re.compile(r"^\s*#\s?(.*)$")  # a block's comment on the line above it


def field_comments(source: str) -> dict[str, str]:
  """dotted field -> its comment in a config file's source (continuation lines joined; a block assigned
  from a dict, e.g. `c.mesh = ConfigDict(dict(...))`, gets the comment on the line above it)."""
  out: dict[str, str] = {}
  lines = source.splitlines()
  for i, line in enumerate(lines):
    match = _ASSIGN.match(line)
    if not match or out.get(match.group(1)):  # the first commented assignment of a field describes it
      continue
    field, comment = match.group(1), (match.group(3) or "").strip()
    j = i + 1
    while j < len(lines) and _MORE.match(lines[j]) and not _ASSIGN.match(lines[j]):
      comment += " " + _MORE.match(lines[j]).group(1).strip()
      j += 1
    if not comment and i > 0 and _ABOVE.match(lines[i - 1]) and not _ASSIGN.match(lines[i - 1]):
      comment = _ABOVE.match(lines[i - 1]).group(1).strip()
    out[field] = comment
  return out


def _rows(config, comments: dict[str, str], prefix: str = ""):
  """(field, default, comment) of every leaf, depth first; a dict-made block's leaves take its comment."""
  for key, value in config.items():
    field = prefix + key
    if field == "model.overrides":
      yield (f"{field}.<name>", "None", comments[field] + "; every ModelConfig field (phds_jax/model/config.py), "
             "e.g. --config.model.overrides.num_hidden_layers=2")
      continue
    if hasattr(value, "items"):
      yield from _rows(value, comments, field + ".")
      continue
    parent = field.rsplit(".", 1)[0] if "." in field else ""
    yield field, repr(value), comments.get(field) or comments.get(parent, "")


def _read(relative: str) -> str:
  with open(os.path.join(ROOT, relative), encoding="utf-8") as f:
    return f.read()


def render() -> str:
  """The whole of docs/configs.md."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top

  base = configs.base_config()
  comments = field_comments(inspect.getsource(configs.base_config))
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
  tiny_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny_module)
  tiny = tiny_module.get_config()
  tiny_comments = field_comments(_read("configs/tiny.py"))
  out = ["# Config reference", "",
         "Generated from `phds_jax/cli/configs.py` (every mode's fields) and `configs/tiny.py` (the built-in",
         "run's blocks) by `python -m phds_jax.cli.config_docs > docs/configs.md`; `tests/docs_test.py` fails",
         "when this file and the code differ. Set any field on the command line with",
         "`--config.<field>=<value>`; a config file's `arg` takes `key=value;key2=value2`",
         "(e.g. `--config=configs/olmoe.py:k_values=2,4,8;steps=500`). \"(paper)\" marks a default from",
         "MoE-PHDS (arXiv 2509.23012), \"(our choice)\" one of ours: the paper's hyperparameters are not public.",
         "The defaults below are the base config's; each `configs/*.py` file changes some of them.", ""]
  blocks: dict[str, list[tuple[str, str, str]]] = {}
  for field, default, comment in _rows(base, comments):
    blocks.setdefault(field.split(".")[0] if "." in field else "(top level)", []).append((field, default, comment))
  for name in ("builtin", "pretrain"):
    blocks[f"{name} (configs/tiny.py, mode=builtin)"] = list(_rows(tiny[name], tiny_comments, f"{name}."))
  for block, rows in blocks.items():
    out += [f"## {block}", "", "| field | default | meaning |", "|---|---|---|"]
    out += [f"| `{field}` | `{default}` | {comment.replace('|', '/')} |" for field, default, comment in rows]
    out.append("")
  return "\n".join(out)


if __name__ == "__main__":
  print(render(), end="")
