"""Every notebook in colabs/ runs top to bottom (code cells only; shell/magic lines are skipped)."""

import glob
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "colabs", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, capsys):
  cells = json.load(open(path))["cells"]
  namespace = {"__name__": "__main__"}
  for n, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
    source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    exec(compile(source, f"{os.path.basename(path)}[cell {n}]", "exec"), namespace)  # pylint: disable=exec-used
  assert capsys.readouterr().out  # the notebook printed its results


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_opens_in_colab_and_installs_itself(path):
  """An "Open in Colab" badge for this very file, then one cell that sets REPO_URL and SMALL and installs."""
  cells = json.load(open(path))["cells"]
  assert cells[0]["cell_type"] == "markdown"
  assert f"colab.research.google.com/github/phds-jax/phds_jax/blob/main/colabs/{os.path.basename(path)}" in \
      "".join(cells[0]["source"])
  install = "".join(cells[1]["source"])
  assert cells[1]["cell_type"] == "code" and "REPO_URL = " in install and "SMALL = True" in install
  assert "pip" in install and "find_spec(\"phds_jax\")" in install
