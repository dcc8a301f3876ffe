"""The package's layers: imports flow one way, and no two modules import each other (through any path).

Every import is read from the source with ``ast``, function-level and ``TYPE_CHECKING`` imports included,
so a cycle cannot hide behind a lazy import. The layer order is written once, in ``LAYERS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hf_residual"

# Lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
# Keys are module names relative to hf_residual; a package name stands for all of its modules.
LAYERS: list[set[str]] = [
    {"_version", "errors"},
    {"core"},  # the engine: tensor files, checkpoints, plans, kernels, manifest, output staging
    {"codecs"},  # lossy residuals: encode/decode over core's files and manifest
    {"hub"},  # model ids and revisions -> local folders; publishing; cards
    {"ops", "api"},  # extract, apply, port, inspect (``api``: their compatibility re-export)
    {"cpt", "evaluation", "demo", "toy", "tune"},  # features built on the operations
    {"commands"},  # the CLI's sub-commands
    {"cli", "__init__"},  # the front doors
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _resolve(name: str) -> str | None:
    """The module (relative to hf_residual) that an imported dotted name refers to, if it is ours."""
    if name == "hf_residual":
        return "__init__"
    if not name.startswith("hf_residual."):
        return None
    parts = name.split(".")[1:]
    while parts:  # ``hf_residual.core.engine.Segment`` -> ``core.engine``
        candidate = PACKAGE.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return None


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    candidate = PACKAGE.joinpath(*parts) if parts else PACKAGE
    return candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ["hf_residual", *path.relative_to(PACKAGE).parent.parts]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from hf_residual.core import engine`` imports the module hf_residual.core.engine;
            # ``from hf_residual.hub import ResolvedModel`` a name of the package's __init__
            names = [
                f"{module}.{alias.name}" if _is_module(f"{module}.{alias.name}") else module
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = _imports(path) - {name}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"hf_residual.{module} is in no layer: add its package to LAYERS in {__file__}")


GRAPH = _graph()


def test_every_module_is_in_a_layer():
    for module in GRAPH:
        _layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_flow_downwards(module):
    upward = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert not upward, f"hf_residual.{module} (layer {_layer(module)}) imports a higher layer: " + ", ".join(
        f"{t} (layer {_layer(t)})" for t in upward
    )


def test_no_import_cycles():
    """Tarjan's strongly connected components: any component of more than one module is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_imports():
    """The parser itself: an import inside a function counts (a hidden cycle is still a cycle)."""
    graph = {name: targets for name, targets in GRAPH.items() if name.startswith("hub.")}
    assert "hub.download" in graph["hub.sources"]  # imported inside sources.resolve


def test_lossy_codec_names_known_to_the_manifest_are_the_registered_codecs():
    """core.manifest validates codec names without importing codecs (a lower layer): the lists agree."""
    from hf_residual.codecs import registry
    from hf_residual.core import manifest

    assert set(manifest.LOSSY_CODECS) == set(registry.CODECS)


def test_no_module_is_much_over_400_lines():
    long = {
        _module_name(p): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420
    }
    assert not long, f"modules over 420 lines (split them): {long}"
