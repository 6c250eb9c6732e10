"""The package's modules form layers: a module imports only from layers below its own (lazy imports included)."""

from __future__ import annotations

import ast

from conftest import ROOT

# Lowest first. A new module must be placed here, which is the point: its layer is a decision.
LAYERS = [
    {"errors", "metrics"},
    {"bounds"},
    {"runtime", "images", "vocab", "checkpoint"},
    {"encoder", "decoder", "data", "distributed"},
    {"decoding", "features"},
    {"onnx_engine"},
    {"model"},
    {"bulk"},
    {"evaluation", "webapp", "train_config"},
    {"train_state", "scst", "run_folder"},
    {"training"},
    {"cli"},
    {"__init__", "__main__"},
]
LAYER_OF = {module: depth for depth, modules in enumerate(LAYERS) for module in modules}


def package_imports(path) -> set[str]:
    """The sibling modules that ``path`` imports with ``from .x import ...`` or ``from . import x``."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            imported.update([node.module] if node.module else [alias.name for alias in node.names])
    return imported


def test_every_module_has_a_layer():
    modules = {path.stem for path in (ROOT / "captioner").glob("*.py")}
    assert modules == set(LAYER_OF), (sorted(modules - set(LAYER_OF)), sorted(set(LAYER_OF) - modules))


def test_no_module_imports_from_its_own_layer_or_above():
    upward = [f"{path.stem} -> {name}" for path in sorted((ROOT / "captioner").glob("*.py"))
              for name in sorted(package_imports(path)) if LAYER_OF[name] >= LAYER_OF[path.stem]]
    assert not upward, upward
