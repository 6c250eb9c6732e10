"""Hostile inputs at the inference boundary: images, decoding options, checkpoints, CLI arguments.

Every case is generated here (no committed binaries). Each asserts the one-line error it must get, or,
for the memory cases, a bounded peak measured in a subprocess (a time bound is the subprocess timeout).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from captioner import Captioner, CaptionerError, CheckpointError, ConfigError, GenerationConfig, ImageError
from captioner.cli import main
from captioner.data.images import load_image
from conftest import IN_CI, ROOT, need

PEAK_LIMIT_MB = 2500  # the bundled model captions a photo at about 0.9 GB peak


def run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """``python -m captioner ARGS`` by its own function in this process, for errors raised before any work."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    return subprocess.CompletedProcess(["captioner", *args], code, captured.out, captured.err)


def one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """The process failed with ``status`` and said why on one ``error:`` line, with no traceback."""
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr[-2000:]
    return "\n".join(errors)


@pytest.fixture(scope="module")
def checkpoint_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture()
def copy(checkpoint_dir, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(checkpoint_dir, target)
    return target


def edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------------ images
def png_with_text_chunk(path: Path, text_bytes: int) -> None:
    """A valid 8x8 PNG carrying a compressed text chunk that inflates to ``text_bytes``."""
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    raw = path.read_bytes()
    body = b"Comment\x00\x00" + zlib.compress(b"a" * text_bytes, 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    path.write_bytes(raw[:33] + chunk + raw[33:])


def test_oversized_text_chunk_is_a_corrupt_image(tmp_path):
    png_with_text_chunk(tmp_path / "text.png", 50_000_000)
    with pytest.raises(ImageError, match="text.png: truncated or corrupt"):
        load_image(tmp_path / "text.png")


def test_unreadable_and_overlong_paths_are_image_errors(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="cannot read \\(File name too long\\)"):
        load_image(tmp_path / ("x" * 300 + ".jpg"))
    photo = tmp_path / "locked.png"
    Image.new("RGB", (8, 8)).save(photo)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("captioner.data.images.open", refuse, raising=False)
    with pytest.raises(ImageError, match="locked.png: cannot read \\(Permission denied\\)"):
        load_image(photo)


def test_float_arrays_must_be_in_unit_range():
    with pytest.raises(ImageError, match="must be in \\[0, 1\\], found 0 to 255"):
        load_image(np.linspace(0, 255, 48, dtype=np.float32).reshape(4, 4, 3))
    assert load_image(np.full((4, 4, 3), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)


def thin_ramp(size: tuple[int, int]) -> Image.Image:
    """A ``size`` image whose every row or column along the long side differs from its neighbours, so which part
    of it is kept shows in the pixels."""
    width, height = size
    ramp = (np.arange(max(size)) * 37 % 256).astype(np.uint8)
    colours = np.stack([ramp, 255 - ramp, ramp // 2], -1)
    array = colours[None, :, :] if width > height else colours[:, None, :]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(array, (height, width, 3))))


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (200000, 2)])
def test_thin_images_are_cropped_before_resizing(tiny_model, tmp_path, monkeypatch, size, interpolation):
    """The aspect-ratio limit centre-crops a thin image before anything is resized: no resize ever reads more than
    a 4:1 image (20000 x 1 would otherwise be resized to 5.1M x 256 pixels on the nearest-neighbour path), and the
    pixels out are those of the explicitly centre-cropped image."""
    from dataclasses import replace

    from captioner.models.preprocessing import MAX_ASPECT_RATIO

    path = tmp_path / "thin.png"
    thin_ramp(size).save(path)
    transform = replace(tiny_model.encoder.config.preprocessing, interpolation=interpolation).transform()
    resize, sources = Image.Image.resize, []

    def checked_resize(self, *args, **kwargs):
        sources.append(self.size)
        assert max(self.size) <= MAX_ASPECT_RATIO * min(self.size), f"resized the whole {self.size} image"
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", checked_resize)
    pixels = transform(load_image(path))
    assert sources, "nothing was resized"
    width, height = size
    kept = int(MAX_ASPECT_RATIO * min(size))
    left, top = ((width - kept) // 2, 0) if width > height else (0, (height - kept) // 2)
    cropped = load_image(path).crop((left, top, left + min(width, kept), top + min(height, kept)))
    assert max(cropped.size) == MAX_ASPECT_RATIO * min(cropped.size)
    assert pixels.shape == (3, 224, 224) and torch.equal(pixels, transform(cropped))
    if interpolation == "bilinear":  # the model's own preprocessing
        assert torch.equal(tiny_model.encoder.pixels(path), pixels) and tiny_model.caption(path)


def peak_memory_mb(code: str) -> float:
    """Run ``code`` in a fresh interpreter and return its peak resident memory in MB.

    ``VmHWM``, not ``ru_maxrss``: the latter keeps the peak of the process it was forked from (pytest's)."""
    script = code + ("\nimport re; from pathlib import Path\n"
                     "print('PEAK', int(re.search(r'VmHWM:\\s*(\\d+)', Path('/proc/self/status').read_text())[1]) / 1024)")
    result = run("-c", script)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.split("PEAK")[-1])


@pytest.mark.slow
def test_worst_thin_image_and_widest_options_stay_within_memory(tmp_path):
    """200000x2 pixels would need ~26 GB resized naively; the bundled model with the largest allowed
    beam, n-best and length must stay near its usual footprint."""
    thin = tmp_path / "thin.png"
    Image.new("RGB", (200_000, 2), (10, 10, 200)).save(thin)
    photos = [str(thin)] * 4 + sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.jpg"))
    peak = peak_memory_mb(
        "from captioner import Captioner\n"
        "model = Captioner.from_pretrained(device='cpu')\n"
        f"result = model.generate({photos!r}, beam_size=64, num_return_sequences=64, max_length=100, min_length=100)\n"
        "assert len(result) == len(" + repr(photos) + ") and all(len(r) == 64 for r in result)\n")
    print(f"peak memory, worst thin image and widest decoding: {peak:.0f} MB")
    assert peak < PEAK_LIMIT_MB


# ------------------------------------------------------------------------------------------------ decoding options
BAD_OPTIONS = [
    (dict(beam_size=200_000), "beam_size must be between 1 and 64"),
    (dict(beam_size=2.5), "beam_size must be an integer, not 2.5"),
    (dict(beam_size="3"), "beam_size must be an integer, not '3'"),
    (dict(beam_size=True), "beam_size must be an integer, not True"),
    (dict(strategy="sample", num_return_sequences=100_000), "num_return_sequences must be between 1 and 64"),
    (dict(strategy="greedy", max_length=10_000_000, min_length=10_000_000), "max_length must be between 1 and 100"),
    (dict(min_length=30, max_length=20), "min_length cannot exceed max_length"),
    (dict(strategy="sample", temperature=math.inf), "temperature must be a finite number"),
    (dict(strategy="sample", temperature=math.nan), "temperature must be a finite number"),
    (dict(strategy="sample", temperature=-1.0), "temperature must be between"),
    (dict(strategy="sample", seed=99999999999999999999999), "seed must be between 0 and"),
    (dict(strategy="sample", seed=-1), "seed must be between 0 and"),
    (dict(length_penalty=math.inf), "length_penalty must be a finite number"),
    (dict(length_penalty=50.0), "length_penalty must be between -5.0 and 5.0"),
    (dict(top_k=-1), "top_k must be between 0"),
    (dict(top_p=0.0), "top_p must be between"),
    (dict(no_repeat_ngram_size=1000), "no_repeat_ngram_size must be between 0 and 10"),
    (dict(suppress_unk="yes"), "suppress_unk must be true or false"),
    (dict(strategy="Beam"), "strategy must be one of beam, greedy, sample"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_decoding_options_are_typed_and_bounded(tiny_model, options, message):
    features = torch.zeros(1, tiny_model.encoder.config.feature_size)
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace(".", "\\.")) as error:
        tiny_model.generate(features, **options)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError):
        GenerationConfig(**options)


def test_more_captions_than_beams_widens_the_beam_unless_a_beam_size_is_given(tiny_model):
    """n captions without a beam size widen the beam to n; a beam size smaller than n is refused, as Hugging
    Face refuses it, rather than quietly changed."""
    with pytest.raises(ConfigError, match=r"num_return_sequences \(5\) cannot exceed beam_size \(2\)"):
        GenerationConfig(beam_size=2, num_return_sequences=5)
    features = torch.zeros(1, tiny_model.encoder.config.feature_size)
    narrow = tiny_model.generation_config.updated(beam_size=2)
    with pytest.raises(ConfigError, match="cannot exceed beam_size"):
        tiny_model.generate(features, narrow, beam_size=2, num_return_sequences=4)
    nbest = tiny_model.generate(features, narrow, num_return_sequences=4)[0]
    assert narrow.updated(num_return_sequences=4).beam_size == 4
    assert [c.text for c in nbest] == [c.text for c in tiny_model.generate(features, beam_size=4,
                                                                              num_return_sequences=4)[0]]


@pytest.mark.parametrize("batch_size", [0, -1, 10**9, 2.0, True])
def test_batch_size_is_bounded(tiny_model, batch_size):
    features = torch.zeros(2, tiny_model.encoder.config.feature_size)
    with pytest.raises(ConfigError, match="batch_size must be"):
        tiny_model.generate(features, batch_size=batch_size)
    with pytest.raises(ConfigError, match="batch_size must be"):
        tiny_model.encode([np.zeros((8, 8, 3), np.uint8)], batch_size=batch_size)


def test_feature_rows_are_checked_or_converted(tiny_model):
    width = tiny_model.encoder.config.feature_size
    good = tiny_model.encode([np.zeros((16, 16, 3), np.uint8)])
    assert tiny_model.caption(good.half()) == tiny_model.caption(good)  # float16 rows are converted
    for rows, message in ((torch.full((1, width), math.nan), "NaN or infinite"),
                          (torch.full((1, width), math.inf), "NaN or infinite"),
                          (torch.zeros(1, width, dtype=torch.long), "floating point"),
                          (torch.zeros(1, width + 1), "columns")):
        with pytest.raises(ConfigError, match=message):
            tiny_model.generate(rows)


# ------------------------------------------------------------------------------------------------ checkpoints
CRAFTED_CONFIGS = [
    (lambda c: c["decoder"].update(hidden_size=4096), "weights do not match config.json: shape of"),
    (lambda c: c["decoder"].update(hidden_size=10**6), "hidden_size must be between 1 and 8192"),
    (lambda c: c["decoder"].update(vocab_size=10**7), "vocab_size must be between"),
    (lambda c: c["decoder"].update(hidden_size=-5), "hidden_size must be between"),
    (lambda c: c["decoder"].update(hidden_size=0), "hidden_size must be between"),
    (lambda c: c["decoder"].update(hidden_size="128"), "hidden_size must be an integer"),
    (lambda c: c["decoder"].update(hidden_size=128.0), "hidden_size must be an integer"),
    (lambda c: c["decoder"].update(num_layers=100), "num_layers must be between"),
    (lambda c: c["decoder"].update(dropout=5), "dropout must be between"),
    (lambda c: c["decoder"].update(surprise=1), r"decoder: unknown field\(s\) surprise"),
    (lambda c: c["decoder"].update(feature_size=512), "expects 512-d features"),
    (lambda c: c["encoder"]["preprocessing"].update(interpolation="foo"), "interpolation must be one of"),
    (lambda c: c["encoder"]["preprocessing"].update(std=[0, 0, 0]), "std\\[0\\] must be between"),
    (lambda c: c["encoder"]["preprocessing"].update(mean=[0.5]), "mean must be a list of 3 numbers"),
    (lambda c: c["encoder"]["preprocessing"].update(crop_size=0), "crop_size must be between"),
    (lambda c: c["encoder"]["preprocessing"].update(resize_size=60000), "resize_size must be between"),
    (lambda c: c["encoder"]["preprocessing"].update(crop_size=300, resize_size=256), "crop_size cannot exceed"),
    (lambda c: c["encoder"].update(feature_size=99), "feature_size of mobilenet_v2 is 1280"),
    (lambda c: c["encoder"].update(name=["mobilenet_v2"]), "unknown encoder"),
    (lambda c: c["generation"].update(beam_size=100_000), "beam_size must be between"),
    (lambda c: c["generation"].update(max_length=10**7), "max_length must be between"),
    (lambda c: c["generation"].update(temperature=-1), "temperature must be between"),
    (lambda c: c["generation"].update(unknown=1), "unknown decoding option"),
    (lambda c: c.update(generation=[1, 2]), "must be an object of decoding options"),
    (lambda c: c.update(encoder="mobilenet_v2"), "encoder: must be an object"),
]


@pytest.mark.parametrize("change, message", CRAFTED_CONFIGS, ids=[m for _, m in CRAFTED_CONFIGS])
def test_crafted_config_is_refused_before_anything_is_built(copy, monkeypatch, change, message):
    edit_config(copy, change)
    monkeypatch.setattr("captioner.models.captioner.Decoder", lambda *a, **k: pytest.fail("built a decoder from a bad config"))
    monkeypatch.setattr("captioner.models.captioner.Encoder", lambda *a, **k: pytest.fail("built an encoder from a bad config"))
    with pytest.raises(CheckpointError, match=message) as error:
        Captioner.from_pretrained(copy, device="cpu")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["config.json", "vocab.json"])
