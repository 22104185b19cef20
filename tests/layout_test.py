"""The package's layout rules: imports go one way between its parts, and every numeric config field has a
checked range."""

import ast
import os

import pytest

from conftest import ROOT, load_config

# package -> the parts of phds_jax it may import (besides itself and the leaf modules errors / platforms)
ALLOWED = {
    "model": set(),
    "data": {"io.files"},
    "io": {"model"},
    "eval": {"model", "io", "data", "plan.cost"},
    "train": {"model", "io", "data", "eval"},
    "serve": {"model", "io", "data"},
    "plan": {"model", "io", "data", "eval", "train"},
    "cli": {"model", "io", "data", "eval", "train", "plan", "serve"},
}
LEAVES = {"errors", "platforms"}


def _imports(path):
  """phds_jax modules imported by one file (module level and inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phds_jax"):
      out |= {f"{node.module}.{a.name}" for a in node.names}  # a module or a name in one: prefixes decide
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("phds_jax")}
  return out


def _allowed(part, target):
  name = target.split(".", 1)[1] if "." in target else ""
  top = name.split(".")[0]
  return (top in LEAVES or top == part or top in ALLOWED[part] or
          any(name == a or name.startswith(a + ".") for a in ALLOWED[part] if "." in a))


def test_imports_go_one_way_between_the_packages():
  parts = {d for d in os.listdir(os.path.join(ROOT, "phds_jax")) if os.path.isfile(os.path.join(ROOT, "phds_jax", d,
                                                                                                 "__init__.py"))}
  assert parts == set(ALLOWED), f"every package has its import rule: {parts ^ set(ALLOWED)}"
  bad = []
  for part in ALLOWED:
    for dirpath, _, files in os.walk(os.path.join(ROOT, "phds_jax", part)):
      for f in (f for f in files if f.endswith(".py")):
        path = os.path.join(dirpath, f)
        bad += [f"{os.path.relpath(path, ROOT)} imports {t}" for t in _imports(path) if not _allowed(part, t)]
  assert not bad, bad


def test_no_private_names_are_imported_across_modules():
  bad = []
  for dirpath, _, files in os.walk(os.path.join(ROOT, "phds_jax")):
    for f in (f for f in files if f.endswith(".py")):
      path = os.path.join(dirpath, f)
      for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phds_jax"):
          bad += [f"{os.path.relpath(path, ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
  assert not bad, bad


def _numeric_fields(config, prefix=""):
  for key, value in config.items():
    if key in ("mesh", "overrides"):  # the mesh has its own check; overrides are checked by ModelConfig
      continue
    if hasattr(value, "items"):
      yield from _numeric_fields(value, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield prefix + key


def test_every_numeric_field_has_a_checked_range():
  from phds_jax.cli import config_check

  fields = set(_numeric_fields(load_config("tiny"))) | set(_numeric_fields(load_config("olmoe")))
  assert fields - set(config_check.RANGES) == set()
  assert set(config_check.RANGES) - fields == set()  # no range for a field that does not exist


@pytest.mark.parametrize("field, value, message", [
    ("train.steps", -1, r"train.steps=-1 is outside \[1, inf\)"),
    ("optim.lr", -1.0, r"optim.lr=-1.0 is outside \[0.0, inf\)"),
    ("data.val_fraction", 1.0, r"data.val_fraction=1.0 is outside \[0.0, 1.0\)"),
    ("builtin.eval_items", 0, r"builtin.eval_items=0 is outside \[1, inf\)")])
def test_numeric_ranges_name_the_field(field, value, message):
  import re

  from phds_jax.cli import config_check
  from conftest import set_fields

  problems = config_check.range_problems(set_fields(load_config("tiny"), **{field: value}))
  assert len(problems) == 1 and re.fullmatch(message, problems[0]), problems


def _module_graph(package):
  """module -> the modules of `package` it imports (anywhere in the file), for every .py file under it."""
  graph = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
    for f in (f for f in files if f.endswith(".py")):
      path = os.path.join(dirpath, f)
      name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      targets = set()
      for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package):
          targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
          targets |= {a.name for a in node.names if a.name.startswith(package)}
      graph[name] = targets
  return {m: {t for t in targets if t in graph and t != m and t != package} for m, targets in graph.items()}


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(m, path):
    state[m] = "open"
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        return path[path.index(t):] + [t]
      if t not in state:
        found = visit(t, path + [t])
        if found:
          return found
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m, [m])
      if found:
        return found
  return None


@pytest.mark.parametrize("package", ["phds_jax", "experiments"])
def test_no_import_cycles(package):
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the search finds one
  graph = _module_graph(package)
  assert "experiments.summarize" not in graph or "experiments.summarize_roe" in graph["experiments.summarize"]
  assert _cycle(graph) is None


def test_experiments_use_no_private_names_of_other_modules():
  bad = []
  for f in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
    if f.endswith(".py"):
      tree = ast.parse(open(os.path.join(ROOT, "experiments", f), encoding="utf-8").read())
      modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
      bad += [f"{f}: {n.value.id}.{n.attr}" for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name) and n.value.id in modules and n.attr.startswith("_")]
      bad += [f"{f}: {a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              and (n.module or "").startswith(("experiments", "phds_jax")) for a in n.names if a.name.startswith("_")]
  assert not bad, bad
