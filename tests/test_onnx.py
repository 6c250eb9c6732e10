"""ONNX export and the ONNX Runtime engine: the same captions as PyTorch; graphs from outside never run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from captioner import Captioner
from captioner.models import onnx_cache, onnx_engine
from captioner.cli import main
from captioner.data.annotations import load_captions
from captioner.errors import CheckpointError, ConfigError, OutputError
from captioner.bulk.evaluation import evaluate
from captioner.models.captioner import BUNDLED_MODEL
from captioner.models.onnx_engine import DECODER_INIT_ONNX, DECODER_STEP_ONNX, ENCODER_ONNX, FINGERPRINT_KEY, ONNX_FILES, weights_fingerprint
from captioner.data.vocab import START_ID
from captioner.runtime import cache_dir
from conftest import need


def export(source: Path, out: Path) -> Path:
    assert main(["export", str(source), str(out), "--format", "onnx", "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> Path:
    """The tiny random-weight model, saved and exported to ONNX through the CLI."""
    folder = tmp_path_factory.mktemp("onnx")
    tiny_model.save_pretrained(folder / "source")
    return export(folder / "source", folder / "exported")


@pytest.fixture(scope="module")
def engines(exported) -> tuple[Captioner, Captioner]:
    return (Captioner.from_pretrained(exported, device="cpu", engine="torch"),
            Captioner.from_pretrained(exported, device="cpu", engine="onnx"))


@pytest.fixture(scope="module")
def bundled_engines() -> tuple[Captioner, Captioner]:
    return (Captioner.from_pretrained(BUNDLED_MODEL, device="cpu", engine="torch"),
            Captioner.from_pretrained(BUNDLED_MODEL, device="cpu", engine="onnx"))


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


def test_engine_choice(exported, tiny_model, tmp_path):
    plain = tiny_model.save_pretrained(tmp_path / "plain")  # no graph files: the engine exports its own
    assert Captioner.from_pretrained(plain, device="cpu").engine == "onnx"  # auto, on the CPU
    assert Captioner.from_pretrained(plain, device="cpu", engine="torch").engine == "torch"
    with pytest.raises(ConfigError, match="runs on the CPU" if torch.cuda.is_available() else "CUDA is not available"):
        Captioner.from_pretrained(exported, device="cuda", engine="onnx")
    with pytest.raises(ConfigError, match="engine must be one of"):
        Captioner.from_pretrained(exported, engine="tensorrt")


def test_a_copy_runs_on_pytorch_with_its_own_weights(engines, test_images):
    import copy

    copied = copy.deepcopy(engines[1])
    assert engines[1].engine == "onnx" and copied.engine == "torch"
    assert copied.caption(test_images[:3]) == engines[1].caption(test_images[:3])
    with torch.no_grad():
        copied.decoder.output.bias[7] += 100.0  # the copy's change reaches its captions, not the original's
    assert all(caption.split()[0] == copied.vocab.words[7] for caption in copied.caption(test_images[:3]))
    assert engines[1].caption(test_images[:3]) == engines[0].caption(test_images[:3])


def test_a_model_moved_off_the_cpu_runs_on_pytorch_there(exported):
    """The sessions run on the CPU only: ``to(device)`` must take encode and generate along (the meta device
    stands in for a GPU here; where CUDA exists, it is tried too)."""
    devices = ["meta", *(["cuda"] if torch.cuda.is_available() else [])]
    for device in devices:
        model = Captioner.from_pretrained(exported, device="cpu", engine="onnx")
        assert model.engine == "onnx"
        model.to(device)
        assert model.engine == "torch"
        pixels = torch.zeros((2, 3, 224, 224), device=device)
        features = model.encode_pixels(pixels)
        assert features.device.type == torch.device(device).type and features.shape == (2, model.encoder.config.feature_size)
        if device == "cuda":
            assert model.to("cpu").engine == "onnx"


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


def test_demo_timing_names_the_engine(engines, test_images):
    from captioner.serve.webapp import caption_photo

    for model, name in zip(engines, ("PyTorch", "ONNX Runtime")):
        assert name in caption_photo(model, str(test_images[0])).timing


# ---------------------------------------------------------------------------------------- graphs from outside
SECRET = b"machine api.example.com login alice password hunter2\n"


def hostile_graph(where: str, fingerprint: str = "") -> onnx.ModelProto:
    """A graph whose one tensor is the external file ``.netrc``, which ONNX Runtime reads relative to the working
    directory, stored ``where``: a top-level initializer, a Constant node, an If node's subgraph, or a sparse
    tensor attribute; it carries ``fingerprint`` as ours do."""
    from onnx import TensorProto, helper

    def secret() -> TensorProto:
        tensor = TensorProto(name="secret", data_type=TensorProto.UINT8, dims=[len(SECRET)],
                             data_location=TensorProto.EXTERNAL)
        tensor.external_data.add(key="location", value=".netrc")
        return tensor

    out = helper.make_tensor_value_info("logits", TensorProto.UINT8, [len(SECRET)])
    if where == "initializer":
        graph = helper.make_graph([helper.make_node("Identity", ["secret"], ["logits"])], "g", [], [out], [secret()])
    elif where == "constant":
        graph = helper.make_graph([helper.make_node("Constant", [], ["logits"], value=secret())], "g", [], [out])
    elif where == "sparse":
        indices = helper.make_tensor("indices", TensorProto.INT64, [len(SECRET)], list(range(len(SECRET))))
        sparse = helper.make_sparse_tensor(secret(), indices, [len(SECRET)])
        graph = helper.make_graph([helper.make_node("Constant", [], ["logits"], sparse_value=sparse)], "g", [], [out])
    else:
        branch_out = helper.make_tensor_value_info("branch", TensorProto.UINT8, [len(SECRET)])
        branch = helper.make_graph([helper.make_node("Identity", ["secret"], ["branch"])], "b", [], [branch_out],
                                   [secret()])
        condition = helper.make_tensor("yes", TensorProto.BOOL, [], [True])
        graph = helper.make_graph([helper.make_node("If", ["yes"], ["logits"], then_branch=branch, else_branch=branch)],
                                  "g", [], [out], [condition])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key=FINGERPRINT_KEY, value=fingerprint)
    return model


WHERE = ["initializer", "constant", "subgraph", "sparse"]


def test_the_hostile_graphs_do_read_the_file_when_run(tmp_path, monkeypatch):
    """What the tests below defend against is real: ONNX Runtime spells the file out (sparse tensors it refuses)."""
    import onnxruntime

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".netrc").write_bytes(SECRET)
    for where in ("initializer", "constant", "subgraph"):
        session = onnxruntime.InferenceSession(hostile_graph(where).SerializeToString(), providers=["CPUExecutionProvider"])
        assert session.run(None, {})[0].tobytes() == SECRET, where


@pytest.mark.parametrize("where", WHERE)
def test_graph_files_in_a_checkpoint_are_never_executed(exported, engines, test_images, tmp_path, monkeypatch, capsys,
                                                        where):
    folder = shutil.copytree(exported, tmp_path / "hostile")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".netrc").write_bytes(SECRET)
    fingerprint = weights_fingerprint(engines[0].encoder, engines[0].decoder)
    for name in ONNX_FILES:
        onnx.save(hostile_graph(where, fingerprint), str(folder / name))
    model = Captioner.from_pretrained(folder, device="cpu", engine="onnx")
    assert model.engine == "onnx"
    assert model.caption(test_images[:4]) == engines[0].caption(test_images[:4])
    assert main(["caption", str(test_images[0]), "--model", str(folder), "--json", "-q"]) == 0
    assert "alice" not in capsys.readouterr().out


def huge_graphs(folder: Path) -> None:
    """A 5 GB sparse encoder.onnx, a Loop of 10^12 iterations and an Expand to 2^31 floats, in ``folder``."""
    from onnx import TensorProto, helper

    with open(folder / ENCODER_ONNX, "wb") as handle:
        handle.truncate(5 << 30)
    body = helper.make_graph([helper.make_node("Identity", ["condition"], ["condition_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("condition", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("condition_out", TensorProto.BOOL, [])])
    trips = helper.make_tensor("trips", TensorProto.INT64, [], [10 ** 12])
    keep_going = helper.make_tensor("keep_going", TensorProto.BOOL, [], [True])
    loop = helper.make_graph([helper.make_node("Loop", ["trips", "keep_going"], [], body=body)], "loop", [], [],
                             [trips, keep_going])
    onnx.save(helper.make_model(loop, opset_imports=[helper.make_opsetid("", 17)]), str(folder / DECODER_STEP_ONNX))
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [1 << 31])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    out = helper.make_tensor_value_info("h", TensorProto.FLOAT, [1 << 31])
    expand = helper.make_graph([helper.make_node("Expand", ["one", "shape"], ["h"])], "expand", [], [out], [one, shape])
    onnx.save(helper.make_model(expand, opset_imports=[helper.make_opsetid("", 17)]), str(folder / DECODER_INIT_ONNX))


@pytest.mark.slow  # exports the ONNX graphs afresh (seconds each)
def test_huge_and_endless_graphs_in_a_checkpoint_cost_nothing(exported, test_images, tmp_path):
    """Bounds measured on a real process: it finishes (the timeout is a hang guard, not a speed target) and its
    peak memory is a photo's, not the 5 GB file's or the 8 GiB Expand's."""
    folder = shutil.copytree(exported, tmp_path / "huge", ignore=shutil.ignore_patterns("*.onnx"))
    huge_graphs(folder)
    command = ("import resource, sys; from captioner.cli import main; status = main(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", command, "caption", str(test_images[0]), "--model", str(folder),
                             "--engine", "onnx", "--json", "-q"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["captions"][0]["text"]
    peak_kib = int(result.stderr.split()[-1])
    assert peak_kib < 2 << 20, f"peak memory {peak_kib / 1024:.0f} MB"


@pytest.mark.slow  # exports the ONNX graphs afresh (seconds each)
def test_a_tampered_graph_beside_its_weights_changes_nothing(exported, engines, test_images, tmp_path):
    """The step graph with 9 added to one word's output bias, fingerprint kept: it would say that word."""
    import onnxruntime

    folder = shutil.copytree(exported, tmp_path / "tampered")
    graph = onnx.load(str(folder / DECODER_STEP_ONNX))
    vocab_size = engines[0].decoder.config.vocab_size
    bias, = [t for t in graph.graph.initializer if list(t.dims) == [vocab_size]]  # the output layer's
    values = onnx.numpy_helper.to_array(bias).copy()
    values[7] += 50.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(graph, str(folder / DECODER_STEP_ONNX))
    state = torch.zeros(engines[0].decoder.config.num_layers, 1, engines[0].decoder.config.hidden_size).numpy()
    session = onnxruntime.InferenceSession(str(folder / DECODER_STEP_ONNX), providers=["CPUExecutionProvider"])
    assert session.run(None, {"tokens": np.array([START_ID]), "h": state, "c": state})[0].argmax() == 7  # it works
    model = Captioner.from_pretrained(folder, device="cpu", engine="onnx")
    features = engines[0].encode(test_images)
    assert [c[0].text for c in model.generate(features)] == [c[0].text for c in engines[0].generate(features)]
    assert model.generate(features)[0][0].log_prob == pytest.approx(
        engines[0].score(features[:1], [engines[0].caption(features[:1])[0]])[0], abs=1e-3)


@pytest.mark.slow  # exports the ONNX graphs afresh (seconds each)
def test_cached_graphs_pointing_at_other_files_are_exported_again(exported, engines, test_images, session_cache,
                                                                    monkeypatch, tmp_path):
    model = engines[1]
    fingerprint = weights_fingerprint(model.encoder, model.decoder)
    entry = session_cache / "onnx" / fingerprint
    clean = (entry / DECODER_STEP_ONNX).read_bytes()
    assert onnx_cache.fingerprint_of(clean) == fingerprint
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".netrc").write_bytes(SECRET)
    for where in WHERE:
        hostile = hostile_graph(where, fingerprint).SerializeToString()
        assert onnx_cache.fingerprint_of(hostile) is None, where
        (entry / DECODER_STEP_ONNX).write_bytes(hostile)
        reloaded = Captioner.from_pretrained(exported, device="cpu", engine="onnx")
        assert reloaded.caption(test_images[:2]) == engines[0].caption(test_images[:2]), where
        assert (entry / DECODER_STEP_ONNX).read_bytes() == clean, where  # the entry was exported again


