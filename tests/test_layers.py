"""The package's design as import rules: subpackages stack in layers, and nothing below imports from above.

    entry        cli, __init__, __main__           may import anything
    train  bulk  serve                             none imports another; only the entry imports bulk and serve
    models       encoder, decoder, Captioner       never imports train or serve
    generation   config, search                    works on any step decoder: never imports models
    data         images, vocab, annotations, loader
    foundation   errors < files < bounds < runtime, checkpoint, metrics < distributed   (root modules, in this order)

Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "captioner"
ENTRY = {"cli", "__init__", "__main__"}
FOUNDATION = [{"errors"}, {"files"}, {"bounds"}, {"runtime", "checkpoint", "metrics"}, {"distributed"}]  # lowest first
MAY_IMPORT = {
    "foundation": set(),
    "data": {"foundation"},
    "generation": {"foundation", "data"},
    "models": {"foundation", "data", "generation"},
    "train": {"foundation", "data", "generation", "models"},
    "bulk": {"foundation", "data", "generation", "models"},
    "serve": {"foundation", "data", "generation", "models"},
}
SUBPACKAGES = set(MAY_IMPORT) - {"foundation"}


def modules() -> dict[str, object]:
    """Every module of the package by dotted name relative to it (``models.decoder``, ``cli``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path) -> set[str]:
    """The package modules (or subpackages) that module ``name`` imports, resolved to dotted names."""
    package = name.split(".")[:-1]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
            elif (node.module or "").startswith("captioner"):
                base, node.module = [], node.module.removeprefix("captioner").lstrip(".") or None
            else:
                continue
            if node.module:
                imported.add(".".join([*base, node.module]))
            else:
                imported.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name.removeprefix("captioner.") for alias in node.names
                            if alias.name.startswith("captioner."))
    return imported


def group_of(name: str) -> str:
    top = name.split(".")[0]
    if top in SUBPACKAGES:
        return top
    return "entry" if top in ENTRY else "foundation"


def foundation_layer(name: str) -> int:
    return next(depth for depth, layer in enumerate(FOUNDATION) if name in layer)


def test_every_module_has_a_place():
    misplaced = [name for name in modules() if "." not in name and name not in ENTRY
                 and not any(name in layer for layer in FOUNDATION)]
    assert not misplaced, f"root modules outside ENTRY and FOUNDATION: {misplaced}"
    assert {name.split(".")[0] for name in modules() if "." in name} == SUBPACKAGES


def test_subpackages_import_only_the_layers_below_them():
    wrong = []
    for name, path in modules().items():
        group = group_of(name)
        if group == "entry":
            continue
        for target in sorted(imports_of(name, path)):
            target_group = group_of(target)
            if target_group != group and target_group not in MAY_IMPORT[group]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_foundation_modules_import_only_lower_foundation_modules():
    upward = [f"{name} -> {target}" for name, path in modules().items() if group_of(name) == "foundation"
              for target in sorted(imports_of(name, path))
              if foundation_layer(target) >= foundation_layer(name)]
    assert not upward, upward


def test_only_the_entry_imports_bulk_and_serve():
    for front in ("bulk", "serve"):
        importers = [name for name, path in modules().items() if group_of(name) not in ("entry", front)
                     and any(group_of(target) == front for target in imports_of(name, path))]
        assert not importers, f"{front} imported by {importers}"


def test_modules_within_a_subpackage_import_each_other_without_cycles():
    graph = {name: {target for target in imports_of(name, path) if target in modules() and target != name}
             for name, path in modules().items() if group_of(name) in SUBPACKAGES}
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, " -> ".join([*trail, name])
        if name in done:
            return
        for target in graph.get(name, ()):
            visit(target, (*trail, name))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_each_subpackage_says_what_it_owns():
    for package in sorted(SUBPACKAGES):
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 20, f"captioner/{package}/__init__.py needs a docstring saying what it owns"


def test_the_readme_layout_table_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Layout"):]
    rows = {line.split("|")[1] for line in table.splitlines() if line.startswith("| `")}
    missing = []
    for name in modules():
        parts = name.split(".")
        if len(parts) == 1:
            named = any(f"`{parts[0]}.py`" in row or f"`captioner/{parts[0]}.py`" in row for row in rows)
        else:
            row = next((line for line in table.splitlines() if line.startswith(f"| `captioner/{parts[0]}/`")), "")
            named = parts[1] == "__init__" or f"`{parts[1]}`" in row
        if not named:
            missing.append(name)
    assert not missing, f"README.md's layout table does not name {missing}"
