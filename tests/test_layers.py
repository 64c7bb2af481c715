"""The package's shape: layers as folders, imports one way, no circles, TensorFlow in one place.

Read from the source with `ast` (every import, those inside functions
included), so a lazy import cannot hide a circle or an import that goes up.
"""
import ast
import os

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "t2t_avg")
# Lower ranks are imported by higher ones, never the other way round.
RANKS = {"errors": 0, "files": 1, "options": 2, "record": 2, "formats": 3,
         "metrics": 4, "inputs": 5, "engine": 6, "jobs": 7, "cli": 8,
         "__init__": 9, "__main__": 9, "compare": 9, "keras": 9}


def _modules():
  """{dotted module name: path} of every module of the package."""
  found = {}
  for directory, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        found[".".join(parts)] = path
  return found


MODULES = _modules()


def _imports(path):
  """(imported t2t_avg module, line, at module level) for every import."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  top = set(map(id, tree.body))
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from t2t_avg.x import y`: the module y, else the module t2t_avg.x.
      names = [f"{node.module}.{a.name}" for a in node.names]
    for imported in names:
      name = imported
      while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
      if name == "t2t_avg":
        continue  # The package's face (its version, its lazy names).
      if name in MODULES or name.split(".")[0] == "tensorflow":
        yield name, node.lineno, id(node) in top


def _layer(module):
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def test_the_package_face_imports_only_the_errors_eagerly():
  assert {n for n, _, top in _imports(MODULES["t2t_avg"]) if top} == {
      "t2t_avg.errors"}


def test_every_module_sits_in_a_known_layer_and_few_stay_flat():
  assert {_layer(m) for m in MODULES} <= set(RANKS)
  flat = [m for m in MODULES if m.count(".") == 1 and not os.path.basename(
      MODULES[m]) == "__init__.py"]
  assert len(flat) <= 10, flat


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
  upward = [(name, line) for name, line, _ in _imports(MODULES[module])
            if name in MODULES and _layer(name) != _layer(module)
            and RANKS[_layer(name)] > RANKS[_layer(module)]]
  assert not upward, f"{module} imports a higher layer: {upward}"


def test_no_import_circles_lazy_imports_included():
  graph = {m: {n for n, _, _ in _imports(p) if n in MODULES and n != m
               and not MODULES[n].endswith("__init__.py")}
           for m, p in MODULES.items()}
  state, circles = {}, []

  def visit(node, trail):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        circles.append(trail[trail.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, trail + [nxt])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not circles, circles


def test_only_the_tf_loader_imports_tensorflow_at_module_level():
  importers = sorted({m for m, p in MODULES.items()
                      for name, _, top in _imports(p)
                      if name.split(".")[0] == "tensorflow" and top})
  assert importers in ([], ["t2t_avg.files.tf_loader"]), importers


def test_only_the_command_lines_define_flags():
  users = sorted(m for m, p in MODULES.items()
                 if "absl import flags" in open(p, encoding="utf-8").read())
  assert users == ["t2t_avg.cli.average", "t2t_avg.cli.compare"], users