def test_deeply_nested_json_is_refused(copy, name):
    (copy / name).write_text('{"words": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError, match=f"{name}: .*nested too deeply"):
        Captioner.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("weights", ["../../../../etc/passwd", "payload.dat", "weights.dat", "/etc/hostname",
                                     "ResNet50_Weights.IMAGENET1K_V1", "file:abc", 42, None])
def test_encoder_weights_are_an_identity_never_a_path(copy, weights):
    """A checkpoint cannot make the loader read a file outside it, or any file under a name it chooses."""
    tensors_only = {"x": torch.zeros(2)}
    torch.save(tensors_only, copy / "weights.dat")
    (copy / "payload.dat").write_bytes(b"\x80\x04K\x01.")
    edit_config(copy, lambda c: c["encoder"].update(weights=weights))
    with pytest.raises(CheckpointError, match="are not an id of mobilenet_v2 weights"):
        Captioner.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t["output.weight"].fill_(math.nan), "output.weight holds NaN or infinite values"),
    (lambda t: t["embedding.weight"].fill_(math.inf), "embedding.weight holds NaN or infinite values"),
    (lambda t: t.update({"output.bias": t["output.bias"].long()}), "output.bias is torch.int64"),
])
def test_non_finite_or_non_float_weights_are_refused(copy, corrupt, message):
    tensors = load_file(str(copy / "model.safetensors"))
    corrupt(tensors)
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        Captioner.from_pretrained(copy, device="cpu")


