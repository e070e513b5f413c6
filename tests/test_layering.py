"""The package's house rules, read from its source: layers import downward only (lazy imports
included), no private name crosses a module, no import cycle, no file over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "reste_timm"
# Lower ranks may be imported by higher ones; a subpackage may import itself.
RANKS = {"files": 0, "version": 0, "nn": 1, "models": 2, "hub": 3, "train": 4, "analysis": 4, "deployment": 4,
         "cli": 5, "__init__": 6, "__main__": 6}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        yield name.removesuffix(".__init__"), path


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path):
    """``(target module, imported names, line)`` of every import in the file, nested ones included."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("reste_timm"):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("reste_timm"):
                yield target, [a.name for a in node.names], node.lineno


MODULES = dict(_modules())


def test_every_module_is_seen():
    assert {"reste_timm.nn.estimators", "reste_timm.cli", "reste_timm.train.run"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    own = _layer(module)
    for target, _, line in _imports(module, MODULES[module]):
        other = _layer(target)
        assert other == own or RANKS[other] < RANKS[own], \
            f"{module}:{line} imports {target}: {own} (rank {RANKS[own]}) may not import {other}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_a_module(module):
    for target, names, line in _imports(module, MODULES[module]):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private or target == module, f"{module}:{line} imports {private} from {target}"


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, names, _ in _imports(m, p)} | {f"{t}.{n}" for t, names, _ in _imports(m, p)
                                                          for n in names} for m, p in MODULES.items()}
    graph = {m: {t for t in targets if t in MODULES and t != m} for m, targets in graph.items()}
    # A package's __init__ re-exporting its modules is not a cycle of the code's dependencies.
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(stack + [node, nxt])}"
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_under_500_lines(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= 500, f"{MODULES[module]} has {lines} lines"


ROOT = PACKAGE.parent
# Every other source file of the checkout: the C kernels and their parts, the tests, scripts, benchmarks.
OTHER_SOURCES = sorted({*PACKAGE.rglob("*.c"), *PACKAGE.rglob("*.h"), *(ROOT / "tests").rglob("*.py"),
                        *(ROOT / "tests").rglob("*.c"), *(ROOT / "scripts").glob("*.py"),
                        *(ROOT / "benchmarks").glob("*.py"), *(ROOT / ".ci").glob("*.py")})


@pytest.mark.parametrize("path", OTHER_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_other_source_files_stay_under_500_lines(path):
    lines = path.read_text().count("\n")
    assert lines <= 500, f"{path.relative_to(ROOT)} has {lines} lines"
