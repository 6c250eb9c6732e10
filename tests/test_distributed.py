"""torchrun data parallelism on CPU (gloo): two processes take the same steps as one with the whole batch, and
torchrun's environment variables are checked by one parser for training and captioning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from captioner.cli import main
from captioner.distributed import Distributed
from captioner.errors import ConfigError
from conftest import ROOT

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _args(synthetic, out, cache, epochs=2):
    return ["train.py", "--images", str(synthetic / "images"), "--train-captions", str(synthetic / "train.json"),
            "--val-captions", str(synthetic / "val.json"), "--out", str(out), "--encoder", "resnet18",
            "--encoder-weights", "none", "--embed-size", "32", "--hidden-size", "64", "--batch-size", "32",
            "--dropout", "0", "--input-dropout", "0", "--epochs", str(epochs), "--patience", "0", "--min-word-count", "1",
            "--feature-cache", str(cache), "--device", "cpu", "--lr-schedule", "constant", "--quiet"]


def _run(command, timeout=600):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow  # trains models in subprocesses: `pytest -m "not slow"` skips it
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(synthetic, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([sys.executable, *_args(synthetic, tmp_path / "single", tmp_path / "cache-single")])
    _run([*torchrun, *_args(synthetic, tmp_path / "ddp", tmp_path / "cache-ddp")])

    single = load_file(str(tmp_path / "single" / "last" / "model.safetensors"))
    ddp = load_file(str(tmp_path / "ddp" / "last" / "model.safetensors"))
    for key in single:
        assert torch.allclose(single[key], ddp[key], atol=2e-5), key
    # the features each rank encoded half of were gathered into one identical cache
    cached = [load_file(str(next((tmp_path / name).glob("*.safetensors"))))["features"]
              for name in ("cache-single", "cache-ddp")]
    assert cached[0].shape == cached[1].shape
    trainer = json.loads((tmp_path / "ddp" / "last" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["progress"]["epoch"] == 2

    _run([*torchrun, *_args(synthetic, tmp_path / "ddp", tmp_path / "cache-ddp", epochs=3), "--resume"])
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.fixture
def launch_environment(monkeypatch):
    """``launch_environment(NAME=value, ...)``: exactly these torchrun variables, the others unset."""
    def set_variables(**values: str) -> None:
        for name in LAUNCH_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_variables


def train_arguments(tmp_path) -> list[str]:
    return ["--images", str(tmp_path), "--train-captions", str(tmp_path / "train.json"), "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "abc"}, "environment variable WORLD_SIZE must be an integer (as torchrun sets it), not 'abc'"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE must be between 1 and 1000000, not 0"),
    ({"WORLD_SIZE": "-1"}, "environment variable WORLD_SIZE must be between 1 and 1000000, not -1"),
    ({"WORLD_SIZE": "1000001"}, "environment variable WORLD_SIZE must be between 1 and 1000000, not 1000001"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "environment variable RANK must be between 0 and 1 (WORLD_SIZE - 1), not 5"),
    ({"RANK": "1"}, "environment variable RANK must be between 0 and 0 (WORLD_SIZE is 1), not 1"),
    ({"RANK": "1.5", "WORLD_SIZE": "2"}, "environment variable RANK must be an integer (as torchrun sets it), not '1.5'"),
    ({"LOCAL_RANK": "-3"}, "environment variable LOCAL_RANK must be between 0 and 0 (WORLD_SIZE is 1), not -3"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2"},
     "environment variable LOCAL_RANK must be between 0 and 1 (WORLD_SIZE - 1), not 2"),
])
def test_bad_torchrun_variables_are_one_line_in_training_and_captioning(variables, message, launch_environment,
                                                                       train_in_process, tmp_path, capsys):
    launch_environment(**variables)
    trained = train_in_process(*train_arguments(tmp_path))
    image = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    capsys.readouterr()
    captioned = main(["caption", str(image)])
    assert (trained.returncode, trained.stderr) == (2, f"error: {message}\n")
    assert (captioned, capsys.readouterr().err) == (2, f"error: {message}\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "WORLD_SIZE is 2 but environment variable MASTER_ADDR is not set: start the "
                                       "processes with torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "environment variable MASTER_PORT is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
     "environment variable MASTER_PORT must be between 1 and 65535, not 99999"),
])
def test_training_outside_torchrun_with_a_world_size_says_so(variables, message, launch_environment, train_in_process,
                                                              tmp_path):
    launch_environment(**variables)
    trained = train_in_process(*train_arguments(tmp_path))
    assert trained.returncode == 2 and trained.stderr.startswith("error: ") and message in trained.stderr
    assert trained.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


def test_more_local_ranks_than_gpus_is_one_line(launch_environment, monkeypatch):
    launch_environment(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    monkeypatch.setattr("captioner.distributed.pick_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="LOCAL_RANK is 1 but only 1 GPUs are visible; start at most one process per GPU"):
        Distributed.setup("cuda")
