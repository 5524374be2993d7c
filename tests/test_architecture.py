"""The package layout of docs/architecture.md, checked on the source (``ast``, nothing imported).

* no package module is longer than :data:`MAX_LINES` lines;
* the pure layers (``common/``, ``core/``, ``engines/``, ``tiny/``, ``guiders/``) import neither threestudio nor
  the layers built on them (``adapters/``, ``commands/``, ``eval/``, ``sampler/``), not even inside
  a function; ``eval/`` imports neither threestudio, ``adapters/`` nor ``testbed/`` (built on it);
* the module-level imports between package modules have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

PACKAGE = "threestudio_perpneg"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 650

#: layer -> package layers (and outside packages) it must never import.
FORBIDDEN: Dict[str, Tuple[str, ...]] = {
    "common": ("threestudio", "adapters", "commands", "eval", "sampler", "core", "engines", "tiny"),
    "core": ("threestudio", "adapters", "commands", "eval", "sampler", "engines", "tiny"),
    "engines": ("threestudio", "adapters", "commands", "eval", "sampler"),
    "tiny": ("threestudio", "adapters", "commands", "eval", "sampler"),
    "guiders": ("threestudio", "adapters", "commands", "eval", "sampler", "engines", "testbed"),
    # testbed/ builds on eval/ (stats, Janus flags); the testbed's classifier reaches the
    # evaluators through eval.classifier.register_view_classifier (the package root registers it).
    "eval": ("threestudio", "adapters", "testbed"),
}


def _modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` = the package)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """Absolute name of the module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    module: str, path: Path, *, module_level: bool
) -> Iterator[Tuple[str, Optional[str], int]]:
    """(imported module, imported name or None, line) of each import in ``path``.

    With ``module_level``, only what runs when the module is imported: not inside functions or
    classes, not under ``if TYPE_CHECKING:``.
    """

    def walk(nodes: List[ast.stmt]) -> Iterator[ast.AST]:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.orelse)
                continue
            yield node
            blocks = [getattr(node, f, []) for f in ("body", "orelse", "finalbody")]
            blocks += [h.body for h in getattr(node, "handlers", [])]
            for block in blocks:
                yield from walk(block)

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in walk(tree.body) if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            for alias in node.names:
                yield target, alias.name, node.lineno


def _package_targets(target: str, name: Optional[str]) -> Set[str]:
    """The package modules one import statement loads itself (parents already being loaded)."""
    out = set()
    if target in MODULES:
        out.add(target)
    if name is not None and f"{target}.{name}" in MODULES:
        out.add(f"{target}.{name}")
    return out


def test_the_module_map_is_the_package() -> None:
    # guards the other tests against an empty or wrong walk
    assert f"{PACKAGE}.core.guidance" in MODULES and f"{PACKAGE}.common.checks" in MODULES
    assert _resolve(
        f"{PACKAGE}.eval.janus.cli",
        ROOT / "eval" / "janus" / "cli.py",
        ast.parse("from ...common.checks import check_int").body[0],  # type: ignore[arg-type]
    ) == (f"{PACKAGE}.common.checks")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_too_long(module: str) -> None:
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (at most {MAX_LINES}): split it"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_pure_layers_import_nothing_above_them(layer: str) -> None:
    bad = []
    for module, path in MODULES.items():
        if not module.startswith(f"{PACKAGE}.{layer}.") and module != f"{PACKAGE}.{layer}":
            continue
        for target, name, line in _imports(module, path, module_level=False):
            full = {target} | ({f"{target}.{name}"} if name else set())
            for forbidden in FORBIDDEN[layer]:
                prefix = forbidden if forbidden == "threestudio" else f"{PACKAGE}.{forbidden}"
                if any(t == prefix or t.startswith(prefix + ".") for t in full):
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_forbidden_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    # guards the layer rules against a walk that skips lazy imports
    path = tmp_path / "cli.py"
    path.write_text(
        "def f():\n    if True:\n        from ...testbed.classifier import REJECT\n",
        encoding="utf-8",
    )
    seen = set(_imports(f"{PACKAGE}.eval.eval2d.cli", path, module_level=False))
    assert (f"{PACKAGE}.testbed.classifier", "REJECT", 3) in seen
    assert not set(_imports(f"{PACKAGE}.eval.eval2d.cli", path, module_level=True))


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle of ``graph`` (``[a, b, ..., a]``), or None when it is acyclic."""
    state: Dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "d"}, "b": set(), "d": {"d"}}) == ["d", "d"]


def test_no_import_cycle_between_package_modules() -> None:
    graph: Dict[str, Set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, name, _ in _imports(module, path, module_level=True):
            graph[module] |= _package_targets(target, name) - {module}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    # the walk saw the imports it is meant to see
    assert f"{PACKAGE}.core.guidance" in graph[f"{PACKAGE}.sampler.pipeline"]
    assert f"{PACKAGE}.eval.janus.flags" in graph[f"{PACKAGE}.eval.janus.metrics"]
    # ... and not the lazy ones (inside functions)
    assert f"{PACKAGE}.eval.janus.plots" not in graph[f"{PACKAGE}.eval.janus.report"]
