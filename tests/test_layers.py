"""The house plan holds: imports point down the layers and form no circle.

Floors (a module may import its own floor's room or a lower floor):
    1  rlhf.core, rlhf.demo
    2  sft, reward, rlhf.ppo, rlhf.methods, rlhf.deploy        (stages never import each other)
    3  rlhf.eval, rlhf.label
    4  rlhf.app
    5  scripts/, bench/, experiments/ (faces; nothing imports them)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = {
    "rlhf.core": 1, "rlhf.demo": 1,
    "sft": 2, "reward": 2, "rlhf.ppo": 2, "rlhf.methods": 2, "rlhf.deploy": 2,
    "rlhf.eval": 3, "rlhf.label": 3,
    "rlhf.app": 4,
}
STAGES = {"sft", "reward", "rlhf.ppo", "rlhf.methods"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str | None:
    for name in sorted(FLOORS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names, at any depth of the file (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def package_files() -> dict[str, Path]:
    files = {}
    for top in ("rlhf", "sft", "reward"):
        for path in (REPO / top).rglob("*.py"):
            files[module_name(path)] = path
    return files


def internal_graph() -> dict[str, set[str]]:
    files = package_files()
    return {name: {m for m in imports_of(path) if m in files and m != name} for name, path in files.items()}


def test_every_package_module_has_a_room():
    homeless = [m for m in package_files() if m != "rlhf" and room(m) is None]
    assert homeless == []


def test_imports_point_down_and_stages_do_not_import_each_other():
    wrong = []
    for module, targets in internal_graph().items():
        here = room(module)
        for target in targets:
            there = room(target)
            if here is None or there is None or here == there:
                continue
            if FLOORS[there] > FLOORS[here]:
                wrong.append(f"{module} (floor {FLOORS[here]}) imports {target} (floor {FLOORS[there]})")
            elif here in STAGES and there in STAGES:
                wrong.append(f"stage {module} imports stage {target}")
    assert wrong == []


def test_core_imports_only_core():
    outside = [(m, t) for m, ts in internal_graph().items() if room(m) == "rlhf.core"
               for t in ts if room(t) != "rlhf.core"]
    assert outside == []


def test_ppo_math_imports_torch_and_core_tensors_only():
    allowed = {"__future__", "typing", "torch", "rlhf.core.tensors"}
    for module in ("rlhf/ppo/math.py", "rlhf/core/tensors.py"):
        names = {m for m in imports_of(REPO / module) if "." not in m or m.startswith("rlhf.")}
        assert {m for m in names if not m.startswith("rlhf.core.tensors.")} <= allowed, module


def test_no_import_circle():
    graph = internal_graph()
    state: dict[str, int] = {}
    circle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if state.get(start) is None and visit(start, []):
            break
    assert circle == []


@pytest.mark.parametrize("folder", ["rlhf", "sft", "reward", "scripts", "bench", "experiments"])
def test_nothing_outside_tests_imports_tests(folder):
    for path in (REPO / folder).rglob("*.py"):
        text = path.read_text()
        assert "from tests" not in text and "import tests" not in text and '/ "tests"' not in text, path


def test_the_graph_check_would_catch_an_upward_import(tmp_path):
    """The checks read real import statements: an upward import in a core module shows up."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rlhf.app.cli import main\n")
    assert "rlhf.app.cli" in imports_of(bad)
    assert FLOORS[room("rlhf.app.cli")] > FLOORS[room("rlhf.core.bad")]
