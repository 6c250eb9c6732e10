"""Hostile inputs on the training side (issue 11): each is a one-line CaptionerError, never a traceback,
and no run loses another's work. Every bad file is generated here; CLI runs must exit 2 with one
``error: ...`` line on stderr."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from captioner import checkpoint
from captioner.checkpoint import atomic_directory
from captioner.data.annotations import load_captions
from captioner.distributed import Distributed
from captioner.models.encoder import Encoder
from captioner.errors import CheckpointError, ConfigError, DataError, OutputError
from captioner.train.features import FeatureCache, extract_features
from captioner.train.run_folder import claim_output
from captioner.train.config import TrainConfig
from captioner.train.trainer import train
from conftest import ROOT, need, synthetic_config


SMALL = dict(encoder="resnet18", encoder_weights="none", epochs=1, embed_size=16, hidden_size=32, batch_size=32)


def small_config(synthetic, out, cache, **overrides) -> TrainConfig:
    return synthetic_config(synthetic, out, cache, **{**SMALL, **overrides})


def cli_args(synthetic, out, cache, *extra: str) -> list[str]:
    return ["--images", str(synthetic / "images"), "--train-captions", str(synthetic / "train.json"),
            "--val-captions", str(synthetic / "val.json"), "--out", str(out), "--encoder", "resnet18",
            "--encoder-weights", "none", "--embed-size", "16", "--hidden-size", "32", "--batch-size", "32",
            "--epochs", "1", "--patience", "0", "--min-word-count", "1", "--feature-cache", str(cache),
            "--device", "cpu", "--quiet", *extra]


def run_train(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def random_encoder() -> Encoder:
    """The encoder a run with ``--encoder resnet18 --encoder-weights none --seed 0`` builds."""
    torch.manual_seed(0)
    return Encoder.pretrained("resnet18", "none")


def train_images(synthetic, count: int) -> list[Path]:
    return sorted((synthetic / "images").glob("train_*.png"))[:count]


# ------------------------------------------------------------------------------------------------ 1. losing work
@pytest.mark.slow  # trains a model or runs subprocesses
def test_second_training_on_the_same_out_fails_fast_naming_the_first(synthetic, feature_cache, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *cli_args(synthetic, out, feature_cache, "--epochs", "500")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if (out / ".lock").is_file() and (out / ".lock").read_text().strip() == str(first.pid):
                break
            time.sleep(0.1)
        second = run_train(*cli_args(synthetic, out, feature_cache))
        assert first.poll() is None, "the first training ended before the second started"
        assert_one_line_error(second, f"--out {out}: another training (pid {first.pid}) is writing there")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with claim_output(small_config(synthetic, out, feature_cache), Distributed()):  # SIGKILL released the lock
        with pytest.raises(OutputError, match=rf"another training \(pid {os.getpid()}\)"):
            train(small_config(synthetic, out, feature_cache))


CONCURRENT_WRITER = """
import os, sys, time
from pathlib import Path
from captioner.checkpoint import atomic_directory

target, go = Path(sys.argv[1]), Path(sys.argv[2])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
for i in range(25):
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text(f"{os.getpid()}-{i}")
        (staging / "weights.bin").write_bytes(os.urandom(1 << 18))
        (staging / "b.txt").write_text(f"{os.getpid()}-{i}")
"""


@pytest.mark.slow  # trains a model or runs subprocesses
def test_concurrent_saves_to_one_path_all_succeed_and_the_last_wins(tmp_path):
    target, go = tmp_path / "best", tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(target), str(go)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(writers) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()  # all three start saving together
    results = [(w.wait(timeout=300), w.stderr.read()) for w in writers]
    assert all(code == 0 for code, _ in results), results
    assert (target / "a.txt").read_text() == (target / "b.txt").read_text()  # one writer's files, never a mixture
    assert not list(tmp_path.glob(".best.tmp-*")) and not list(tmp_path.glob(".best.old-*"))


@pytest.mark.slow  # trains a model or runs subprocesses
def test_only_temporaries_of_dead_writers_are_cleaned(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        filling = tmp_path / f".best.tmp-{alive.pid}-0a1b2c3d"  # another writer, still at work
        killed = [tmp_path / f".best.tmp-{int(dead.stdout)}-0a1b2c3d", tmp_path / f".best.tmp-{int(dead.stdout)}"]
        for folder in (filling, *killed):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"partial")
        with atomic_directory(tmp_path / "best") as staging:
            (staging / "config.json").write_text("{}")
        assert (filling / "model.safetensors").is_file()
        assert not any(folder.exists() for folder in killed)
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------------------------------------ 2. resumable extraction
SLOW_EXTRACTION = """
import sys, time
import torch
import captioner.train.features as features
from captioner.models.encoder import Encoder

