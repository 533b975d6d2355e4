"""The package's rooms lean one way and no import circle exists between them.

Every `import` of the package is read from the source (those inside functions
too: they hide a circle from Python, not from a reader). A room is a top-level
subpackage or module of `nfnets_jax`.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parents[1] / "nfnets_jax"
#: What each lower room may import; every room may import itself.
LOWER_ROOMS = {"models": {"optim"}, "optim": set(), "data": set()}


def _room(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path) -> set[str]:
  """The nfnets_jax modules `path` imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names if alias.name.startswith("nfnets_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.startswith("nfnets_jax"):
        found |= {f"{node.module}.{alias.name}" for alias in node.names}
  return found


def room_graph() -> dict[str, set[str]]:
  graph: dict[str, set[str]] = {}
  for path in PACKAGE.rglob("*.py"):
    module = ".".join(("nfnets_jax",) + path.relative_to(PACKAGE).with_suffix("").parts)
    room = _room(module)
    targets = {_room(m) for m in _imports(path)} - {room, ""}
    graph.setdefault(room, set()).update(targets)
  return graph


def test_lower_rooms_import_nothing_above_them():
  graph = room_graph()
  assert set(LOWER_ROOMS) <= set(graph)
  for room, allowed in LOWER_ROOMS.items():
    assert graph[room] <= allowed, f"{room}/ imports {sorted(graph[room] - allowed)}"


def test_no_import_circle_between_rooms():
  graph = room_graph()
  visiting, done = [], set()

  def visit(room):
    if room in visiting:
      raise AssertionError("import circle: " + " -> ".join(visiting[visiting.index(room):]
                                                           + [room]))
    if room in done:
      return
    visiting.append(room)
    for target in sorted(graph.get(room, ())):
      visit(target)
    visiting.pop()
    done.add(room)

  for room in sorted(graph):
    visit(room)
  assert {"weights", "cli", "export", "train"} <= set(graph)  # the walk saw the whole house
