"""The house rules, checked on the source: imports run one way, nothing imports in a
circle, and private torch APIs stay in ``lowering/_torch.py``.

Layers of ``lowering`` (an arrow is "may import"):
cli -> printer | search -> debug | bench -> run -> parallel -> plan -> schedule -> _torch.
``shardlang`` never imports ``torch.distributed`` or ``lowering``; ``models`` never
imports ``lowering``. Every import counts, at module level, inside functions and under
``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shardlang", "lowering", "models")
#: lowering's subpackages (and top-level modules), lowest first
FLOORS = {"_torch": 0, "schedule": 1, "plan": 2, "parallel": 3, "run": 4, "debug": 5,
          "bench": 5, "search": 6, "printer": 6, "cli": 7, "__main__": 8, "": 8}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = f
    return out


def _imports(f: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in the file."""
    tree = ast.parse(f.read_text())
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, child.lineno, in_function))
                found.extend((f"{child.module}.{a.name}", child.lineno, in_function)
                             for a in child.names)
            visit(child, inner)
    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        deps = set()
        for target, _, _ in _imports(f):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    return graph


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "lowering":
        return None
    return FLOORS[parts[1] if len(parts) > 1 else ""]


def test_no_import_circles() -> None:
    graph, cycles = _graph(), []
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [n, d]))
            elif d not in state:
                visit(d, stack + [n])
        state[n] = 2
    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_lowering_imports_point_down() -> None:
    upward = []
    for name, deps in _graph().items():
        mine = _floor(name)
        if mine is None:
            continue
        for d in deps:
            theirs = _floor(d)
            same = d.split(".")[:2] == name.split(".")[:2]
            if theirs is not None and not same and theirs >= mine and name != "lowering":
                upward.append(f"{name} imports {d}")
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_pure_packages_stay_pure() -> None:
    bad = []
    for name, f in _modules().items():
        for target, line, _ in _imports(f):
            if name.startswith("shardlang") and target.startswith(("torch.distributed", "lowering")):
                bad.append(f"{f.name}:{line} imports {target}")
            if name.startswith("models") and target.startswith("lowering"):
                bad.append(f"{f.name}:{line} imports {target}")
    assert not bad, bad


#: the one allowed function-level import: ``models.hf`` imports ``transformers``, an
#: optional extra (``.[hf]``); importing it at module level would make every command
#: need transformers
OPTIONAL = {("lowering/run/registry.py", "models.hf")}


def test_no_project_imports_inside_functions() -> None:
    inside = [f"{f.relative_to(ROOT)}:{line} imports {target}"
              for name, f in _modules().items()
              for target, line, in_function in _imports(f)
              if in_function and target.split(".")[0] in PACKAGES
              and (f.relative_to(ROOT).as_posix(), target) not in OPTIONAL]
    assert not inside, "imports inside functions:\n" + "\n".join(inside)


PRIVATE = re.compile(r"torch\.(distributed\.)?[a-z_.]*\._[a-z]|from torch\.[a-z_.]*\._[a-z]"
                     r"|\._active_module_cnt|\._local_tensors|\._opname")


def test_private_torch_apis_only_in_underscore_torch() -> None:
    hits = []
    for name, f in _modules().items():
        if f == ROOT / "lowering" / "_torch.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "private torch APIs outside lowering/_torch.py:\n" + "\n".join(hits)


def test_the_checks_would_catch_a_violation(tmp_path: Path) -> None:
    """The walkers see what they must: an upward import, a function-level import."""
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from lowering.cli import main\n    return main\n")
    assert ("lowering.cli", 4, True) in _imports(f)
    assert _floor("lowering.plan.lower") < _floor("lowering.run.train")  # type: ignore[operator]