def test_stored_encoder_weights_are_checked_too(copy, tiny_model):
    state = {k: v.clone() for k, v in tiny_model.encoder.backbone.state_dict().items()}
    state["features.0.0.weight"].fill_(math.nan)
    save_file(state, str(copy / "encoder.safetensors"))
    with pytest.raises(CaptionerError, match="features.0.0.weight holds NaN"):
        Captioner.from_pretrained(copy, device="cpu")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
# Values at and just past the documented bounds, where a wrongly accepted value hides best.
EDGES = st.sampled_from([-1, 0, 1e-5, 0.5, 0.99, 1, 1.5, 4, 5, 5.5, -5.5, 10, 11, 64, 65, 100, 100.5, 101, 1000,
                         1_000_001, 8193, 2**63, True, "beam", "Beam", "bicubic", [0.5, 0.5, 0.5], [0, 0, 0]])
FIELDS = {"generation": ["strategy", "beam_size", "num_return_sequences", "max_length", "min_length", "length_penalty",
                         "no_repeat_ngram_size", "suppress_unk", "temperature", "top_k", "top_p", "seed"],
          "decoder": ["embed_size", "hidden_size", "num_layers", "dropout", "input_dropout", "vocab_size"],
          "encoder": ["name", "weights", "feature_size", "preprocessing"]}
