"""ONNX export and the ONNX Runtime engine: the same captions as PyTorch, from an untrusted directory safely."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch

from captioner import Captioner
from captioner.cli import main
from captioner.data import load_captions
from captioner.errors import CheckpointError, ConfigError
from captioner.evaluation import evaluate
from captioner.model import BUNDLED_MODEL
from captioner.onnx_engine import DECODER_INIT_ONNX, DECODER_STEP_ONNX, ENCODER_ONNX, ONNX_FILES


def export(source: Path, out: Path) -> Path:
    assert main(["export", str(source), str(out), "--format", "onnx", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory) -> Path:
    """The small synthetic-shapes model, saved and exported to ONNX through the CLI."""
    folder = tmp_path_factory.mktemp("onnx")
    trained_model.save_pretrained(folder / "source")
    return export(folder / "source", folder / "exported")


@pytest.fixture(scope="module")
def engines(exported) -> tuple[Captioner, Captioner]:
    return (Captioner.from_pretrained(exported, device="cpu", engine="torch"),
            Captioner.from_pretrained(exported, device="cpu", engine="onnx"))


@pytest.fixture(scope="module")
def bundled_engines(tmp_path_factory) -> tuple[Captioner, Captioner]:
    """The bundled model, copied and exported in place (as `make setup` does for assets/model)."""
    folder = tmp_path_factory.mktemp("bundled") / "model"
    shutil.copytree(BUNDLED_MODEL, folder, ignore=shutil.ignore_patterns("*.onnx"))
    export(folder, folder)
    return (Captioner.from_pretrained(folder, device="cpu", engine="torch"),
            Captioner.from_pretrained(folder, device="cpu", engine="onnx"))


@pytest.fixture(scope="module")
def test_images(synthetic) -> list[Path]:
    return sorted((synthetic / "images").glob("*.png"))[-12:]


def test_export_writes_checked_graphs_with_dynamic_batch_axes(exported):
    assert {"config.json", "vocab.json", "model.safetensors", *ONNX_FILES} <= {p.name for p in exported.iterdir()}
    batch_axis = {"pixels": 0, "features": 0, "tokens": 0, "logits": 0, "h": 1, "c": 1, "next_h": 1, "next_c": 1}
    for name in ONNX_FILES:
        graph = onnx.load(str(exported / name))
        onnx.checker.check_model(graph, full_check=True)
        for value in [*graph.graph.input, *graph.graph.output]:
            axis = value.type.tensor_type.shape.dim[batch_axis[value.name]]
            assert axis.dim_param and not axis.dim_value, (name, value.name)
    assert [i.name for i in onnx.load(str(exported / DECODER_STEP_ONNX)).graph.input] == ["tokens", "h", "c"]
    assert [o.name for o in onnx.load(str(exported / DECODER_INIT_ONNX)).graph.output] == ["h", "c"]


def test_engine_choice(exported, trained_model, tmp_path):
    assert Captioner.from_pretrained(exported, device="cpu").engine == "onnx"  # auto, on the CPU, exported
    assert Captioner.from_pretrained(exported, device="cpu", engine="torch").engine == "torch"
    plain = trained_model.save_pretrained(tmp_path / "plain")
    assert Captioner.from_pretrained(plain, device="cpu").engine == "torch"
    with pytest.raises(CheckpointError, match="no ONNX export"):
        Captioner.from_pretrained(plain, engine="onnx")
    with pytest.raises(ConfigError, match="runs on the CPU" if torch.cuda.is_available() else "CUDA is not available"):
        Captioner.from_pretrained(exported, device="cuda", engine="onnx")
    with pytest.raises(ConfigError, match="engine must be one of"):
        Captioner.from_pretrained(exported, engine="tensorrt")


def test_sessions_compute_on_the_threads_asked_for(exported):
    default = Captioner.from_pretrained(exported, device="cpu", engine="onnx")
    one = Captioner.from_pretrained(exported, device="cpu", engine="onnx", num_threads=1)
    threads = lambda model: {session.get_session_options().intra_op_num_threads for session in (  # noqa: E731
        model.onnx_runtime.encoder.session, model.onnx_runtime.decoder.init_session, model.onnx_runtime.decoder.step_session)}
    assert threads(default) == {torch.get_num_threads()} and threads(one) == {1}
    for bad in (0, -1, True, 2.0, 5000):
        with pytest.raises(ConfigError, match="num_threads"):
            Captioner.from_pretrained(exported, engine="onnx", num_threads=bad)


def test_onnx_engine_gives_pytorch_features_and_captions(engines, test_images):
    torch_model, onnx_model = engines
    torch_features, onnx_features = torch_model.encode(test_images), onnx_model.encode(test_images)
    torch.testing.assert_close(onnx_features, torch_features, atol=1e-4, rtol=1e-4)
    for options in [{}, {"strategy": "greedy"}, {"strategy": "sample", "seed": 3, "num_return_sequences": 2},
                    {"beam_size": 5, "num_return_sequences": 3, "length_penalty": 1.0}]:
        expected, got = torch_model.generate(torch_features, **options), onnx_model.generate(torch_features, **options)
        assert [[c.text for c in row] for row in got] == [[c.text for c in row] for row in expected], options
        assert max(abs(a.log_prob - b.log_prob) for x, y in zip(expected, got) for a, b in zip(x, y)) < 1e-3
    assert onnx_model.caption(test_images[:3]) == torch_model.caption(test_images[:3])


@pytest.mark.parametrize("options", [
    {"min_length": 4, "max_length": 6}, {"no_repeat_ngram_size": 1}, {"suppress_unk": False},
    {"strategy": "sample", "top_k": 3, "temperature": 0.7, "seed": 1}, {"strategy": "sample", "top_p": 0.8, "seed": 2},
    {"strategy": "beam", "beam_size": 1}, {"strategy": "sample", "num_return_sequences": 3, "seed": 5},
])
def test_every_decoding_option_works_with_the_onnx_engine(engines, test_images, options):
    torch_model, onnx_model = engines
    features = torch_model.encode(test_images[:4])
    assert ([[c.text for c in row] for row in onnx_model.generate(features, **options)]
            == [[c.text for c in row] for row in torch_model.generate(features, **options)])


def test_bad_options_and_scoring_with_the_onnx_engine(engines, test_images):
    torch_model, onnx_model = engines
    with pytest.raises(ConfigError, match="greedy"):
        onnx_model.generate(test_images[:1], strategy="greedy", num_return_sequences=2)
    captions = torch_model.caption(test_images[:2])
    assert onnx_model.score(test_images[:2], captions) == pytest.approx(torch_model.score(test_images[:2], captions),
                                                                         abs=1e-3)


def test_cli_and_evaluate_take_an_engine(exported, synthetic, test_images, capsys):
    for engine in ("onnx", "torch"):
        assert main(["caption", str(test_images[0]), "--model", str(exported), "--engine", engine, "-q"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second
    results = {engine: evaluate(synthetic / "images", synthetic / "test.json", model=str(exported), device="cpu",
                                engine=engine, metrics=("BLEU",))["metrics"] for engine in ("onnx", "torch")}
    assert results["onnx"].pop("engine") == "onnx" and results["torch"].pop("engine") == "torch"
    for metrics in results.values():
        metrics.pop("seconds")
    assert results["onnx"] == pytest.approx(results["torch"], abs=1e-3)


def test_export_in_place_refuses_other_changes(exported, capsys):
    assert main(["export", str(exported), str(exported), "--format", "onnx", "--beam-size", "5"]) == 2
    assert "only to add ONNX graphs" in capsys.readouterr().err


def test_demo_timing_names_the_engine(engines, test_images):
    from captioner.webapp import caption_photo

    for model, name in zip(engines, ("PyTorch", "ONNX Runtime")):
        assert name in caption_photo(model, str(test_images[0])).timing


# ---------------------------------------------------------------------------------------- untrusted directories
def tampered(exported: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    return copy


def test_incomplete_export_is_refused(exported, tmp_path):
    folder = tampered(exported, tmp_path)
    (folder / DECODER_INIT_ONNX).unlink()
    with pytest.raises(CheckpointError, match="incomplete ONNX export"):
        Captioner.from_pretrained(folder, device="cpu")


def test_graph_with_wrong_inputs_is_refused(exported, tmp_path):
    folder = tampered(exported, tmp_path)
    shutil.copyfile(folder / ENCODER_ONNX, folder / DECODER_INIT_ONNX)  # right fingerprint, wrong graph
    with pytest.raises(CheckpointError, match=r"decoder_init.onnx: inputs are pixels float\['dynamic', 3"):
        Captioner.from_pretrained(folder, device="cpu")


def test_garbage_and_symlinked_graphs_are_refused(exported, test_images, tmp_path, capsys):
    folder = tampered(exported, tmp_path)
    (folder / DECODER_STEP_ONNX).write_bytes(b"\x08\x07not a graph at all")
    assert main(["caption", str(test_images[0]), "--model", str(folder), "--engine", "onnx"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {folder / DECODER_STEP_ONNX}: ")
    (folder / DECODER_STEP_ONNX).unlink()
    (folder / DECODER_STEP_ONNX).symlink_to(exported / DECODER_STEP_ONNX)
    with pytest.raises(CheckpointError, match="not a regular file"):
        Captioner.from_pretrained(folder, device="cpu")


def test_graphs_from_other_weights_are_refused(exported, tmp_path):
    folder = tampered(exported, tmp_path)
    weights = Captioner.from_pretrained(folder, engine="torch")
    with torch.no_grad():
        weights.decoder.output.bias.add_(1.0)
    retrained = weights.save_pretrained(tmp_path / "retrained")
    for name in ONNX_FILES:  # stale graphs copied beside new weights
        shutil.copyfile(folder / name, retrained / name)
    with pytest.raises(CheckpointError, match="exported from other weights"):
        Captioner.from_pretrained(retrained, device="cpu")


# ---------------------------------------------------------------------------------------- the bundled model
def test_bundled_model_on_flickr8k_test_photos(bundled_engines, shared_data):
    """Beam search (the default) agrees on >= 99% of 200 photos; greedy and sampling on a few."""
    torch_model, onnx_model = bundled_engines
    folder = shared_data / "flickr8k"
    records, _ = load_captions(folder / "captions_test.json", folder / "images", "test")
    paths = [r.path for r in records[:200]]
    features = onnx_model.encode(paths)
    torch.testing.assert_close(features, torch_model.encode(paths), atol=1e-4, rtol=1e-3)
    expected, got = torch_model.generate(features), onnx_model.generate(features)
    same = [a[0].text == b[0].text for a, b in zip(expected, got)]
    assert sum(same) >= 0.99 * len(paths), [(a[0].text, b[0].text) for a, b in zip(expected, got) if a[0].text != b[0].text]
    assert max(abs(a[0].log_prob - b[0].log_prob) for a, b, s in zip(expected, got, same) if s) < 1e-3
    for options in ({"strategy": "greedy"}, {"strategy": "sample", "seed": 0, "num_return_sequences": 2}):
        expected, got = torch_model.generate(features[:8], **options), onnx_model.generate(features[:8], **options)
        assert [[c.text for c in row] for row in got] == [[c.text for c in row] for row in expected], options
        assert max(abs(a.log_prob - b.log_prob) for x, y in zip(expected, got) for a, b in zip(x, y)) < 1e-3
