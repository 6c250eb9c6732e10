"""Checkpoints are safe to load and crash-proof to write; training survives SIGKILL."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from captioner import CaptionerError, Captioner, CheckpointError
from captioner.checkpoint import atomic_directory, recover
from conftest import ROOT


@pytest.fixture()
def checkpoint_dir(tiny_model, tmp_path):
    return tiny_model.save_pretrained(tmp_path / "model")


def test_directory_with_pickles_is_refused_without_loading_them(checkpoint_dir, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (checkpoint_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="pickle files \\(pytorch_model.bin\\)"):
        Captioner.from_pretrained(checkpoint_dir)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: _edit_config(d, lambda c: c["decoder"].update(hidden_size=64)), "weights do not match config.json"),
    (lambda d: _edit_config(d, lambda c: c["decoder"].update(vocab_size=c["decoder"]["vocab_size"] + 1)),
     "vocab.json has"),
    (lambda d: (d / "vocab.json").write_text(json.dumps({"words": json.loads((d / "vocab.json").read_text())["words"][:-1]})),
     "vocab.json has"),
    (lambda d: (d / "config.json").write_text("{broken"), "invalid checkpoint file (malformed JSON"),
    (lambda d: _edit_config(d, lambda c: c.update(format_version=99)), "unsupported format_version"),
    (lambda d: _edit_config(d, lambda c: c["encoder"].update(name="vgg16")), "unknown encoder"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "unreadable safetensors"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda d: save_file({k: v for k, v in load_file(str(d / "model.safetensors")).items() if "lstm" not in k},
                         str(d / "model.safetensors")), "missing"),
])
def test_inconsistent_checkpoints_get_clear_errors(checkpoint_dir, damage, message):
    damage(checkpoint_dir)
    with pytest.raises(CaptionerError) as error:
        Captioner.from_pretrained(checkpoint_dir)
    assert message in str(error.value) and "\n" not in str(error.value)


def _edit_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_interrupted_swap_is_recovered(tmp_path):
    target = tmp_path / "last"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    os.rename(target, tmp_path / ".last.old-123")  # a crash between the two renames of the next swap
    assert (recover(target) / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "a.txt").read_text() == "first"
    assert not list(tmp_path.glob(".last.tmp-*"))



def test_next_swap_removes_the_old_copy_a_killed_writer_left(tmp_path):
    """Killed after its second rename, a writer leaves its old copy behind; the next swap deletes it."""
    target = tmp_path / "last"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
    (tmp_path / ".last.old-999").mkdir()
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "second"
    assert not list(tmp_path.glob(".last.old-*"))

def _train_command(synthetic, out, cache, epochs):
    return [sys.executable, "train.py", "--images", str(synthetic / "images"), "--train-captions",
            str(synthetic / "train.json"), "--val-captions", str(synthetic / "val.json"), "--out", str(out),
            "--encoder", "resnet18", "--encoder-weights", "none", "--embed-size", "32", "--hidden-size", "64",
            "--batch-size", "16", "--epochs", str(epochs), "--patience", "0", "--feature-cache", str(cache),
            "--device", "cpu", "--min-word-count", "1", "--quiet"]


@pytest.mark.slow
def test_sigkill_during_training_then_resume(synthetic, feature_cache, tmp_path):
    """Kill a real training process twice at different moments; resuming ends with the same model as a run
    that was never interrupted, and the log lists every epoch once."""
    epochs, cache = 6, feature_cache  # shared: the kills come after epochs, not during extraction
    straight = subprocess.run(_train_command(synthetic, tmp_path / "straight", cache, epochs), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    command = _train_command(synthetic, out, cache, epochs)
    for kill_after_epoch, delay in ((1, 0.0), (3, 0.35)):
        process = subprocess.Popen(command + (["--resume"] if (out / "last").exists() else []), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            try:
                done = json.loads((out / "last" / "trainer.json").read_text())["progress"]["epoch"]
            except (OSError, ValueError, KeyError):
                done = 0
            if done >= kill_after_epoch:
                break
            time.sleep(0.05)
        time.sleep(delay)
        assert process.poll() is None, "training finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    resumed = subprocess.run(command + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    epochs_logged = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert epochs_logged == list(range(1, epochs + 1))
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(out / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.glob(".*.tmp-*")) and not list(out.glob(".*.old-*"))
