"""The shape of the package (ARCHITECTURE.md), checked from its source: no import cycles, short
functions, a small training module, and rooms that import only downwards."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cnnlab"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The cnnlab modules a file imports, anywhere in it (TYPE_CHECKING blocks and functions too)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cnnlab")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("cnnlab"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}  # `from cnnlab import train`
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.parts}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_there_is_no_import_cycle() -> None:
    # a package's __init__ importing its own submodules is how registries fill; a submodule importing
    # its package (`from cnnlab.data import x`) reaches the submodule, not back into __init__
    graph = {n: {m for m in deps if not (n.startswith(m + ".") and MODULES[m].name == "__init__.py")}
             for n, deps in GRAPH.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long


def test_the_training_module_stays_small() -> None:
    assert len((PACKAGE / "fit.py").read_text().splitlines()) <= 400


@pytest.mark.parametrize("room", ["cnnlab.inference", "cnnlab.evaluate", "cnnlab.predict", "cnnlab.doctor",
                                  "cnnlab.engine", "cnnlab.build", "cnnlab.viz"])
def test_inference_and_the_engine_do_not_import_training(room: str) -> None:
    assert "cnnlab.fit" not in GRAPH[room]


def test_the_engine_imports_none_of_its_users() -> None:
    assert not GRAPH["cnnlab.engine"] & {"cnnlab.doctor", "cnnlab.inference", "cnnlab.fit", "cnnlab.build"}


# Rooms below build.py get built values: none of them may import the run config, build or train.
LOWER_ROOMS = [name for name in MODULES if (name.split(".") + [""])[1] in
               ("engine", "record", "doctor", "trackers", "data", "checkpoint", "losses", "optim", "distributed",
                "interrupt", "viz", "report", "checks", "usercode", "notebook", "memory", "search")
               and name != "cnnlab.report.__main__"]


@pytest.mark.parametrize("room", LOWER_ROOMS)
def test_lower_rooms_get_built_values_not_the_run_config(room: str) -> None:
    assert not GRAPH[room] & {"cnnlab.config", "cnnlab.build", "cnnlab.fit", "cnnlab.job", "cnnlab.api",
                              "cnnlab.__main__"}


def test_only_the_run_record_writes_summary_json() -> None:
    writers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") for line in p.read_text().splitlines()
               if re.search(r"[\"']summary\.json[\"']", line) and re.search(r"write|open\(", line)}
    assert writers == {"record.py"}, writers
