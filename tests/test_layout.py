"""The package layout is the architecture: imports point down the layers, no study imports
another, modules and functions stay small, and no hidden global state (pyplot, backends)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "valuedist"
# Lower layers first; a module may import its own layer and those before it. `data` is a leaf
# (it imports only itself) that every layer may read.
LAYERS = ("data", "model", "parallel", "interp", "checkpoints", "values", "eval", "studies")
SHARED_STUDY_MODULES = ("engine", "runner", "report", "tables")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules():
  return sorted(p for p in ROOT.rglob("*.py"))


def _name(path: Path) -> tuple[str, ...]:
  parts = ("valuedist",) + path.relative_to(ROOT).with_suffix("").parts
  return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path) -> set[tuple[str, ...]]:
  """Every valuedist module a file imports, at any depth (function-level imports included)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {tuple(a.name.split(".")) for a in node.names if a.name.startswith("valuedist")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("valuedist"):
      base = tuple(node.module.split("."))
      if len(base) > 1:
        out.add(base)
      out |= {base + (a.name,) for a in node.names}       # `from valuedist.x import y`: y may be a module
  return out


def _layer(name: tuple[str, ...]):
  return LAYERS.index(name[1]) if len(name) > 1 and name[1] in LAYERS else None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path):
  me = _name(path)
  mine = _layer(me)
  for imp in _imports(path):
    theirs = _layer(imp)
    if mine is None or theirs is None:
      assert len(me) <= 1, f"{'.'.join(me)} lives outside the layers {LAYERS}"
      continue
    assert theirs <= mine, f"{'.'.join(me)} ({LAYERS[mine]}) imports {'.'.join(imp)} ({LAYERS[theirs]}), a higher layer"
    if LAYERS[mine] == "data":
      assert LAYERS[theirs] == "data", f"{'.'.join(me)}: data is a leaf, it imports {'.'.join(imp)}"


@pytest.mark.parametrize("path", [p for p in _modules() if _name(p)[1:2] == ("studies",)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_study_imports_another_study(path):
  me = _name(path)
  study = me[2] if len(me) > 2 and me[2] not in SHARED_STUDY_MODULES else None
  for imp in _imports(path):
    if imp[:2] == ("valuedist", "studies") and len(imp) > 2 and imp[2] not in SHARED_STUDY_MODULES:
      assert imp[2] == study, f"{'.'.join(me)} imports another study, {'.'.join(imp)}: share it via engine/runner/report or values/eval"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_stay_small(path):
  src = path.read_text()
  assert src.count("\n") <= MAX_MODULE_LINES, f"{path.name} has {src.count(chr(10))} lines; split it by concept"
  for node in ast.walk(ast.parse(src)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      n = node.end_lineno - node.lineno + 1
      assert n <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} has {n} lines; split it"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hidden_plotting_state(path):
  """Figures come from studies.report (matplotlib's object API): no pyplot, no backend switch."""
  for node in ast.walk(ast.parse(path.read_text())):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    assert not any(n.startswith("matplotlib.pyplot") for n in names), f"{path.name} imports pyplot"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "use":
      assert getattr(node.func.value, "id", None) != "matplotlib", f"{path.name} switches the matplotlib backend"
