"""The `captioner` command: entry points, caption, evaluate, and clean failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# Tests that start a process or need the trained model are marked slow one by one; errors raised before any work
# run in this process (`main([...])`).


def captioner(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def model_dir(trained_model, tmp_path_factory) -> Path:
    return trained_model.save_pretrained(tmp_path_factory.mktemp("model") / "checkpoint")


@pytest.mark.slow
def test_entry_points_exist():
    assert "train" in captioner("--help").stdout
    script = Path(sys.executable).parent / "captioner"
    assert script.is_file(), "the console script is installed by `pip install -e .`"
    result = subprocess.run([str(script), "caption", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--beam-size" in result.stdout and "--num-captions" in result.stdout


@pytest.mark.slow
def test_caption_files_and_folders(model_dir, synthetic, trained_model):
    images = sorted((synthetic / "images").glob("test_*.png"))[:3]
    result = captioner("caption", str(images[0]), str(images[1]), "--model", str(model_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(images[0]), str(images[1])]
    assert [line.split("\t")[1] for line in lines] == trained_model.caption(images[:2])
    folder = synthetic / "images"
    result = captioner("caption", str(folder), "--model", str(model_dir), "--beam-size", "2", "--quiet")
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) == len(list(folder.glob("*.png")))


@pytest.mark.slow
def test_caption_json_with_several_captions(model_dir, synthetic):
    image = sorted((synthetic / "images").glob("test_*.png"))[0]
    result = captioner("caption", str(image), "--model", str(model_dir), "--json", "--num-captions", "3",
                       "--beam-size", "4")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["file"] == str(image) and len(row["captions"]) == 3
    scores = [c["score"] for c in row["captions"]]
    assert scores == sorted(scores, reverse=True) and all(c["log_prob"] <= 0 for c in row["captions"])


@pytest.mark.slow
def test_bad_file_is_reported_and_others_still_captioned(model_dir, synthetic, tmp_path):
    good = sorted((synthetic / "images").glob("test_*.png"))[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    result = captioner("caption", str(bad), str(good), str(empty), "--model", str(model_dir))
    assert result.returncode == 1
    assert result.stdout.startswith(f"{good}\t") and len(result.stdout.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    for name in ("broken.jpg", "empty.png"):
        assert name in result.stderr
    assert "2 of 3 images could not be captioned" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--beam-size", "0"], "beam_size must be between 1 and 64, not 0"),
    (["--num-captions", "2", "--strategy", "greedy"], "greedy decoding returns one caption"),
    (["--model", "/nonexistent/model"], "checkpoint directory not found"),
])
def test_bad_options_fail_cleanly(tiny_model_dir, synthetic, capsys, args, message):
    """In this process: these are refused before any work (the subprocess tests above cover the entry point)."""
    from captioner.cli import main

    image = sorted((synthetic / "images").glob("test_*.png"))[0]
    capsys.readouterr()
    assert main(["caption", str(image), "--model", str(tiny_model_dir), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.slow
def test_more_captions_than_beams_widens_the_beam_and_says_so(model_dir, synthetic):
    image = sorted((synthetic / "images").glob("test_*.png"))[0]
    result = captioner("caption", str(image), "--model", str(model_dir), "--num-captions", "4")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 4 and "to 4 to return 4 captions" in result.stderr


def test_more_captions_than_the_beam_given_is_refused(tiny_model_dir, synthetic, capsys):
    from captioner.cli import main

    image = sorted((synthetic / "images").glob("test_*.png"))[0]
    capsys.readouterr()
    assert main(["caption", str(image), "--model", str(tiny_model_dir), "--num-captions", "4", "--beam-size", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("error: num_return_sequences (4) cannot exceed beam_size (2) in beam "
                                               "search; ask for a beam at least as wide, or leave beam_size out to "
                                               "widen it")


@pytest.mark.slow
def test_evaluate_reports_coco_metrics(model_dir, synthetic, tmp_path):
    out, predictions = tmp_path / "results" / "metrics.json", tmp_path / "predictions.json"  # results/ is created
    result = captioner("evaluate", "--images", str(synthetic / "images"), "--captions", str(synthetic / "test.json"),
                       "--model", str(model_dir), "--out", str(out), "--predictions", str(predictions))
    assert result.returncode == 0, result.stderr
    metrics = json.loads(out.read_text())
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "distinct_captions", "vocabulary_used"} <= set(metrics)
    assert metrics["BLEU-1"] > 0.6 and metrics["CIDEr-D"] > 1.0  # the synthetic task is learnt
    assert metrics["images"] == 36
    rows = json.loads(predictions.read_text())
    assert len(rows) == 36 and {"image_id", "caption"} <= set(rows[0])
    assert "CIDEr-D" in result.stdout


@pytest.mark.slow
def test_export_half_precision_with_new_default_decoding(model_dir, synthetic, tmp_path, trained_model):
    out = tmp_path / "exported"
    result = captioner("export", str(model_dir), str(out), "--half-precision", "--beam-size", "5",
                       "--length-penalty", "0.5")
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    from captioner import Captioner

    assert all(t.dtype == torch.float16 for t in load_file(str(out / "model.safetensors")).values())
    assert (out / "model.safetensors").stat().st_size < 0.6 * (model_dir / "model.safetensors").stat().st_size
    exported = Captioner.from_pretrained(out, device="cpu")
    assert (exported.generation_config.beam_size, exported.generation_config.length_penalty) == (5, 0.5)
    images = sorted((synthetic / "images").glob("test_*.png"))[:12]
    assert exported.caption(images) == trained_model.caption(images, beam_size=5, length_penalty=0.5)


def test_help_names_each_default_once(capsys):
    """A help text that names its default already, or an empty-string default, gets no second "default:"."""
    import argparse
    from dataclasses import dataclass

    from captioner.bounds import option
    from captioner.cli import add_dataclass_options, main

    @dataclass
    class Options:
        named: str = option("", "the set to use (default: the first)")
        empty: str = option("", "a folder")
        count: int = option(3, "how many; the default counts", range=(1, 9))

    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, Options)
    helps = {action.dest: action.help for action in parser._actions if action.dest != "help"}
    assert helps == {"named": "the set to use (default: the first)", "empty": "a folder",
                     "count": "how many; the default counts (between 1 and 9; default: 3)"}
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the first)" in text and "(default: '')" not in text and "default: the first) (" not in text


def test_merge_help_names_the_parts_caption_writes(capsys):
    from captioner.bulk.jsonl import part_path
    from captioner.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert part_path(Path("captions.jsonl"), 3).name == "captions.rank-3.jsonl"
    assert "captions.rank-K.jsonl for --out captions.jsonl" in text and "FILE.rank-K" not in text
