"""What starting the package costs: ``import captioner``, every command's ``--help`` and ``captioner merge``
load none of PyTorch, torchvision, ONNX Runtime or Gradio (seconds each), only the commands that run a model do.

Each check runs in a fresh interpreter and reads its ``sys.modules``: this test process has them all loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

HEAVY = ("torch", "torchvision", "onnxruntime", "gradio")
COMMANDS = ("caption", "merge", "evaluate", "export", "demo", "serve")  # train: below

PROBE = """
import contextlib, io, json, sys
heavy, runs = {heavy!r}, {runs!r}
results = []
for run in runs:
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            exec(run)
            status = 0
        except SystemExit as exit:
            status = exit.code
    results.append([run, status, [name for name in heavy if name in sys.modules], output.getvalue()[-20000:]])
print(json.dumps(results))
"""


def probe(*runs: str, cwd=ROOT) -> list[tuple[str, int, list[str], str]]:
    """Run each statement in turn in one new interpreter: its exit status, the heavy modules loaded after it."""
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, runs=runs)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(row) for row in json.loads(result.stdout.splitlines()[-1])]


def test_import_and_every_help_but_trains_load_no_torch():
    runs = ["import captioner, captioner.bulk, captioner.data, captioner.generation, captioner.models, "
            "captioner.serve, captioner.train",
            "from captioner.cli import main; main(['--help'])",
            *(f"main([{command!r}, '--help'])" for command in COMMANDS)]
    results = probe(*runs)
    assert [(run, status) for run, status, _, _ in results] == [(run, 0) for run in runs]
    first = next(((run, loaded) for run, _, loaded, _ in results if loaded), None)
    assert first is None, f"{first[0]!r} imported {', '.join(first[1])}"
    assert "--beam-size" in results[2][3] and "--max-batch" in results[-1][3]  # caption's and serve's own options


def test_lazy_names_are_the_real_ones():
    import captioner
    from captioner.generation.config import GenerationConfig
    from captioner.generation.search import Caption
    from captioner.models.captioner import Captioner

    assert (captioner.Captioner, captioner.Caption, captioner.GenerationConfig) == (Captioner, Caption, GenerationConfig)
    assert set(captioner.__all__) <= set(dir(captioner))
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        captioner.Nothing  # noqa: B018


@pytest.mark.parametrize("package", ["bulk", "data", "generation", "models", "serve", "train"])
def test_each_subpackage_declares_its_submodules(package):
    import importlib

    module = importlib.import_module(f"captioner.{package}")
    submodules = {path.stem for path in (ROOT / "captioner" / package).glob("*.py")} - {"__init__"}
    assert sorted(module.__all__) == sorted(submodules)


def test_train_help_loads_no_torch():
    (_, status, loaded, output), = probe("from captioner.cli import main; main(['train', '--help'])")
    assert status == 0 and "--train-sets" in output
    assert not loaded, f"train --help imported {', '.join(loaded)}"


def test_merge_loads_no_torch(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    for rank, name in enumerate(("a.jpg", "b.jpg")):
        (tmp_path / f"captions.rank-{rank}.jsonl").write_text(json.dumps({"file": name, "captions": ["x"]}) + "\n")
    (_, status, loaded, output), = probe(
        "from captioner.cli import main; sys.exit(main(['merge', 'a.jpg', 'b.jpg', '--out', 'captions.jsonl']))",
        cwd=tmp_path)
    assert status == 0, output
    assert [json.loads(line)["file"] for line in (tmp_path / "captions.jsonl").read_text().splitlines()] == \
        ["a.jpg", "b.jpg"]
    assert not loaded, f"merge imported {', '.join(loaded)}"
