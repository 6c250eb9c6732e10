"""End-to-end training: learning works, checkpoints round-trip, resume is exact, the CLI fails cleanly."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from captioner import Captioner
from captioner.data.annotations import load_captions
from captioner.data.vocab import END_ID
from captioner.models.decoder import Decoder, DecoderConfig
from captioner.train.scst import dropout_off
from captioner.train.optim import lr_factor
from captioner.train.trainer import prepare, train
from conftest import ROOT, synthetic_config

# Tests that train a model or start a process are marked slow one by one: `pytest -m "not slow"` skips them.


@pytest.mark.slow
def test_training_learns_to_caption_held_out_images(trained_model, synthetic):
    records, _ = load_captions(synthetic / "test.json", synthetic / "images")
    meta = {i["id"]: i for i in json.loads((synthetic / "test.json").read_text())["images"]}
    captions = trained_model.caption([r.path for r in records])
    correct = sum(meta[r.image_id]["colour"] in c.split() and meta[r.image_id]["shape"] in c.split()
                  for r, c in zip(records, captions))
    assert correct / len(records) >= 0.9, list(zip([meta[r.image_id]["colour"] + " " + meta[r.image_id]["shape"]
                                                    for r in records], captions))


@pytest.mark.slow
def test_training_writes_log_plot_and_checkpoints(trained_run):
    out = trained_run
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert all({"loss", "BLEU-4", "CIDEr-D", "lr"} <= set(h) for h in history)
    assert (out / "training.png").stat().st_size > 1000
    for name in ("best", "last"):
        files = {p.name for p in (out / name).iterdir()}
        assert {"config.json", "vocab.json", "model.safetensors"} <= files
        assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl") for p in (out / name).iterdir())
    assert {"trainer.json", "training_state.safetensors"} <= {p.name for p in (out / "last").iterdir()}


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_captions(trained_model, synthetic, tmp_path):
    images = sorted((synthetic / "images").glob("test_*.png"))[:8]
    before = trained_model.generate(images, num_return_sequences=2, beam_size=3)
    trained_model.save_pretrained(tmp_path / "copy")
    reloaded = Captioner.from_pretrained(tmp_path / "copy", device="cpu")
    after = reloaded.generate(images, num_return_sequences=2, beam_size=3)
    assert [[c.text for c in row] for row in before] == [[c.text for c in row] for row in after]
    assert torch.allclose(torch.tensor([[c.log_prob for c in row] for row in before]),
                          torch.tensor([[c.log_prob for c in row] for row in after]), atol=1e-5)


@pytest.mark.slow
def test_resume_equals_uninterrupted_training(synthetic, feature_cache, tmp_path):
    common = dict(encoder="resnet18", encoder_weights="none", epochs=4, dropout=0.3, batch_size=64)
    straight = train(synthetic_config(synthetic, tmp_path / "straight", feature_cache, **common))
    interrupted = synthetic_config(synthetic, tmp_path / "resumed", feature_cache, **common)
    train(interrupted, stop_after_epoch=2)
    assert json.loads((tmp_path / "resumed" / "last" / "trainer.json").read_text())["progress"]["epoch"] == 2
    train(interrupted, resume=True)
    a = load_file(str(straight.parent / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [(tmp_path / run / "log.jsonl").read_text().splitlines() for run in ("straight", "resumed")]
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in lines]
    assert strip(logs[0]) == strip(logs[1])

    # A resumed run validates the weights it trains, not a snapshot of them (ONNX Runtime's graphs are one)
    trainer = prepare(interrupted, resume=True)
    try:
        before = trainer.validate()[0]
        with torch.no_grad():
            trainer.model.decoder.output.bias[END_ID] += 100.0  # every caption now ends at once
        assert trainer.validate()[0] != before
    finally:
        trainer.close()


def run_cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("problem", ["malformed", "dangling", "missing_file", "empty_caption"])
def test_train_cli_reports_bad_data_in_one_line(synthetic, tmp_path, train_in_process, problem):
    data = json.loads((synthetic / "val.json").read_text())
    if problem == "malformed":
        text = json.dumps(data)[:-5]
    else:
        if problem == "dangling":
            data["annotations"][0]["image_id"] = 987654
        elif problem == "missing_file":
            data["images"][1]["file_name"] = "nowhere.png"
        else:
            data["annotations"][2]["caption"] = "   "
        text = json.dumps(data)
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    result = train_in_process("--images", str(synthetic / "images"), "--train-captions", str(bad),
                              "--val-captions", str(synthetic / "val.json"), "--out", str(tmp_path / "out"),
                              "--encoder-weights", "none")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], result.stderr
    expected = {"malformed": "malformed JSON", "dangling": "987654", "missing_file": "nowhere.png",
                "empty_caption": "caption is empty"}[problem]
    assert expected in lines[0]
    assert not (tmp_path / "out" / "last").exists()


@pytest.mark.slow
def test_train_py_help_lists_the_options():
    """The entry point itself, in a real process."""
    help_text = run_cli("--help").stdout
    for flag in ("--images", "--train-captions", "--val-captions", "--encoder", "--epochs", "--out", "--resume",
                 "--seed", "--batch-size", "--lr", "--config", "--finetune-encoder", "--scst-epochs"):
        assert flag in help_text


def test_train_cli_bad_options(tmp_path, train_in_process):
    result = train_in_process("--resume", "--out", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "nothing to resume" in result.stderr and "Traceback" not in result.stderr
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"epochs": 3, "learning_rate": 0.1}))
    result = train_in_process("--config", str(config))
    assert result.returncode == 2 and "learning_rate" in result.stderr


@pytest.mark.slow
def test_config_file_and_flags_merge(synthetic, feature_cache, tmp_path):
    """Flags override the config file, which overrides the defaults (seen in the saved trainer.json)."""
    config = tmp_path / "run.toml"
    config.write_text(f'images = "{synthetic / "images"}"\ntrain-captions = "{synthetic / "train.json"}"\n'
                      f'val_captions = "{synthetic / "val.json"}"\nepochs = 1\nhidden_size = 32\nembed_size = 16\n'
                      f'encoder = "resnet18"\nencoder_weights = "none"\nfeature_cache = "{feature_cache}"\n'
                      f'batch_size = 99\n')
    result = run_cli("--config", str(config), "--batch-size", "50", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "out" / "last" / "trainer.json").read_text())["config"]
    assert saved["batch_size"] == 50 and saved["hidden_size"] == 32 and saved["lr"] == 4e-4


@pytest.mark.slow
def test_scst_phase_raises_reward_and_keeps_the_cross_entropy_best(synthetic, feature_cache, tmp_path):
    config = synthetic_config(synthetic, tmp_path / "scst", feature_cache, epochs=10, scst_epochs=3,
                              scst_lr=5e-4, scst_samples=4, scst_batch_size=4)
    train(config)
    history = [json.loads(line) for line in (tmp_path / "scst" / "log.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["xe"] * 10 + ["scst"] * 3
    scst = [h for h in history if h["phase"] == "scst"]
    assert -scst[-1]["loss"] > -scst[0]["loss"]  # the logged SCST loss is minus the mean sampled CIDEr-D
    assert (tmp_path / "scst" / "best-xe" / "model.safetensors").is_file()
    best_xe = max(h["CIDEr-D"] for h in history if h["phase"] == "xe")
    assert max(h["CIDEr-D"] for h in scst) >= best_xe - 0.05


@pytest.mark.slow
def test_scheduled_sampling_label_smoothing_and_encoder_finetuning_train(synthetic, tmp_path):
    config = synthetic_config(synthetic, tmp_path / "variants", tmp_path / "cache", encoder="resnet18",
                              encoder_weights="none", epochs=2, scheduled_sampling=0.5, label_smoothing=0.1,
                              finetune_encoder=True, encoder_lr=1e-3)
    best = train(config)
    history = [json.loads(line) for line in (tmp_path / "variants" / "log.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    assert (best / "encoder.safetensors").is_file()
    assert json.loads((best / "config.json").read_text())["encoder"]["weights"] == "checkpoint"
    torch.manual_seed(0)
    from captioner.models.encoder import Encoder

    initial = Encoder.pretrained("resnet18", "none").backbone.state_dict()["conv1.weight"]
    assert not torch.equal(load_file(str(best / "encoder.safetensors"))["conv1.weight"], initial)


@pytest.mark.slow
def test_scst_with_greedy_baseline_runs(synthetic, feature_cache, tmp_path):
    config = synthetic_config(synthetic, tmp_path / "greedy", feature_cache, epochs=2, scst_epochs=1,
                              scst_baseline="greedy", scst_samples=2, scst_batch_size=8)
    train(config)
    phases = [json.loads(line)["phase"] for line in (tmp_path / "greedy" / "log.jsonl").read_text().splitlines()]
    assert phases == ["xe", "xe", "scst"]


@pytest.mark.slow
def test_augmented_views_train_and_validate_on_the_centre_view(synthetic, feature_cache, tmp_path):
    config = synthetic_config(synthetic, tmp_path / "augment", feature_cache, encoder="resnet18",
                              encoder_weights="none", epochs=1, augment="flip")
    trainer = prepare(config)
    assert trainer.train_split.features.shape[:2] == (2, len(trainer.train_split.records))
    assert trainer.val_split.features.dim() == 2
    rows = torch.arange(8)
    picked = trainer._features_for(rows)
    assert picked.shape == (8, trainer.train_split.features.shape[-1])
    assert all(any(torch.equal(picked[i], trainer.train_split.features[v, i]) for v in range(2)) for i in range(8))
    trainer.run()
    trainer.close()
    assert len((tmp_path / "augment" / "log.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_label_smoothing_and_scheduled_sampling_change_the_training_loss(synthetic, feature_cache, tmp_path):
    """Same seed, same data: label smoothing changes the first epoch's loss; scheduled sampling, whose probability
    ramps up from 0, leaves the first epoch as it was and changes the second."""
    def losses(name, **options):
        train(synthetic_config(synthetic, tmp_path / name, feature_cache, epochs=2, embed_size=16, hidden_size=32,
                               dropout=0.0, input_dropout=0.0, batch_size=64, **options))
        return [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    plain, smoothed, sampled = losses("plain"), losses("smoothed", label_smoothing=0.2), losses("sampled",
                                                                                               scheduled_sampling=1.0)
    assert all(math.isfinite(loss) for loss in plain + smoothed + sampled)
    assert smoothed[0] != pytest.approx(plain[0], rel=1e-3)
    assert sampled[0] == pytest.approx(plain[0], rel=1e-6) and sampled[1] != pytest.approx(plain[1], rel=1e-3)


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    cosine, constant = lr_factor(4, "cosine", 104), lr_factor(4, "constant", 104)
    assert [cosine(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0] == [constant(step) for step in range(4)]
    assert cosine(4) == 1.0 and cosine(54) == pytest.approx(0.5) and cosine(104) == cosine(500) == pytest.approx(0.0)
    assert all(cosine(step) > cosine(step + 1) for step in range(4, 103))
    assert constant(50) == constant(500) == 1.0


def test_scheduled_sampling_feeds_the_models_own_words():
    """With probability 1 every input word after <start> is the model's previous argmax; with 0 the caption's."""
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(16, 30, 8, 12, dropout=0.0, input_dropout=0.0))
    features, tokens = torch.randn(3, 16), torch.randint(4, 30, (3, 7))
    tokens[:, 0] = 1  # <start>
    lengths = torch.full((3,), 7)
    fed, step = [], decoder.step

    def recording_step(previous, state):
        fed.append(previous.clone())
        return step(previous, state)

    decoder.step = recording_step
    own = decoder(features, tokens, lengths, sampling_probability=1.0)
    assert torch.equal(fed[0], tokens[:, 0])
    for t in range(1, tokens.size(1) - 1):
        assert torch.equal(fed[t], own[:, t - 1].argmax(-1)), t
    assert not torch.equal(torch.stack(fed[1:], 1), tokens[:, 1:-1])  # not the caption's words
    teacher = decoder(features, tokens, lengths)
    assert not torch.allclose(own, teacher)
    fed.clear()
    decoder(features, tokens, lengths, sampling_probability=1e-12)  # the step-by-step path, (almost) never sampling
    assert torch.equal(torch.stack(fed, 1), tokens[:, :-1])
    del decoder.step


def test_dropout_off_scores_like_eval_mode_and_restores_dropout():
    """SCST's policy-gradient pass must score the eval-mode policy, yet stay in training mode for cuDNN."""
    decoder = Decoder(DecoderConfig(16, 30, 8, 12, num_layers=2, dropout=0.5, input_dropout=0.3))
    features, tokens = torch.randn(3, 16), torch.randint(4, 30, (3, 7))
    lengths = torch.full((3,), 7)
    expected = decoder.eval()(features, tokens, lengths)
    with dropout_off(decoder):
        assert decoder.training
        assert torch.allclose(decoder(features, tokens, lengths), expected, atol=1e-6)
    assert decoder.dropout.p == 0.5 and decoder.input_dropout.p == 0.3 and decoder.lstm.dropout == 0.5