@pytest.mark.parametrize("damage", ["truncated", *(pytest.param(damage, marks=pytest.mark.slow)  # one export each
                                                 for damage in ("garbage", "symlink", "folder", "missing"))])
def test_a_damaged_cache_entry_is_exported_again(exported, engines, test_images, session_cache, tmp_path, damage):
    fingerprint = weights_fingerprint(engines[0].encoder, engines[0].decoder)
    graph = session_cache / "onnx" / fingerprint / ENCODER_ONNX
    clean = graph.read_bytes()
    graph.unlink()
    if damage == "truncated":
        graph.write_bytes(clean[: len(clean) // 2])
    elif damage == "garbage":
        graph.write_bytes(b"\x08\x07not a graph at all")
    elif damage == "symlink":
        (tmp_path / "elsewhere.onnx").write_bytes(clean)
        graph.symlink_to(tmp_path / "elsewhere.onnx")
    elif damage == "folder":
        graph.mkdir()
    model = Captioner.from_pretrained(exported, device="cpu", engine="onnx")
    assert model.caption(test_images[:2]) == engines[0].caption(test_images[:2])
    assert graph.is_file() and not graph.is_symlink() and graph.read_bytes() == clean


def counting_exports(monkeypatch) -> list[int]:
    """A list that grows by one at each export of graphs the engine makes from now on."""
    exports: list[int] = []
    export = onnx_engine.export_graphs
    monkeypatch.setattr(onnx_engine, "export_graphs", lambda *args: exports.append(1) or export(*args))
    return exports


@pytest.mark.slow  # exports the ONNX graphs afresh (seconds each)
def test_a_cache_entry_that_is_a_link_is_exported_again_never_followed(exported, engines, test_images, session_cache,
                                                                        tmp_path, monkeypatch):
    """A link in the cache is no entry of ours, whatever its graphs' fingerprints say: its graphs never run."""
    fingerprint = weights_fingerprint(engines[0].encoder, engines[0].decoder)
    entry = session_cache / "onnx" / fingerprint
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(entry, elsewhere)
    shutil.rmtree(entry)
    entry.symlink_to(elsewhere)
    exports = counting_exports(monkeypatch)
    model = Captioner.from_pretrained(exported, device="cpu", engine="onnx")
    assert model.caption(test_images[:2]) == engines[0].caption(test_images[:2])
    assert exports == [1] and entry.is_dir() and not entry.is_symlink()  # exported again, the link replaced
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(ONNX_FILES)  # what it pointed at left alone
    assert not [p for p in entry.parent.iterdir() if p.is_symlink()]  # the link is gone, not set aside


@pytest.mark.parametrize("failure", [MemoryError, pytest.param(OSError, marks=pytest.mark.slow)])  # an export each
def test_a_cache_read_that_fails_costs_an_export_not_a_failure(exported, engines, test_images, monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure()

    Captioner.from_pretrained(exported, device="cpu", engine="onnx")  # the entry is cached
    monkeypatch.setattr(onnx_cache, "read_bounded", fail)
    exports = counting_exports(monkeypatch)
    model = Captioner.from_pretrained(exported, device="cpu", engine="onnx")
    assert model.caption(test_images[:2]) == engines[0].caption(test_images[:2]) and exports == [1]


LOADS_UNDER_A_MEMORY_LIMIT = """
import re, resource, sys
from pathlib import Path
from captioner import Captioner
from captioner.models import onnx_engine

Captioner.from_pretrained(sys.argv[1], device="cpu", engine="onnx")  # exported into the cache, or read from it
used = int(re.search(r"VmSize:\\s*(\\d+)", Path("/proc/self/status").read_text())[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
onnx_engine.export_graphs = None  # every later load must read the cache
for _ in range(3):
    Captioner.from_pretrained(sys.argv[1], device="cpu", engine="onnx")
print("loaded")
"""


@pytest.mark.slow  # a subprocess under an address-space limit
def test_cache_hits_fit_in_an_address_space_limit(tiny_model_dir):
    """Each cached graph is read in a piece of its size: reading up to the 2 GiB bound reserved 2 GiB per graph, so
    under ``ulimit -v`` (RLIMIT_AS) the first load worked and every later one died with a MemoryError."""
    result = subprocess.run([sys.executable, "-c", LOADS_UNDER_A_MEMORY_LIMIT, str(tiny_model_dir)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.split() == ["loaded"], result.stderr[-3000:]


def test_the_cache_folder_ignores_a_relative_xdg_cache_home(tmp_path, monkeypatch):
    """The XDG spec: a relative path there is invalid, and would put the cache in the working folder."""
    monkeypatch.delenv("CAPTIONER_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = tmp_path / "home" / ".cache" / "captioner" / "onnx"
    absolute = tmp_path / "xdg"
    for xdg, folder in (("relative/cache", default), ("", default), (str(absolute), absolute / "captioner" / "onnx")):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert cache_dir("onnx") == folder, xdg
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir("onnx") == tmp_path / "mine" / "onnx"


@pytest.mark.slow  # exports the ONNX graphs afresh (seconds each)
def test_an_unusable_cache_costs_an_export_not_a_failure(exported, engines, test_images, tmp_path, monkeypatch, caplog):
    shared = tmp_path / "shared"
    (shared / "onnx").mkdir(parents=True)
    (shared / "onnx").chmod(0o777)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    for root, warning in ((shared, "not a private folder"), (blocked, "unusable")):
        monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(root))
        caplog.clear()
        model = Captioner.from_pretrained(exported, device="cpu", engine="onnx")
        assert model.caption(test_images[:2]) == engines[0].caption(test_images[:2])
        assert warning in caplog.text
    assert list((shared / "onnx").iterdir()) == []  # nothing written where others could have written


@pytest.mark.slow  # exports the ONNX graphs afresh (seconds each)
def test_the_cache_keeps_the_most_recently_used_models_within_its_bound(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "cache"))
    first = tiny_model.save_pretrained(tmp_path / "first")
    second = Captioner.from_pretrained(first, engine="torch")
    with torch.no_grad():
        second.decoder.output.bias.add_(0.5)
    second = second.save_pretrained(tmp_path / "second")
    Captioner.from_pretrained(first, engine="onnx")
    entries = lambda: sorted(p.name for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith("."))  # noqa: E731
    assert len(entries()) == 1
    size = sum(f.stat().st_size for f in (tmp_path / "cache" / "onnx" / entries()[0]).iterdir())
    monkeypatch.setattr(onnx_cache, "MAX_CACHE_BYTES", int(size * 1.5))  # room for one model, not two
    loaded = Captioner.from_pretrained(second, engine="onnx")
    assert entries() == [weights_fingerprint(loaded.encoder, loaded.decoder)]


CONCURRENT_LOADER = """
import json, sys
from captioner import Captioner
from captioner.models import onnx_engine

exports = []
export = onnx_engine.export_graphs
onnx_engine.export_graphs = lambda *args: exports.append(1) or export(*args)
print("ready", flush=True)
sys.stdin.readline()  # every loader starts together, into the one empty cache
model = Captioner.from_pretrained(sys.argv[1], device="cpu", engine="onnx", num_threads=1)
print(json.dumps({"engine": model.engine, "exports": len(exports), "captions": model.caption(sys.argv[2:])}))
"""


@pytest.mark.slow  # runs processes that export the ONNX graphs
def test_concurrent_first_loads_in_processes_export_once(tiny_model, test_images, tmp_path):
    """Loaders in separate processes that find the cache empty together export once, as docs/onnx.md says: the first
    holds the entry's lock while it exports, the others wait for it and read its entry instead of exporting."""
    folder = tiny_model.save_pretrained(tmp_path / "model")
    images = [str(image) for image in test_images[:3]]
    environment = {**os.environ, "CAPTIONER_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    loaders = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOADER, str(folder), *images], env=environment,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
    try:
        for loader in loaders:
            assert loader.stdout.readline().split() == ["ready"], loader.stderr.read()[-3000:]
        for loader in loaders:
            loader.stdin.write("go\n")
            loader.stdin.flush()
        outputs = [loader.communicate(timeout=300) for loader in loaders]
    finally:
        for loader in loaders:
            loader.kill()
    assert all(loader.returncode == 0 for loader in loaders), [error[-3000:] for _, error in outputs]
    results = [json.loads(output) for output, _ in outputs]
    expected = Captioner.from_pretrained(folder, device="cpu", engine="torch").caption(images)
    assert all(result["engine"] == "onnx" and result["captions"] == expected for result in results), results
    assert sum(result["exports"] for result in results) == 1, results
    cache = tmp_path / "cache" / "onnx"
    entries = [path for path in cache.iterdir() if not path.name.startswith(".")]
    assert len(entries) == 1 and sorted(path.name for path in entries[0].iterdir()) == sorted(ONNX_FILES)
    assert all(onnx_cache.fingerprint_of((entries[0] / name).read_bytes()) == entries[0].name for name in ONNX_FILES)
    assert not list(cache.glob(".*.tmp-*")) and not list(cache.glob(".*.old-*"))


@pytest.mark.slow  # exports the ONNX graphs afresh (seconds each)
def test_weights_that_overflow_are_one_line_not_nan_captions(tiny_model, test_images, tmp_path, capsys):
    """Finite weights pass the checkpoint's checks, but 3e38 overflows the logits: one error line, no NaN output."""
    model = Captioner.from_pretrained(tiny_model.save_pretrained(tmp_path / "plain"), engine="torch")
    with torch.no_grad():
        model.decoder.lstm.bias_ih_l0.fill_(100.0)  # every gate saturated: each hidden unit is above 0.76 ...
        model.decoder.output.weight.fill_(3e38)  # ... so every logit overflows, whatever the photo and init
    folder = model.save_pretrained(tmp_path / "overflowing")
    for engine in ("torch", "auto"):
        assert main(["caption", str(test_images[0]), "--model", str(folder), "--engine", engine, "--json"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.strip().splitlines()[-1] == (
            "error: the decoder's next-word scores are NaN or infinite; its weights are unusable"), engine
    with pytest.raises(CheckpointError, match="differs from PyTorch by nan"):
        Captioner.from_pretrained(folder, engine="onnx")


# ---------------------------------------------------------------------------------------- where exports go
def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_replaces_what_is_not_a_checkpoint(exported, tmp_path, capsys):
    runs = tmp_path / "runs"
    source = shutil.copytree(exported, runs / "flickr8k" / "best")
    (runs / "notes.txt").write_text("keep me")
    (runs / "photos").mkdir()
    (runs / "photos" / "a.jpg").write_bytes(b"\xff\xd8 a photo")
    a_file = tmp_path / "model.txt"
    a_file.write_text("a file")
    link = tmp_path / "link"
    link.symlink_to(source)
    before = files_of(tmp_path)
    foreign = "; refusing to replace it, choose a new or empty folder"
    for out, reason in ((runs, "not a captioner checkpoint (holds flickr8k/, notes.txt, photos/)" + foreign),
                        (runs / "flickr8k", "not a captioner checkpoint (holds best/)" + foreign),
                        (a_file, "is a file, not a checkpoint folder; refusing to replace it"),
                        (link, "is a symbolic link; give the checkpoint folder itself")):
        assert main(["export", str(source), str(out), "--half-precision"]) == 2
        assert capsys.readouterr().err == f"error: {out}: {reason}\n"
    with pytest.raises(OutputError, match="holds flickr8k/, notes.txt, photos/"):
        Captioner.from_pretrained(source, engine="torch").save_pretrained(runs)
    assert files_of(tmp_path) == before
    (tmp_path / "empty").mkdir()
    assert main(["export", str(source), str(tmp_path / "empty"), "-q"]) == 0
    assert Captioner.from_pretrained(tmp_path / "empty", engine="torch").caption([]) == []


@pytest.mark.slow  # needs a training run's resumable checkpoint
def test_export_in_place_writes_the_graphs_as_a_set_and_keeps_the_rest(trained_run, tmp_path, capsys):
    folder = shutil.copytree(trained_run / "last", tmp_path / "last")  # a resumable run's checkpoint
    before = files_of(folder)
    assert {"trainer.json", "training_state.safetensors"} <= set(before)
    assert main(["export", str(folder), str(folder), "--format", "onnx", "-q"]) == 0
    after = files_of(folder)
    assert set(after) == set(before) | set(ONNX_FILES)
    assert {name: after[name] for name in before} == before  # weights, vocabulary, training state: byte for byte
    for options in (["--format", "onnx", "--half-precision"], ["--format", "onnx", "--beam-size", "5"], []):
        assert main(["export", str(folder), str(folder), *options]) == 2
        assert "only to add ONNX graphs" in capsys.readouterr().err
    assert files_of(folder) == after


@pytest.fixture
def small_filesystem(tmp_path):
    """``small_filesystem(name, kilobytes)``: a tmpfs of that size mounted under ``tmp_path`` (needs root)."""
    mounted = []

    def mount(name: str, kilobytes: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(point)],
                                capture_output=True, text=True)
        need(result.returncode == 0, f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.slow  # exports the ONNX graphs afresh (seconds each)
@pytest.mark.parametrize("filesystem", ["full", "read-only"])
def test_a_failed_export_leaves_the_checkpoint_as_it_was(exported, small_filesystem, test_images, filesystem, capsys):
    size = sum(p.stat().st_size for p in exported.iterdir())
    disk = small_filesystem("disk", size // 1024 + 256)  # room for the checkpoint, not for its new copy
    folder = shutil.copytree(exported, disk / "model")
    if filesystem == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    before = files_of(folder)
    assert main(["export", str(folder), str(folder), "--format", "onnx"]) == 2
    reason = "No space left on device" if filesystem == "full" else "Read-only file system"
    assert capsys.readouterr().err == f"error: {folder}: checkpoint not saved ({reason}); any previous one is kept\n"
    assert files_of(folder) == before and sorted(p.name for p in disk.iterdir()) == ["model"]
    assert Captioner.from_pretrained(folder, device="cpu").caption(test_images[:1])


# ---------------------------------------------------------------------------------------- the bundled model
@pytest.mark.slow  # 200 Flickr8k photos
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