# The documented bounds (README, --help), written out here rather than read from the code that enforces them.
GENERATION_BOUNDS = {"beam_size": ("int", 1, 64), "num_return_sequences": ("int", 1, 64), "max_length": ("int", 1, 100),
                     "min_length": ("int", 0, 100), "length_penalty": ("float", -5, 5),
                     "no_repeat_ngram_size": ("int", 0, 10), "temperature": ("float", 1e-4, 100),
                     "top_k": ("int", 0, 1_000_000), "top_p": ("float", 1e-9, 1), "seed": ("int", 0, 2**63 - 1)}
DECODER_BOUNDS = {"dropout": ("float", 0, 0.99), "input_dropout": ("float", 0, 0.99)}
PREPROCESSING_BOUNDS = {"resize_size": ("int", 16, 1024), "crop_size": ("int", 16, 1024)}


def assert_within(where: str, value, kind: str, low, high) -> None:
    typed = (type(value) is int) if kind == "int" else (type(value) in (int, float) and math.isfinite(value))
    assert typed and low <= value <= high, f"{where} = {value!r} was accepted (documented: {kind} in [{low}, {high}])"


def assert_documented_bounds(loaded: dict, saved: dict) -> None:
    """What a checkpoint loaded with satisfies the documented bounds; what the weights fix is unchanged."""
    generation = loaded["generation"]
    assert generation["strategy"] in ("beam", "greedy", "sample") and type(generation["suppress_unk"]) is bool
    for key, bounds in GENERATION_BOUNDS.items():
        if not (key == "seed" and generation[key] is None):
            assert_within(f"generation.{key}", generation[key], *bounds)
    assert generation["min_length"] <= generation["max_length"]
    for key in ("feature_size", "vocab_size", "embed_size", "hidden_size", "num_layers", "members"):
        assert loaded["decoder"][key] == saved["decoder"][key] and type(loaded["decoder"][key]) is int, key
    for key, bounds in DECODER_BOUNDS.items():
        assert_within(f"decoder.{key}", loaded["decoder"][key], *bounds)
    encoder = loaded["encoder"]
    assert {k: encoder[k] for k in ("name", "feature_size")} == {k: saved["encoder"][k] for k in ("name", "feature_size")}
    preprocessing = encoder["preprocessing"]
    for key, bounds in PREPROCESSING_BOUNDS.items():
        assert_within(f"preprocessing.{key}", preprocessing[key], *bounds)
    assert preprocessing["crop_size"] <= preprocessing["resize_size"]
    assert preprocessing["interpolation"] in ("bilinear", "bicubic", "nearest")
    for key, low in (("mean", -10), ("std", 1e-3)):
        assert len(preprocessing[key]) == 3
        for i, number in enumerate(preprocessing[key]):
            assert_within(f"preprocessing.{key}[{i}]", number, "float", low, 10)


