"""torchrun data parallelism on CPU (gloo): two processes take the same steps as one with the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: `pytest -m "not slow"` skips them


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
