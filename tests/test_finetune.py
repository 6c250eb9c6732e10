"""Fine-tuning: a run that starts from a trained checkpoint (``--init-from``, one member of an ensemble), and the
CNN trained under the decoder with each photo going through it once per step, not once per caption."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.errors import ConfigError
from captioner.models.decoder import Decoder
from captioner.train.features import cache_key
from captioner.train.model import initial_model
from captioner.train.trainer import prepare
from conftest import synthetic_config
from synthetic import make_split

TINY = dict(embed_size=16, hidden_size=32, dropout=0.2, input_dropout=0.0)  # the shape of conftest's tiny_model


@pytest.fixture(scope="module")
def ensemble_dir(tiny_model, tmp_path_factory) -> Path:
    """A saved 2-decoder ensemble over ``tiny_model``'s encoder and vocabulary."""
    torch.manual_seed(7)
    other = copy.deepcopy(tiny_model)
    other.decoder = Decoder(tiny_model.decoder.config).eval()
    return Captioner.ensemble([tiny_model, other]).save_pretrained(tmp_path_factory.mktemp("ensemble") / "model")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    make_split(root, "train", 10, seed=4)
    make_split(root, "val", 4, seed=5, start_id=1000)
    return root


def config_from(small_set: Path, out: Path, **overrides):
    return synthetic_config(small_set, out, out / "cache", **{**TINY, "epochs": 1, **overrides})


def test_init_from_an_ensemble_starts_from_the_chosen_member(ensemble_dir, small_set, tmp_path):
    ensemble = Captioner.from_pretrained(ensemble_dir, device="cpu", engine="torch")
    for member in (1, 2):
        model = initial_model(config_from(small_set, tmp_path, init_from=str(ensemble_dir), init_member=member), [])
        wanted = ensemble.decoder.decoders()[member - 1].state_dict()
        assert model.decoder.state_dict().keys() == wanted.keys()
        assert all(torch.equal(model.decoder.state_dict()[k], wanted[k]) for k in wanted)
        assert model.vocab.words == ensemble.vocab.words  # the checkpoint's vocabulary, not one built anew
        assert model.decoder.config.dropout == TINY["dropout"]  # the run's dropout, not the checkpoint's
    assert not torch.equal(*(initial_model(config_from(small_set, tmp_path, init_from=str(ensemble_dir),
                                                       init_member=m), []).decoder.output.weight for m in (1, 2)))


def test_fresh_decoder_trains_a_new_member_on_the_checkpoints_vocabulary(ensemble_dir, small_set, tmp_path):
    ensemble = Captioner.from_pretrained(ensemble_dir, device="cpu", engine="torch")
    model = initial_model(config_from(small_set, tmp_path, init_from=str(ensemble_dir), fresh_decoder=True), [])
    assert model.vocab.words == ensemble.vocab.words
    for member in ensemble.decoder.decoders():
        assert not torch.equal(model.decoder.output.weight, member.output.weight)
    grown = Captioner.ensemble([ensemble, model])  # what `captioner export` builds from the three members
    assert len(grown.decoder.decoders()) == 3


@pytest.mark.parametrize("overrides", [dict(fresh_decoder=True, init_from=""),
                                       dict(fresh_decoder=True, init_member=1)])
def test_fresh_decoder_needs_init_from_without_a_member(ensemble_dir, small_set, tmp_path, overrides):
    with pytest.raises(ConfigError, match="--fresh-decoder takes --init-from's vocabulary and encoder only"):
        config_from(small_set, tmp_path, **{"init_from": str(ensemble_dir), **overrides}).validate()