def just_outside(kind: str, low, high) -> list:
    step = 1 if kind == "int" else max(abs(high - low) * 1e-3, 1e-9)
    return [low - step, high + step] + ([float(low), True] if kind == "int" else ["1"])


OUT_OF_BOUNDS = [(section, key, value) for section, table in (("generation", GENERATION_BOUNDS),
                                                              ("decoder", DECODER_BOUNDS))
                 for key, bounds in table.items() for value in just_outside(*bounds)]


@pytest.mark.parametrize("section, key, value", OUT_OF_BOUNDS, ids=[f"{s}.{k}={v!r}" for s, k, v in OUT_OF_BOUNDS])
def test_each_value_just_outside_its_documented_bounds_is_refused(copy, section, key, value):
    """The fuzz below draws at random; this tries every bounded field just past each end (and the wrong type)."""
    edit_config(copy, lambda c: c[section].update({key: value}))
    with pytest.raises(CheckpointError, match=key):
        Captioner.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "vocab.json", "encoder.safetensors"])
def test_checkpoint_files_may_link_within_their_folder_never_outside(checkpoint_dir, tmp_path, name):
    folder = shutil.copytree(checkpoint_dir, tmp_path / "linked")
    outside = tmp_path / "outside"
    outside.write_bytes((folder / name).read_bytes() if (folder / name).is_file() else b"anything")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"^{folder}: {name} is a link to a file outside the checkpoint folder"):
        Captioner.from_pretrained(folder, device="cpu", engine="torch")
    if name != "encoder.safetensors":  # a link that stays inside is fine
        (folder / name).unlink()
        (folder / "weights").mkdir()
        shutil.move(outside, folder / "weights" / name)
        (folder / name).symlink_to(Path("weights") / name)
        assert Captioner.from_pretrained(folder, device="cpu", engine="torch").caption([]) == []


