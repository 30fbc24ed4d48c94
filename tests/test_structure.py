"""The package's shape, read from its source with ``ast`` (nothing is imported): no import cycles,
imports pointing down the layers only, and functions and modules small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sketchsweep", "hydra_plugins")

# Each module's layer; a module imports only from layers below its own, or from its own layer
# where the layer allows it (core and services are built of each other; entry points are not).
CORE, SERVICE, ENTRY, TOP = 1, 2, 3, 4
LEAVES = {"sketchsweep.cli", "sketchsweep.paths"}  # exit codes, signals; default locations: standard library only
LAYERS = {
    "sketchsweep.model": CORE,
    "sketchsweep.engine": CORE,
    "sketchsweep.data": CORE,
    "sketchsweep.calibration": CORE,  # ECE, reliability bins, temperature scaling: torch and numpy only
    "sketchsweep.tta": CORE,
    "sketchsweep.ema": CORE,
    "sketchsweep.schedules": CORE,
    "sketchsweep.config": SERVICE,
    "sketchsweep.modelref": SERVICE,
    "sketchsweep.tracking": SERVICE,
    "sketchsweep.credentials": SERVICE,
    "sketchsweep.store": SERVICE,
    "sketchsweep.outbox": SERVICE,
    "sketchsweep.localstore": SERVICE,
    "sketchsweep.checkpoint": SERVICE,
    "sketchsweep.resume": SERVICE,
    "sketchsweep.evaluation": SERVICE,
    "sketchsweep.plots": SERVICE,  # matplotlib, imported as a plot is made
    "sketchsweep.run_data": SERVICE,  # a run's split or other data, for evaluate and export --calibrate
    "sketchsweep.onnx_model": SERVICE,
    "sketchsweep.onnx_export": SERVICE,
    "sketchsweep.deliver": SERVICE,
    "sketchsweep.registry": SERVICE,
    "sketchsweep.served_model": SERVICE,  # run by MLflow's model server: numpy, onnxruntime, mlflow only
    "sketchsweep.predictor": SERVICE,  # a model ready to classify drawings: predict and serve
    "sketchsweep.sweep": SERVICE,
    "sketchsweep.evaluate": ENTRY,
    "sketchsweep.export": ENTRY,
    "sketchsweep.predict": ENTRY,
    "sketchsweep.serve": ENTRY,
    "sketchsweep.doctor": ENTRY,
    "sketchsweep.workers": ENTRY,
    "hydra_plugins": ENTRY,
    "sketchsweep.train": TOP,
}
SAME_LAYER_OK = {CORE, SERVICE}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "__pycache__" not in p.parts
}


def imports(name: str) -> set[str]:
    """The package modules ``name`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod.
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int:
    matches = [k for k in LAYERS if name == k or name.startswith(k + ".")]
    assert matches, f"{name}: no layer; add it to LAYERS in {Path(__file__).name}"
    return LAYERS[max(matches, key=len)]


def test_no_import_cycles():
    """Depth-first search for a path back to where it started."""
    cycles, done = [], set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append(" -> ".join([*path[path.index(name) :], name]))
            return
        if name in done:
            return
        for other in sorted(GRAPH[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])
    assert not cycles, cycles


def test_imports_point_down_the_layers():
    wrong = []
    for name, targets in GRAPH.items():
        for target in targets - LEAVES:  # the leaves serve every layer
            here, there = layer(name), layer(target)
            if there > here or (there == here and here not in SAME_LAYER_OK):
                wrong.append(f"{name} (layer {here}) imports {target} (layer {there})")
    assert not wrong, wrong


def test_leaves_import_nothing_of_the_package():
    assert {name: GRAPH[name] for name in LEAVES if GRAPH[name]} == {}


def test_the_check_sees_real_imports():
    """The parser finds imports written every way the package writes them, including in functions."""
    assert {"sketchsweep.engine", "sketchsweep.cli", "sketchsweep.deliver"} <= GRAPH["sketchsweep.train"]
    assert {"sketchsweep.evaluation", "sketchsweep.onnx_export"} <= GRAPH["sketchsweep.deliver"]  # in functions
    assert "sketchsweep.checkpoint" in GRAPH["sketchsweep.predictor"]  # imported inside Predictor
    assert "sketchsweep.sweep.study" in GRAPH["hydra_plugins.sketchsweep_optuna.sweeper"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_and_modules_stay_readable(name):
    """No function over 80 lines, no module over 400 (the style guide's limits)."""
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= 400, f"{MODULES[name]}: {len(text.splitlines())} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"{MODULES[name]}: {long}"