@pytest.mark.parametrize("overrides, message", [
    (dict(init_member=0), "is an ensemble of 2 decoders; pick one, 1 to 2"),
    (dict(init_member=3), "is an ensemble of 2 decoders; pick one, 1 to 2"),
    (dict(init_member=1, hidden_size=64), "has hidden_size 32, this run asks for 64"),
    (dict(init_member=1, encoder="resnet18"), "has encoder mobilenet_v2, this run asks for resnet18"),
])
def test_init_from_refuses_what_does_not_fit(ensemble_dir, small_set, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        initial_model(config_from(small_set, tmp_path, init_from=str(ensemble_dir), **overrides), [])


def test_init_member_needs_an_ensemble_to_pick_from(tiny_model_dir, small_set, tmp_path):
    with pytest.raises(ConfigError, match="has one decoder"):
        initial_model(config_from(small_set, tmp_path, init_from=str(tiny_model_dir), init_member=2), [])
    with pytest.raises(ConfigError, match="give --init-from too"):
        config_from(small_set, tmp_path, init_member=1).validate()


def test_encoder_weights_replace_the_init_checkpoints_encoder(tiny_model, tiny_model_dir, small_set, tmp_path):
    """Another CNN's weights under a trained decoder: the encoder is identified by its file, so cached features
    of the checkpoint's own CNN are never reused for it, and an ensemble accepts it beside the same tensors."""
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(changed.encoder.backbone.parameters()).mul_(0.5)
    weights = tmp_path / "cnn.safetensors"
    from safetensors.torch import save_file

    save_file(changed.encoder.weights_state_dict(), str(weights))
    model = initial_model(config_from(small_set, tmp_path, init_from=str(tiny_model_dir),
                                      encoder_weights=str(weights)), [])
    assert model.encoder.config.weights.kind == "file"
    assert cache_key(model.encoder) != cache_key(tiny_model.encoder)
    assert torch.equal(next(model.encoder.backbone.parameters()), next(changed.encoder.backbone.parameters()))
    changed.encoder.config.weights = type(changed.encoder.config.weights)("fine-tuned")
    assert len(Captioner.ensemble([model, changed]).decoder.decoders()) == 2  # same tensors, other identity
    with pytest.raises(ConfigError, match="another encoder"):
        Captioner.ensemble([model, tiny_model])


@pytest.mark.slow
def test_finetuning_sends_each_photo_through_the_cnn_once_per_epoch(tiny_model_dir, small_set, tmp_path):
    config = config_from(small_set, tmp_path / "run", init_from=str(tiny_model_dir), finetune_encoder=True,
                         encoder_lr=1e-3, batch_size=15, augment="flip")
    trainer = prepare(config)
    batches: list[int] = []
    trainer.model.encoder.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    before = copy.deepcopy(trainer.model.state_dict())
    steps = trainer.batches.xe(0, config.batch_size, whole_photos=True)
    trainer._xe_epoch()
    photos, captions = len(trainer.train_split.records), len(trainer.captions.image_index)
    assert (photos, captions) == (10, 30)
    assert sum(batches) == photos and len(batches) == len(steps) == 2  # 15 captions a step: 5 photos' 3 each
    assert sorted(torch.cat(steps).tolist()) == list(range(captions))  # every caption once, with its photo's others
    for rows in steps:
        assert len(set(trainer.captions.image_index[rows].tolist())) * 3 == len(rows) == 15
    after = trainer.model.state_dict()
    for part in ("encoder.", "decoder."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(part)), part
    trainer.close()


def test_a_fine_tuned_encoder_is_stored_in_float16_with_half_precision(tiny_model, synthetic, tmp_path):
    from safetensors import safe_open

    from captioner.cli import main

    tuned = copy.deepcopy(tiny_model)
    tuned.encoder.config.weights = type(tuned.encoder.config.weights)("fine-tuned")
    source = tuned.save_pretrained(tmp_path / "tuned")
    assert main(["export", str(source), str(tmp_path / "half"), "--half-precision"]) == 0
    with safe_open(str(tmp_path / "half" / "encoder.safetensors"), "pt") as stored:
        dtypes = {name: stored.get_slice(name).get_dtype() for name in stored.keys()}
    assert {dtype for name, dtype in dtypes.items() if not name.endswith("num_batches_tracked")} == {"F16"}
    assert {dtypes[name] for name in dtypes if name.endswith("num_batches_tracked")} == {"I64"}
    full = (tmp_path / "tuned" / "encoder.safetensors").stat().st_size
    assert (tmp_path / "half" / "encoder.safetensors").stat().st_size < 0.55 * full
    images = sorted((synthetic / "images").glob("test_*.png"))[:6]
    half = Captioner.from_pretrained(tmp_path / "half", device="cpu", engine="torch")
    assert torch.allclose(half.encode(images), tuned.encode(images), atol=0.05)
    assert half.classify(half.encode(images[:1]))[0][0][0] == tuned.classify(tuned.encode(images[:1]))[0][0][0]