@settings(max_examples=60 if IN_CI else 30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(sorted(FIELDS)), data=st.data(), value=JSON_VALUES | EDGES)
def test_fuzzed_config_loads_within_its_bounds_or_raises_a_captioner_error(checkpoint_dir, tmp_path_factory, section,
                                                                           data, value):
    """Any value in any field: a one-line CaptionerError, or a model whose configuration keeps the documented bounds
    (a bad value wrongly accepted fails here even when the model still captions)."""
    target = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(checkpoint_dir, target)
    key = data.draw(st.sampled_from(FIELDS[section]))
    edit_config(target, lambda c: c[section].update({key: value}))
    try:
        model = Captioner.from_pretrained(target, device="cpu")
    except CaptionerError as error:
        assert "\n" not in str(error)
    else:
        assert_documented_bounds(model.config.to_dict(), json.loads((checkpoint_dir / "config.json").read_text()))
        captions = model.caption(torch.zeros(1, model.encoder.config.feature_size))  # a batch of one row
        assert len(captions) == 1 and isinstance(captions[0], str)


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture()
def bad_and_good(tmp_path, synthetic) -> list[Path]:
    thin, text, long_name = tmp_path / "thin.png", tmp_path / "text.png", tmp_path / ("y" * 300 + ".png")
    Image.new("RGB", (20000, 1)).save(thin)
    png_with_text_chunk(text, 50_000_000)
    good = sorted((synthetic / "images").glob("test_*.png"))[0]
    return [text, long_name, thin, good]


@pytest.mark.slow
def test_cli_reports_and_skips_unreadable_files(checkpoint_dir, bad_and_good):
    text, long_name, thin, good = bad_and_good
    result = run("-m", "captioner", "caption", "--model", str(checkpoint_dir), *map(str, bad_and_good))
    errors = one_line_error(result, status=1)
    assert "text.png: truncated or corrupt" in errors and "File name too long" in errors
    assert "2 of 4 images could not be captioned" in errors
    captioned = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert captioned == [str(thin), str(good)]


@pytest.mark.slow
def test_cli_skips_a_file_without_read_permission(checkpoint_dir, synthetic, tmp_path):
    need(os.getuid() != 0 or shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to test as root")
    locked = tmp_path / "locked.png"
    shutil.copy(sorted((synthetic / "images").glob("test_*.png"))[1], locked)
    locked.chmod(0)
    good = sorted((synthetic / "images").glob("test_*.png"))[0]
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.getuid() == 0 else []
    result = subprocess.run([*prefix, sys.executable, "-m", "captioner", "caption", "--model", str(checkpoint_dir),
                             str(locked), str(good)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert "locked.png: cannot read (Permission denied)" in one_line_error(result, status=1)
    assert result.stdout.startswith(f"{good}\t")


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "-1"], "batch_size must be between 1 and 4096, not -1"),
    (["--batch-size", "0"], "batch_size must be between 1 and 4096, not 0"),
    (["--beam-size", "200000"], "beam_size must be between 1 and 64"),
    (["--temperature", "inf", "--strategy", "sample"], "temperature must be a finite number"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--device", "banana"], "unknown device 'banana'"),
])
def test_cli_usage_mistakes_exit_2_before_any_work(checkpoint_dir, synthetic, capsys, args, message):
    good = sorted((synthetic / "images").glob("test_*.png"))[0]
    assert message in one_line_error(in_process(capsys, "caption", "--model", str(checkpoint_dir), str(good), *args))