pixels = Encoder.pixels
Encoder.pixels = lambda self, *args, **kwargs: (time.sleep(0.1), pixels(self, *args, **kwargs))[1]
torch.manual_seed(0)
encoder = Encoder.pretrained("resnet18", "none")
features.FeatureCache(sys.argv[1], encoder).get(sys.argv[2:], batch_size=4, progress=False, flush_every=8)
"""


@pytest.mark.slow  # trains a model or runs subprocesses
def test_extraction_killed_midway_resumes_from_its_last_flush(synthetic, tmp_path):
    cache_dir, paths = tmp_path / "cache", train_images(synthetic, 48)
    process = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACTION, str(cache_dir), *map(str, paths)], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None and not list(cache_dir.glob("*.part-*.safetensors")):
        time.sleep(0.05)
    assert process.poll() is None, f"extraction ended before it could be killed: {process.stderr.read()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()

    encoder = random_encoder()
    cache = FeatureCache(cache_dir, encoder)
    features, encoded, unreadable = cache.get(paths, progress=False, flush_every=8)
    distinct = len({p.read_bytes() for p in paths})
    assert 0 < encoded < distinct and not unreadable  # only what the killed run had not flushed
    assert torch.allclose(features[:4], extract_features(encoder, paths[:4], progress=False), atol=1e-5)
    assert cache.get(paths, progress=False)[1] == 0
    assert sorted(cache_dir.iterdir()) == [cache.path]  # parts merged, the killed writer's temporary removed


# ------------------------------------------------------------------------------------------------ 3. undecodable images
@pytest.fixture
def flawed(synthetic, tmp_path) -> Path:
    """20 synthetic training images, two truncated halfway and one not an image at all."""
    folder = tmp_path / "flawed"
    (folder / "images").mkdir(parents=True)
    data = json.loads((synthetic / "train.json").read_text())
    chosen = data["images"][:20]
    for image in chosen:
        shutil.copy(synthetic / "images" / image["file_name"], folder / "images" / image["file_name"])
    for image in chosen[:2]:
        path = folder / "images" / image["file_name"]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (folder / "images" / chosen[2]["file_name"]).write_bytes(b"not an image at all")
    ids = {image["id"] for image in chosen}
    (folder / "train.json").write_text(json.dumps(
        {"images": chosen, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    return folder


def flawed_config(flawed, synthetic, tmp_path, cache, **overrides) -> TrainConfig:
    return small_config(synthetic, tmp_path / "out", cache, images=str(flawed / "images"),
                        train_captions=str(flawed / "train.json"), val_images=str(synthetic / "images"), **overrides)


@pytest.mark.slow  # trains a model or runs subprocesses
def test_undecodable_images_stop_training_in_one_line_and_keep_the_rest_encoded(flawed, synthetic, tmp_path,
                                                                                train_in_process):
    cache = tmp_path / "cache"
    result = train_in_process(*cli_args(synthetic, tmp_path / "out", cache, "--images", str(flawed / "images"),
                                        "--train-captions", str(flawed / "train.json"), "--val-images",
                                        str(synthetic / "images")))
    first_bad = sorted(flawed.glob("images/*.png"))[0]
    assert_one_line_error(result, "3 of 20 images cannot be read", f"{first_bad}: truncated or corrupt",
                          "--skip-invalid")
    good = sorted(flawed.glob("images/*.png"))[3:]
    assert FeatureCache(cache, random_encoder()).get(good, progress=False).encoded == 0


@pytest.mark.slow  # trains a model or runs subprocesses
def test_skip_invalid_trains_without_undecodable_images(flawed, synthetic, feature_cache, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="captioner")
    train(flawed_config(flawed, synthetic, tmp_path, feature_cache, skip_invalid=True))
    assert "skipped 3 image(s) that cannot be read (--skip-invalid)" in caplog.text
    saved = json.loads((tmp_path / "out" / "last" / "trainer.json").read_text())
    assert saved["progress"]["epoch"] == 1


@pytest.mark.slow  # trains a model or runs subprocesses
def test_all_images_undecodable_is_a_data_error(flawed, synthetic, feature_cache, tmp_path):
    for path in flawed.glob("images/*.png"):
        path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="none of the 20 images can be read"):
        train(flawed_config(flawed, synthetic, tmp_path, feature_cache, skip_invalid=True))


# ------------------------------------------------------------------------------------------------ 4. --out problems
def test_out_that_is_a_file_or_below_one_fails_before_any_work(synthetic, tmp_path, train_in_process):
    occupied = tmp_path / "occupied"
    occupied.write_text("not a folder")
    cache = tmp_path / "cache"
    assert_one_line_error(train_in_process(*cli_args(synthetic, occupied, cache)),
                          f"--out {occupied}: is a file, not a folder")
    below = occupied / "run"
    assert_one_line_error(train_in_process(*cli_args(synthetic, below, cache)),
                          f"--out {below}: cannot write there (Not a directory)")
    assert_one_line_error(train_in_process(*cli_args(synthetic, tmp_path / "run", occupied)),
                          f"--feature-cache {occupied}: is a file, not a folder")
    assert not cache.exists() and occupied.read_text() == "not a folder"


def test_out_that_is_a_checkpoint_folder_is_refused_before_any_work(synthetic, tiny_model_dir, tmp_path,
                                                                    train_in_process):
    """``--out assets/model`` (or a run's ``best/``) once got best/, last/, logs and locks among its files."""
    checkpoints = {"model": tmp_path / "model", "weights-only": tmp_path / "weights-only"}
    shutil.copytree(tiny_model_dir, checkpoints["model"])
    checkpoints["weights-only"].mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", checkpoints["weights-only"])
    cache = tmp_path / "cache"
    for kind, out in checkpoints.items():
        before = _snapshot(out)
        result = train_in_process(*cli_args(synthetic, out, cache))
        assert_one_line_error(result, f"--out {out}: is a checkpoint folder (it holds ", "not a training run's")
        assert _snapshot(out) == before, kind  # nothing written, not even the lock
    assert not cache.exists()  # refused before the feature cache (or the data) was touched


def test_out_that_is_new_empty_or_an_earlier_run_is_claimed(synthetic, tiny_model_dir, tmp_path):
    earlier = tmp_path / "earlier"
    for name in ("best", "last"):
        shutil.copytree(tiny_model_dir, earlier / name)
    (earlier / "log.jsonl").write_text("{}\n")
    (earlier / "tensorboard").mkdir()
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", earlier):
        with claim_output(small_config(synthetic, out, tmp_path / "cache"), Distributed()):
            assert (out / ".lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("link", ["tensorboard", "training.png", ".lock"])
def test_a_link_in_out_is_refused_never_written_through(synthetic, tmp_path, train_in_process, link):
    """A linked ``OUT/tensorboard`` once received the run's TensorBoard events wherever it pointed."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / link).symlink_to(elsewhere if link == "tensorboard" else elsewhere / "file")
    result = train_in_process(*cli_args(synthetic, out, tmp_path / "cache"))
    assert_one_line_error(result, f"--out {out}: {link} is a link; a run writes only into its own folder")
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == [link]


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_unwritable_out_is_found_before_the_data_is_read(tmp_path, monkeypatch, code):
    import captioner.files as files  # home of the write probe that training and bulk captioning share

    def refuse(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(files, "open", refuse, raising=False)
    config = TrainConfig(images=str(tmp_path / "no-images"), train_captions=str(tmp_path / "none.json"),
                         out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(OutputError, match=rf"--out {tmp_path / 'run'}: cannot write there \({os.strerror(code)}\)"):
        train(config)  # the data does not exist either: the output folder is checked first
    assert not list((tmp_path / "run").iterdir())


@pytest.mark.slow  # trains a model or runs subprocesses
def test_read_only_out_folder(tmp_path, synthetic):
    """A real read-only folder, through the CLI; root writes anywhere, so it drops that power first (setpriv)."""
    out = tmp_path / "run"
    out.mkdir(mode=0o500)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    need(not prefix or shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to test as root")
    result = subprocess.run([*prefix, sys.executable, "train.py", "--images", str(synthetic / "images"),
                             "--train-captions", str(synthetic / "train.json"), "--out", str(out), "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"--out {out}: cannot write there (Permission denied)" in result.stderr


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.slow  # trains a model or runs subprocesses
def test_disk_full_during_a_save_keeps_the_previous_checkpoints(synthetic, feature_cache, tmp_path, monkeypatch):
    config = small_config(synthetic, tmp_path / "run", feature_cache)
    train(config)
    before = {name: _snapshot(tmp_path / "run" / name) for name in ("best", "last")}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_tensors", full)
    config.epochs = 2
    with pytest.raises(CheckpointError, match=r"checkpoint not saved \(No space left on device\); any previous one "
                                              r"is kept") as error:
        train(config, resume=True)
    assert "\n" not in str(error.value)
    assert {name: _snapshot(tmp_path / "run" / name) for name in ("best", "last")} == before
    assert not list((tmp_path / "run").glob(".*.tmp-*"))


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.slow  # trains a model or runs subprocesses
def test_real_write_failure_during_a_save_is_one_line_and_keeps_the_previous_checkpoints(synthetic, feature_cache,
                                                                                         tmp_path):
    out = tmp_path / "run"
    train(small_config(synthetic, out, feature_cache))
    before = {name: _snapshot(out / name) for name in ("best", "last")}
    result = run_train(*cli_args(synthetic, out, feature_cache, "--epochs", "2", "--resume"),
                       preexec_fn=_limit_file_size)
    assert_one_line_error(result, "checkpoint not saved (", "File too large", "); any previous one is kept")
    assert {name: _snapshot(out / name) for name in ("best", "last")} == before


# ------------------------------------------------------------------------------------------------ 5. option types and bounds
@pytest.mark.parametrize("key, value, message", [
    ("epochs", "3", "epochs must be an integer, not '3'"),
    ("epochs", True, "epochs must be an integer, not True"),
    ("epochs", 2.5, "epochs must be an integer, not 2.5"),
    ("num_layers", [1], "num_layers must be an integer, not [1]"),
    ("lr", "0.1", "lr must be a number, not '0.1'"),
    ("lr", False, "lr must be a number, not False"),
    ("compile", 1, "compile must be true or false, not 1"),
    ("images", 5, "images must be a string, not 5"),
    ("encoder", "vgg16", "encoder must be one of resnet18"),
    ("precision", "fp16", "precision must be one of fp32, bf16, not 'fp16'"),
    ("select_metric", 5, "select_metric must be a string"),
    ("augment", None, "augment must be a string, not None"),
])
def test_config_values_of_the_wrong_type_name_the_file_and_key(key, value, message):
    with pytest.raises(ConfigError, match=r"^run\.toml: " + message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig.from_dict({key: value}, "run.toml")


def test_an_int_may_stand_for_a_float():
    assert TrainConfig.from_dict({"lr": 1, "grad_clip": 0}, "run.json").lr == 1


@pytest.mark.parametrize("key, value", [
    ("embed_size", 8193), ("hidden_size", 10**6), ("num_layers", 9), ("batch_size", 65537), ("batch_size", 0),
    ("max_caption_length", 101), ("max_length", 101), ("beam_size", 65), ("beam_size", 0), ("epochs", 10001),
    ("epochs", -1), ("scst_samples", 65), ("num_workers", 257), ("seed", -1), ("seed", 2**64),
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 2), ("encoder_lr", -1e-5), ("scst_lr", float("inf")),
    ("weight_decay", float("nan")), ("grad_clip", float("inf")), ("length_penalty", float("-inf")),
    ("min_word_count", 0), ("warmup_steps", -5),
])
def test_out_of_range_options(synthetic, tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must be (between|above|at least|a finite number)"):
        train(small_config(synthetic, tmp_path / "run", tmp_path / "cache", **{key: value}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("dropout", float("nan")), ("label_smoothing", float("inf")),
                                        ("scheduled_sampling", float("nan")), ("lr", 0.0)])
def test_non_finite_or_zero_rates(synthetic, tmp_path, key, value):
    with pytest.raises(ConfigError, match="must be"):
        train(small_config(synthetic, tmp_path / "run", tmp_path / "cache", **{key: value}))


@pytest.mark.parametrize("name, content, message", [
    ("run.toml", 'epochs = "3"\n', "epochs must be an integer, not '3'"),
    ("run.json", '{"lr": NaN, "epochs": 1}', "run.json: lr must be a finite number, not nan"),
    ("run.json", '{"beam_size": 1e400}', "beam_size must be an integer, not inf"),
    ("run.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("run.toml", "a = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("run.json", '{"seed": 1' + "0" * 5000 + "}", "invalid config file"),
    ("run.json", "x" * 1_000_001, "config file larger than 1000000 bytes"),
    ("run.toml", b"epochs = \xff", "invalid config file"),
    ("run.json", '{"epochs": 3', "invalid config file"),
    ("run.json", b'\xef\xbb\xbf{"epochs": "3"}', "epochs must be an integer, not '3'"),  # a BOM is skipped
])
def test_train_cli_reports_bad_config_files_in_one_line(synthetic, tmp_path, train_in_process, name, content, message):
    config = tmp_path / name
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = train_in_process(*cli_args(synthetic, tmp_path / "run", tmp_path / "cache"), "--config", str(config))
    error = assert_one_line_error(result, message)
    assert str(config) in error or "must be between" in error


def test_config_path_that_is_a_folder_a_pipe_or_missing(tmp_path, train_in_process):
    assert_one_line_error(train_in_process("--config", str(tmp_path)),
                          f"{tmp_path}: config file is not a regular file (a folder)")
    os.mkfifo(tmp_path / "run.toml")  # no writer: reading it would block forever
    assert_one_line_error(train_in_process("--config", str(tmp_path / "run.toml")),
                          f"{tmp_path}/run.toml: config file is not a regular file (a pipe)")
    assert_one_line_error(train_in_process("--config", str(tmp_path / "nope.toml")), "config file not found")


@pytest.mark.parametrize("saved, message", [
    ({"config": {"epochs": "x"}}, "trainer.json: epochs must be an integer, not 'x'"),
    ({"config": {"dropout": None}}, "trainer.json: dropout must be a number"),
    ([1, 2], "trainer.json: no 'config' object"),
    ({"config": {"epochs": 3, "bogus": 1}}, "trainer.json: unknown option(s) bogus"),
])
def test_tampered_trainer_json_on_resume(synthetic, tmp_path, train_in_process, saved, message):
    (tmp_path / "run" / "last").mkdir(parents=True)
    (tmp_path / "run" / "last" / "trainer.json").write_text(json.dumps(saved))
    result = train_in_process(*cli_args(synthetic, tmp_path / "run", tmp_path / "cache"), "--resume")
    assert_one_line_error(result, message)


@pytest.mark.slow  # trains a model or runs subprocesses
def test_tampered_training_state_on_resume(synthetic, feature_cache, tmp_path):
    config = small_config(synthetic, tmp_path / "run", feature_cache)
    train(config)
    trainer_file = tmp_path / "run" / "last" / "trainer.json"
    saved = json.loads(trainer_file.read_text())
    saved["progress"]["epoch"] = "one"
    trainer_file.write_text(json.dumps(saved))
    config.epochs = 2
    with pytest.raises(CheckpointError, match="inconsistent training state"):
        train(config, resume=True)


@pytest.mark.slow  # trains a model or runs subprocesses
def test_toml_falls_back_to_tomli_before_python_3_11():
    script = ("import sys, tomllib; sys.modules['tomli'] = tomllib; sys.modules['tomllib'] = None\n"
              "import captioner.files as files; assert files.tomllib is sys.modules['tomli']")
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120).returncode == 0
    assert "tomli>=2; python_version < '3.11'" in (ROOT / "pyproject.toml").read_text()


# ------------------------------------------------------------------------------------------------ 6. annotation files
@pytest.fixture
def annotations(tmp_path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        (images / name).write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"outside the image folder")
    return tmp_path


def _coco(folder: Path, image: dict, annotation_id=5) -> Path:
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, **image}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "a dog"},
                            {"id": annotation_id, "image_id": 2, "caption": "a cat"}]}
    path = folder / "captions.json"
    path.write_text(json.dumps(data))
    return path


def _karpathy(folder: Path, image: dict) -> Path:
    data = {"images": [{"filename": "a.jpg", "split": "train", "imgid": 0, "sentences": [{"raw": "a dog"}]},
                       {"split": "train", "sentences": [{"raw": "a cat"}], **image}]}
    path = folder / "dataset.json"
    path.write_text(json.dumps(data))
    return path


BAD_ANNOTATIONS = [
    (_coco, {"file_name": "../secret.jpg"}, r"images\[1\]: 'file_name' '../secret.jpg' leads outside the image folder"),
    (_coco, {"file_name": "sub/../../secret.jpg"}, "leads outside the image folder"),
    (_coco, {"file_name": "/etc/passwd"}, r"'file_name' '/etc/passwd' leads outside the image folder"),
    (_coco, {"file_name": "x" * 300 + ".jpg"}, "has a name longer than 255 bytes"),
    (_coco, {"file_name": "a.jpg\x00.png"}, "holds a NUL character"),
    (_coco, {"file_name": "\ud800.jpg"}, "holds characters no file name can"),
    (_coco, {"file_name": "sub/" * 2000 + "c.jpg"}, "not found"),
    (_karpathy, {"filename": "c.jpg", "filepath": 7, "imgid": 1}, "'filepath' must be a string, not int"),
    (_karpathy, {"filename": "secret.jpg", "filepath": "..", "imgid": 1}, "'filepath' '..' leads outside"),
    (_karpathy, {"filename": "../secret.jpg", "imgid": 1}, "'filename' '../secret.jpg' leads outside"),
    (_karpathy, {"filename": "c.jpg", "filepath": "sub", "cocoid": [1, 2]}, r"invalid 'cocoid' or 'imgid' \[1, 2\]"),
]


@pytest.mark.parametrize("write, image, message", BAD_ANNOTATIONS)
def test_bad_image_entries_are_problems_that_skip_invalid_drops(annotations, write, image, message):
    path = write(annotations, image)
    with pytest.raises(DataError, match=message) as error:
        load_captions(path, annotations / "images", "train")
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    records, report = load_captions(path, annotations / "images", "train", skip_invalid=True)
    assert [r.path.name for r in records] == ["a.jpg"] and report.skipped
    assert all(r.path.resolve().is_relative_to((annotations / "images").resolve()) for r in records)


def test_unhashable_annotation_id(annotations):
    with pytest.raises(DataError, match=r"annotations\[1\]: invalid 'id' \[1, 2\]"):
        load_captions(_coco(annotations, {"file_name": "b.jpg"}, annotation_id=[1, 2]), annotations / "images")


@pytest.mark.parametrize("content, message", [
    ("[" * 100_000 + "]" * 100_000, r"invalid annotation file \(JSON nested too deeply\)"),
    ('{"images": [{"id": 1' + "0" * 5000 + "}]}", r"invalid annotation file \(unusable JSON"),
])
def test_annotation_files_python_cannot_parse(annotations, content, message):
    path = annotations / "captions.json"
    path.write_text(content)
    with pytest.raises(DataError, match=f"{path}: {message}"):
        load_captions(path, annotations / "images")


def test_annotation_file_size_is_bounded_before_reading(annotations, monkeypatch):
    import captioner.data.annotations as data

    monkeypatch.setattr(data, "MAX_ANNOTATION_BYTES", 100)
    path = _coco(annotations, {"file_name": "b.jpg"})
    with pytest.raises(DataError, match=f"{path}: annotation file larger than 100 bytes"):
        load_captions(path, annotations / "images")
    with pytest.raises(DataError, match="not a regular file"):
        load_captions(annotations / "images", annotations / "images")


def test_train_cli_refuses_a_path_escaping_the_image_folder(synthetic, tmp_path, train_in_process):
    data = json.loads((synthetic / "val.json").read_text())
    data["images"][0]["file_name"] = "../../../../etc/passwd"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = train_in_process(*cli_args(synthetic, tmp_path / "run", tmp_path / "cache"), "--train-captions", str(bad))
    assert_one_line_error(result, str(bad), "'../../../../etc/passwd' leads outside the image folder")


# ------------------------------------------------------------------------------------------------ 7. the feature cache
@pytest.fixture
def few(synthetic) -> list[Path]:
    return train_images(synthetic, 4)


def _cached(cache: FeatureCache) -> tuple[list[str], torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(cache.path), "pt") as handle:
        return json.loads(handle.metadata()["digests"]), handle.get_tensor("features")


@pytest.mark.parametrize("damage", [
    lambda c: c.path.write_bytes(b"garbage"),
    lambda c: c.path.write_bytes(c.path.read_bytes()[:200]),
    lambda c: save_file({"features": torch.zeros(2, 7)}, str(c.path), metadata={"digests": json.dumps(["a", "b"])}),
    lambda c: save_file({"features": torch.zeros(1, 512)}, str(c.path), metadata={"digests": '{"a": 1}'}),
    lambda c: save_file({"features": torch.zeros(1, 512)}, str(c.path)),
    lambda c: save_file({"other": torch.zeros(1, 512)}, str(c.path), metadata={"digests": '["a"]'}),
    lambda c: save_file({"features": torch.zeros(1, 512, dtype=torch.long)}, str(c.path),
                        metadata={"digests": '["a"]'}),
])
def test_corrupt_cache_file_is_ignored_with_a_warning_and_rebuilt(few, tmp_path, caplog, damage):
    encoder = random_encoder()
    cache = FeatureCache(tmp_path, encoder)
    expected, _, _ = cache.get(few, progress=False)
    damage(cache)
    with caplog.at_level(logging.WARNING, logger="captioner"):
        rebuilt, encoded, _ = cache.get(few, progress=False)
    assert "ignoring an unreadable feature cache file" in caplog.text and str(cache.path) in caplog.text
    assert encoded == len({p.read_bytes() for p in few}) and torch.allclose(rebuilt, expected, atol=1e-5)
    assert cache.get(few, progress=False).encoded == 0


def test_non_finite_cached_rows_are_encoded_again(few, tmp_path, caplog):
    cache = FeatureCache(tmp_path, random_encoder())
    expected, _, _ = cache.get(few, progress=False)
    digests, rows = _cached(cache)
    rows[0, 3], rows[1, 0] = float("nan"), float("inf")
    save_file({"features": rows}, str(cache.path), metadata={"digests": json.dumps(digests)})
    with caplog.at_level(logging.WARNING, logger="captioner"):
        features, encoded, _ = cache.get(few, progress=False)
    assert "ignoring 2 feature rows that are not finite" in caplog.text
    assert encoded == 2 and torch.isfinite(features).all() and torch.allclose(features, expected, atol=1e-5)


def test_half_precision_cached_rows_are_converted(few, tmp_path):
    cache = FeatureCache(tmp_path, random_encoder())
    cache.get(few, progress=False)
    digests, rows = _cached(cache)
    save_file({"features": rows.half()}, str(cache.path), metadata={"digests": json.dumps(digests)})
    features, encoded, _ = cache.get(few, progress=False)
    assert encoded == 0 and features.dtype == torch.float32


def test_corrupt_part_file_is_ignored_and_removed(few, tmp_path, caplog):
    cache = FeatureCache(tmp_path, random_encoder())
    part = tmp_path / f"{cache.path.stem}.part-1-deadbeef.safetensors"
    part.write_bytes(b"half a part")
    with caplog.at_level(logging.WARNING, logger="captioner"):
        cache.get(few, progress=False)
    assert str(part) in caplog.text and not part.exists()


def test_unwritable_feature_cache_is_an_output_error(few, tmp_path, monkeypatch):
    import captioner.train.features as features

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(features, "save_tensors", full)
    with pytest.raises(OutputError, match=rf"{tmp_path}: cannot write the feature cache \(No space left on device\)"):
        FeatureCache(tmp_path, random_encoder()).get(few, progress=False)
    assert not list(tmp_path.iterdir())
