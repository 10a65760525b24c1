"""The layers of ``anomri``: subpackages import only from below, without cycles; no module over 600 lines.

Layers, bottom to top (the graph counts module-level and function-local imports alike):

0. ``errors`` and ``settings`` (the packaged defaults of config.yaml)
1. ``io`` (file formats, BIDS, derivatives, in-mask voxels, image folders; it raises ``errors``)
2. ``dmri`` (diffusion preprocessing, features, pooling of compatible features)
3. ``models`` (networks, training, checkpoints)
4. ``scores`` (novelty scores of a trained model, with the per-pixel adapter of image models)
5. ``maps`` (novelty maps, post-processing, calibrated probabilities) and, beside it, ``demo`` (synthetic
   cohorts and images: may use anything below ``maps``; only the CLI and ``workflow/`` import it)
6. ``evaluate``
7. ``images`` (the 2-D image engine, end to end: settings, the geometry between images and model inputs,
   image training, scoring and evaluation; it uses ``io``'s image folders, ``models``, ``scores`` and
   ``evaluate``'s image metrics)
8. ``report``
9. ``cli`` (``anomri/cli*`` and ``anomri/__main__.py``) and ``workflow/``

``anomri/__init__.py`` is the package itself (the version) and may be imported from anywhere.

Run as a script (``python tests/test_layers.py``) to print the subpackage graph, one edge a line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anomri"
MAX_LINES = 600

#: Layer of every subpackage (or top-level module) of anomri; an import must point to a lower layer.
LAYERS = {
    "errors": 0, "settings": 0, "io": 1, "dmri": 2, "models": 3, "scores": 4, "maps": 5, "demo": 5, "evaluate": 6, "images": 7,
    "report": 8, "cli": 9,
}
#: Subpackages that may import ``anomri.demo``.
DEMO_IMPORTERS = {"cli"}


def subpackage(module: str) -> str | None:
    """``anomri.io.voxels`` -> ``io``; ``anomri`` -> None; ``anomri.cli*`` and ``anomri.__main__`` -> ``cli``."""
    parts = module.split(".")
    if parts[0] != "anomri" or len(parts) < 2:
        return None
    return "cli" if parts[1].startswith("cli") or parts[1] == "__main__" else parts[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every anomri module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "anomri"}


def import_graph() -> dict[tuple[str, str], list[str]]:
    """Subpackage edges (importer, imported) -> the modules that make them."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = subpackage(module_name(path))
        for module in imported_modules(path):
            target = subpackage(module)
            if source and target and target != source and target in LAYERS:
                edges.setdefault((source, target), []).append(module_name(path))
    return edges


def find_cycle(edges) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_every_subpackage_has_a_layer():
    names = {subpackage(module_name(p)) for p in PACKAGE.rglob("*.py")} - {None}
    assert names <= set(LAYERS), f"give these a layer in LAYERS: {sorted(names - set(LAYERS))}"


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_point_down():
    upward = {f"{a} -> {b} ({', '.join(sorted(set(m)))})" for (a, b), m in import_graph().items()
              if LAYERS[b] >= LAYERS[a]}
    assert not upward, sorted(upward)


def test_only_the_cli_imports_demo():
    importers = {a for (a, b) in import_graph() if b == "demo"}
    assert importers <= DEMO_IMPORTERS


def test_no_module_over_600_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_jobs_after_scoring_start_without_heavy_libraries():
    """The probability, calibration, table and figure modules import no torch, MONAI or sklearn when loaded:
    those take seconds each, and the workflow runs one such job per scan after scoring."""
    modules = ["anomri.maps.probability", "anomri.maps.writing", "anomri.maps.calibration", "anomri.evaluate.cohort",
               "anomri.report.figures", "anomri.report.cohort"]
    code = (f"import sys, {', '.join(modules)}; "
            "print(' '.join(m for m in ('torch', 'monai', 'sklearn') if m in sys.modules) or 'none')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["none"]


if __name__ == "__main__":
    for (a, b), modules in sorted(import_graph().items()):
        mark = "" if LAYERS.get(b, -1) < LAYERS.get(a, 99) else "   <-- upward"
        print(f"{a} -> {b}{mark}   [{', '.join(sorted(set(modules)))}]")
    cycle = find_cycle(import_graph())
    print("cycle:", " -> ".join(cycle) if cycle else "none")
    sys.exit(0)