@pytest.mark.slow
def test_file_names_that_are_not_utf8_print_on_a_strict_stdout(checkpoint_dir, synthetic, tmp_path):
    """Tab output writes a name as its bytes; the error line on stderr escapes it; no UnicodeEncodeError."""
    good, bad = tmp_path / os.fsdecode(b"caf\xe9.png"), tmp_path / os.fsdecode(b"\xffbroken.jpg")
    shutil.copy(sorted((synthetic / "images").glob("test_*.png"))[0], good)
    bad.write_bytes(b"not an image")
    result = subprocess.run([sys.executable, "-m", "captioner", "caption", "-q", "--model", str(checkpoint_dir),
                             str(good), str(bad)], cwd=ROOT, capture_output=True, timeout=240,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 1 and b"Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.startswith(os.fsencode(good) + b"\t") and result.stdout.count(b"\n") == 1
    errors = result.stderr.decode("ascii").splitlines()
    assert errors[0].startswith("error: ") and errors[0].endswith("\\udcffbroken.jpg: not an image "
                                                                    "(unrecognised file format)"), errors
    assert errors[1:] == ["error: 1 of 2 images could not be captioned"]


@pytest.mark.slow
def test_files_from_a_device_is_refused_unread():
    """/dev/zero as the list once grew to 2.8 GB before being refused; now it is refused before any read."""
    peak = peak_memory_mb(
        "from captioner import ConfigError\n"
        "from captioner.bulk.inputs import read_file_list\n"
        "try:\n"
        "    read_file_list('/dev/zero')\n"
        "except ConfigError as error:\n"
        "    assert str(error).startswith('--files-from /dev/zero: file list is not a regular file (a device)')\n")
    print(f"peak memory, --files-from /dev/zero: {peak:.0f} MB")
    assert peak < 1500  # importing the package takes about 700 MB; reading to the bound, 2 GiB more


FILES_FROM_STANDARD_INPUT = """
import re, sys
from pathlib import Path
from captioner.cli import main
import captioner.bulk.captioning, captioner.models.captioner  # what the command loads anyway, before the baseline

peak = lambda: int(re.search(r"VmHWM:\\s*(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024
before = peak()
status = main(["caption", "--files-from", "-", "-q"])
print("STATUS", status, "GREW", peak() - before)
"""


@pytest.mark.slow  # a process each
@pytest.mark.parametrize("source, error", [
    ("< /dev/zero", "--files-from standard input: file list is not a regular file (a device); give a file, a pipe or -"),
    ("head -c 100000000 /dev/zero |", "--files-from standard input: line 1 holds a NUL byte; expected one path per line"),
    ("tr '\\0' a < /dev/zero | head -c 100000000 |",
     "--files-from standard input: line 1 is longer than 4096 bytes; expected one path per line")])
def test_files_from_standard_input_is_refused_at_its_first_bad_line(source, error):
    """A device as standard input is refused unread, like a named one; a stream at its first bad line, not after
    the list's 2 GiB bound (``< /dev/zero`` once read 2 GiB, peaking at 2.8 GB, before the refusal)."""
    result = subprocess.run(["bash", "-c", f'{source} "$0" -c "$1"', sys.executable, FILES_FROM_STANDARD_INPUT],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"error: {error}"]
    words = result.stdout.split()
    assert words[:2] == ["STATUS", "2"] and float(words[3]) < 20, result.stdout  # MB: one line read, not 100 MB


def test_cli_missing_path_is_a_usage_mistake(checkpoint_dir, tmp_path, capsys):
    result = in_process(capsys, "caption", "--model", str(checkpoint_dir), str(tmp_path / "nope.jpg"))
    assert "nope.jpg: no such file or folder" in one_line_error(result)


@pytest.fixture()
def evaluate_in_process(tmp_path, monkeypatch, capsys):
    """``evaluate_in_process(*ARGS)``: ``captioner evaluate ARGS`` in this process with a model loader that fails
    the test if reached; returns (exit status, stdout, stderr)."""
    def no_model(*args, **kwargs):
        pytest.fail("a model was loaded before the output files were checked")

    monkeypatch.setattr(Captioner, "from_pretrained", no_model)

    def run_evaluate(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["evaluate", "--images", str(tmp_path / "images"), "--captions", str(tmp_path / "captions.json"),
                     *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run_evaluate


def test_evaluate_output_files_are_checked_before_any_captioning(evaluate_in_process, tmp_path):
    parent_file = tmp_path / "notes.txt"
    parent_file.write_text("not a folder")
    cases = [
        (["--out", str(tmp_path)], f"--out {tmp_path}: not a regular file"),
        (["--predictions", str(tmp_path)], f"--predictions {tmp_path}: not a regular file"),
        (["--out", "/dev/null"], "--out /dev/null: not a regular file"),
        (["--out", str(parent_file / "metrics.json")], f"--out {parent_file}: is a file, not a folder"),
        (["--predictions", "/proc/predictions.json"], "--predictions /proc: cannot write there"),
        (["--out", str(tmp_path / "same.json"), "--predictions", str(tmp_path / "same.json")],
         f"--predictions {tmp_path / 'same.json'} is also --out; choose another file"),
        (["--out", str(tmp_path / "captions.json")], f"--out {tmp_path / 'captions.json'} is also --captions"),
    ]
    for args, message in cases:
        code, out, err = evaluate_in_process(*args)
        assert (code, out) == (2, "") and err.startswith(f"error: {message}") and err.count("\n") == 1, (args, err)
    assert parent_file.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


RESULT = {"metrics": {"BLEU-4": 0.25, "images": 2, "engine": "torch"},
          "predictions": [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"}]}


def test_evaluate_creates_missing_folders_and_writes_whole_files(evaluate_in_process, tmp_path, monkeypatch):
    monkeypatch.setattr("captioner.bulk.evaluation.evaluate", lambda *args, **kwargs: RESULT)
    out, predictions = tmp_path / "new" / "deeper" / "metrics.json", tmp_path / "other" / "predictions.json"
    code, stdout, err = evaluate_in_process("--out", str(out), "--predictions", str(predictions))
    assert (code, err) == (0, "") and "BLEU-4  0.2500" in stdout
    assert json.loads(out.read_text()) == RESULT["metrics"]
    assert json.loads(predictions.read_text()) == RESULT["predictions"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json"]  # no temporary, no probe left


def test_evaluate_write_failure_is_one_line_and_keeps_the_previous_file(evaluate_in_process, tmp_path, monkeypatch):
    monkeypatch.setattr("captioner.bulk.evaluation.evaluate", lambda *args, **kwargs: RESULT)
    out = tmp_path / "metrics.json"
    out.write_text('{"BLEU-4": 0.1}\n')

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    code, stdout, err = evaluate_in_process("--out", str(out))
    assert (code, err) == (2, f"error: --out {out}: cannot write (No space left on device)\n")
    assert "BLEU-4  0.2500" in stdout  # the scores were printed before the file failed
    assert out.read_text() == '{"BLEU-4": 0.1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_evaluate_with_a_bad_batch_size_exits_at_once(checkpoint_dir, synthetic, capsys):
    result = in_process(capsys, "evaluate", "--model", str(checkpoint_dir), "--images", str(synthetic / "images"),
                        "--captions", str(synthetic / "test.json"), "--batch-size", "-1")
    assert "batch_size must be between" in one_line_error(result)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["app.py", "train.py"])
def test_unavailable_device_is_one_line_in_every_entry_point(entry, synthetic, tmp_path):
    device = "tpu" if torch.cuda.is_available() else "cuda"
    args = [] if entry == "app.py" else ["--images", str(synthetic / "images"), "--train-captions",
                                         str(synthetic / "train.json"), "--out", str(tmp_path / "run")]
    result = run(entry, *args, "--device", device, timeout=120)
    assert "device" in one_line_error(result)
