"""Several datasets in one run: one vocabulary over all, sampling weights honoured, every validation set scored
and logged (log.jsonl and TensorBoard), and one-line errors for the ways a dataset list can be wrong."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from captioner.errors import ConfigError
from captioner.train.config import Dataset, TrainConfig, run_options
from captioner.train.data import Batches, load_sets, vocabulary, weighted_rows
from captioner.train.trainer import selection, train
from conftest import synthetic_config
from synthetic import make_split
from test_hostile_training import assert_one_line_error


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> Path:
    """Two small synthetic datasets in their own folders, each set's captions all holding a word of its own
    (``indoors`` in ``a``, ``outdoors`` in ``b``)."""
    root = tmp_path_factory.mktemp("sets")
    for name, seed in (("a", 0), ("b", 1)):
        make_split(root / name, "train", 16, seed)
        make_split(root / name, "val", 6, seed + 10, start_id=1000)
    for (folder, word), split in itertools.product((("a", "indoors"), ("b", "outdoors")), ("train", "val")):
        path = root / folder / f"{split}.json"
        data = json.loads(path.read_text())
        for annotation in data["annotations"]:
            annotation["caption"] += f" {word}"
        path.write_text(json.dumps(data))
    return root


def set_flag(root: Path, folder: str, split: str, **extra) -> str:
    return ",".join([f"captions={root / folder / f'{split}.json'}", f"images={root / folder / 'images'}",
                     *(f"{key}={value}" for key, value in extra.items())])


def two_set_config(root: Path, out: Path, cache: Path, weight: float = 2.5, **overrides) -> TrainConfig:
    sets = dict(train_sets=[Dataset.parse(set_flag(root, "a", "train")),
                            Dataset.parse(set_flag(root, "b", "train", weight=weight))],
                val_sets=[Dataset.parse(set_flag(root, "a", "val")), Dataset.parse(set_flag(root, "b", "val"))],
                images="", train_captions="", val_captions="")
    return synthetic_config(root, out, cache, **{"epochs": 2, **sets, **overrides})


# ------------------------------------------------------------------------------------------------ weights
def test_weighted_rows_repeat_whole_weights_and_draw_the_fraction_afresh():
    sets = torch.tensor([0] * 10 + [1] * 20)
    first = weighted_rows(sets, [2.5, 0.5], torch.Generator().manual_seed(1))
    counts = torch.bincount(sets[first], minlength=2).tolist()
    assert counts == [25, 10]
    assert sorted(torch.bincount(first[sets[first] == 0], minlength=10).tolist()) == [2] * 5 + [3] * 5
    second = weighted_rows(sets, [2.5, 0.5], torch.Generator().manual_seed(2))
    assert len(second) == len(first) and set(second[sets[second] == 1].tolist()) != set(first[sets[first] == 1].tolist())
    assert torch.equal(weighted_rows(sets, [1.0, 1.0], torch.Generator()), torch.arange(30))


def test_each_epoch_sees_each_sets_captions_as_often_as_its_weight_says():
    photo_sets = torch.tensor([0] * 10 + [1] * 6)
    caption_photos = torch.arange(16).repeat_interleave(torch.tensor([3, 2] * 8))  # 40 captions, 26 of set 0
    batches = Batches(photo_sets, caption_photos, [1.0, 2.5], seed=3)
    per_set = torch.bincount(batches.caption_sets, minlength=2).tolist()
    assert per_set == [25, 15]
    epochs = []
    for epoch in range(3):
        steps = batches.xe(epoch, batch_size=8)
        assert [len(s) for s in steps[:-1]] == [8] * (len(steps) - 1)
        seen = torch.cat(steps)
        assert torch.bincount(batches.caption_sets[seen], minlength=2).tolist() == [25, round(2.5 * 15)]
        assert torch.equal(torch.cat(batches.xe(epoch, batch_size=8)), seen)  # a function of the epoch (resume)
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # shuffled, and set 1's half share drawn afresh, each epoch


def test_the_ranks_steps_make_up_the_global_batches():
    photo_sets = torch.tensor([0] * 8 + [1] * 8)
    caption_photos = torch.arange(16).repeat_interleave(2)
    one = Batches(photo_sets, caption_photos, [1.0, 2.0], seed=0)
    ranks = [Batches(photo_sets, caption_photos, [1.0, 2.0], seed=0, world_size=2, rank=r) for r in (0, 1)]
    steps, whole = [r.xe(1, batch_size=8) for r in ranks], one.xe(1, batch_size=8)
    assert len(whole) == len(steps[0]) == len(steps[1]) == 6  # (16 + 2 * 16) captions, 8 a step
    assert all(len(s) == 4 for rank in steps for s in rank)  # half the global batch each
    for first, second, batch in zip(*steps, whole):
        assert sorted(torch.cat([first, second]).tolist()) == sorted(batch.tolist())


def test_a_trained_cnn_gets_whole_photos_each_step():
    photo_sets = torch.tensor([0] * 6 + [1] * 4)
    caption_photos = torch.arange(10).repeat_interleave(3)
    batches = Batches(photo_sets, caption_photos, [1.0, 1.0], seed=0)
    steps = batches.xe(0, batch_size=9, whole_photos=True)
    assert [len(s) for s in steps] == [9, 9, 9, 3]  # 3 photos' 3 captions each, then the last photo's
    assert sorted(torch.cat(steps).tolist()) == list(range(30))  # every caption once
    for rows in steps:
        photos = caption_photos[rows]
        assert all((caption_photos == p).sum() == (photos == p).sum() for p in photos.unique())


def test_one_vocabulary_holds_every_training_sets_words(two_sets, tmp_path):
    train_sets, _ = two_set_config(two_sets, tmp_path / "run", tmp_path / "cache").datasets()
    records, owners = load_sets(train_sets, "train", skip_invalid=False)
    assert sorted(set(owners)) == [0, 1] and len(records) == 32
    words = vocabulary(records, min_word_count=1).words
    assert {"indoors", "outdoors", "circle", "square"} <= set(words)  # each set's own word, and shared ones


# ------------------------------------------------------------------------------------------------ a run
@pytest.mark.slow  # trains for two epochs
def test_a_two_set_run_has_one_vocabulary_and_validates_and_logs_both(two_sets, feature_cache, tmp_path):
    out = tmp_path / "run"
    train(two_set_config(two_sets, out, feature_cache, select_set="mean"))
    vocab = json.loads((out / "best" / "vocab.json").read_text())
    words = vocab["words"] if isinstance(vocab, dict) else vocab
    assert {"indoors", "outdoors", "circle", "square"} <= set(words)  # each set's own word, and shared ones

    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for entry in history:
        assert set(entry["sets"]) == {"a", "b"}
        mean = (entry["sets"]["a"]["CIDEr-D"] + entry["sets"]["b"]["CIDEr-D"]) / 2
        assert entry["CIDEr-D"] == pytest.approx(mean, abs=1e-4)  # select_set=mean: the top-level is the mean

    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    scalars = board.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/a/CIDEr-D", "val/b/CIDEr-D", "val/b/BLEU-4"} <= set(scalars)
    for name in ("a", "b"):
        events = board.Scalars(f"val/{name}/CIDEr-D")
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([h["sets"][name]["CIDEr-D"] for h in history], abs=1e-4)
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx([h["loss"] for h in history], abs=1e-4)
    text = board.Tensors("captions/b/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.count("\n") >= 2 + 1 and "outdoors" in text  # a table of sample photos with a reference


@pytest.mark.slow  # trains one SCST epoch
def test_the_scst_reward_is_a_tensorboard_scalar(synthetic, feature_cache, tmp_path):
    out = tmp_path / "run"
    train(synthetic_config(synthetic, out, feature_cache, epochs=1, scst_epochs=1, scst_batch_size=8))
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in board.Scalars("train/scst_reward")] == \
        [(2, pytest.approx(-history[1]["loss"], abs=1e-4))]


def test_the_selection_set_picks_the_scores_of_best():
    scores = {"a": {"CIDEr-D": 0.2, "BLEU-4": 0.1}, "b": {"CIDEr-D": 0.6, "BLEU-4": 0.3}}
    assert selection(scores, "b") == scores["b"]
    assert selection(scores, "mean") == pytest.approx({"CIDEr-D": 0.4, "BLEU-4": 0.2})
    assert selection(scores, "") == scores["a"]  # the first set by default


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("flags, message", [
    (lambda r: ["--train-set", set_flag(r, "a", "train"), "--train-set", set_flag(r, "a", "train")], "given twice"),
    (lambda r: ["--train-set", set_flag(r, "a", "train", weight=0)], "weight must be between 0.01 and 100.0, not 0.0"),
    (lambda r: ["--train-set", set_flag(r, "a", "train", weight="inf")], "weight must be a finite number"),
    (lambda r: ["--train-set", set_flag(r, "a", "train", weight="many")], "weight must be a number, not 'many'"),
    (lambda r: ["--train-set", set_flag(r, "a", "train") + ",colour=red"], "expected captions=FILE,images=DIR"),
    (lambda r: ["--train-set", f"captions={r / 'a' / 'train.json'}"], "images= is required"),
    (lambda r: ["--train-set", set_flag(r, "a", "train") + f",captions={r / 'b' / 'train.json'}"],
     "captions= is given twice"),
    (lambda r: ["--train-set", set_flag(r, "a", "train", weight=2, name="x") + ",weight=3"], "weight= is given twice"),
    (lambda r: ["--train-set", set_flag(r, "a", "train"), "--train-set", set_flag(r, "b", "train", name="a")],
     "name a is given twice"),
    (lambda r: ["--train-set", set_flag(r, "a", "train"), "--images", str(r / "a" / "images")], "not both"),
    (lambda r: ["--train-set", set_flag(r, "a", "train")], "give the validation data too"),
    (lambda r: ["--train-set", set_flag(r, "a", "train"), "--val-set", set_flag(r, "a", "val", weight=2)],
     "weight is for training sets"),
    (lambda r: ["--train-set", set_flag(r, "a", "train"), "--val-set", set_flag(r, "a", "val"), "--select-set", "c"],
     "select_set 'c' is not a validation set's name"),
])
def test_bad_dataset_lists_are_one_line_errors(two_sets, tmp_path, train_in_process, flags, message):
    result = train_in_process(*flags(two_sets), "--out", str(tmp_path / "run"), "--encoder", "mobilenet_v2")
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def test_a_set_whose_every_image_is_missing_is_named(two_sets, tmp_path, train_in_process):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = train_in_process("--train-set", f"captions={two_sets / 'a' / 'train.json'},images={empty}",
                              "--val-set", set_flag(two_sets, "a", "val"), "--out", str(tmp_path / "run"),
                              "--encoder", "mobilenet_v2", "--skip-invalid")
    assert_one_line_error(result, "train.json: no usable images with captions", f"not found in {empty}")


def test_dataset_lists_from_a_config_file_are_checked_like_flags(two_sets):
    with pytest.raises(ConfigError, match=r"run\.toml: train_sets: unknown dataset key\(s\) colour"):
        run_options({}, {"train_sets": [{"captions": "x.json", "images": "x", "colour": "red"}]}, file_name="run.toml")
    with pytest.raises(ConfigError, match="run.toml: train_sets must be a list"):
        run_options({}, {"train_sets": {"captions": "x.json"}}, file_name="run.toml")
