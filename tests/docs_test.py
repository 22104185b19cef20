"""The docs: the config reference is the code's, every relative link resolves, the README stays short."""

import glob
import os
import re

from conftest import ROOT
from phds_jax.cli import config_docs

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"```.*?```", re.S)


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
  text = _CODE.sub("", open(path, encoding="utf-8").read())
  return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def _pages():
  return [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "experiments", "README.md"),
          *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def test_the_config_reference_is_generated_from_the_code():
  with open(os.path.join(ROOT, "docs", "configs.md"), encoding="utf-8") as f:
    assert f.read() == config_docs.render(), "regenerate: python -m phds_jax.cli.config_docs > docs/configs.md"
  rows = [line for line in config_docs.render().splitlines() if line.startswith("| `")]
  assert len(rows) > 100 and all(not line.endswith("|  |") for line in rows)  # every field has a meaning
  for field in ("eval.roe", "builtin.mixture", "pretrain.lr", "model.overrides.<name>"):
    assert any(line.startswith(f"| `{field}`") for line in rows), field


def test_every_relative_link_resolves():
  broken = []
  for page in _pages():
    text = _CODE.sub("", open(page, encoding="utf-8").read())
    for target in _LINK.findall(text):
      if target.startswith(("http://", "https://", "mailto:")):
        continue
      path, _, anchor = target.partition("#")
      resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
      if not os.path.exists(resolved):
        broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
      elif anchor and (not resolved.endswith(".md") or anchor not in _anchors(resolved)):
        broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
  assert not broken, broken
  assert _slug("Pod scale: plans, a launcher, several processes") == "pod-scale-plans-a-launcher-several-processes"


def test_the_readme_is_short_and_links_every_doc():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert len(readme.splitlines()) <= 250
  for page in glob.glob(os.path.join(ROOT, "docs", "*.md")):
    assert f"(docs/{os.path.basename(page)})" in readme, page


def test_every_source_file_the_docs_name_exists():
  named = set()
  for page in _pages():
    named |= set(re.findall(r"\b((?:phds_jax|configs|experiments|benchmarks|tests)/[\w/]+\.py)\b",
                            open(page, encoding="utf-8").read()))
  assert named and not [p for p in sorted(named) if not os.path.exists(os.path.join(ROOT, p))]
