"""The feature cache encodes each image once and notices every change that alters features."""

import shutil

import pytest
import torch
from PIL import Image

from captioner.models.encoder import Encoder
from captioner.train.features import FeatureCache, extract_features


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        path = folder / f"{i}.png"
        Image.new("RGB", (40, 30), colour).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return Encoder.pretrained("resnet18", "none").eval()


def test_cache_encodes_once_and_matches_direct_extraction(tmp_path, images, encoder):
    cache = FeatureCache(tmp_path / "cache", encoder)
    first, encoded, _ = cache.get(images, progress=False)
    assert encoded == 3
    again, encoded, _ = cache.get(list(reversed(images)), progress=False)
    assert encoded == 0
    assert torch.equal(again, first.flip(0))
    assert torch.allclose(first, extract_features(encoder, images, progress=False), atol=1e-5)


def test_changed_image_file_is_re_encoded(tmp_path, images, encoder):
    cache = FeatureCache(tmp_path / "cache", encoder)
    before, _, _ = cache.get(images, progress=False)
    Image.new("RGB", (40, 30), (255, 255, 0)).save(images[1])
    after, encoded, _ = cache.get(images, progress=False)
    assert encoded == 1
    assert torch.equal(after[0], before[0]) and not torch.allclose(after[1], before[1])
    shutil.copy(images[0], images[2])  # same bytes as a cached image: no work
    assert cache.get(images, progress=False)[1] == 0


def test_other_encoder_weights_or_preprocessing_use_another_cache(tmp_path, encoder):
    same = FeatureCache(tmp_path, encoder)
    torch.manual_seed(1)
    other_weights = Encoder.pretrained("resnet18", "none")
    assert FeatureCache(tmp_path, other_weights).path != same.path
    other_preprocessing = Encoder(encoder.config.__class__.from_dict({**encoder.config.to_dict(),
                                  "preprocessing": {**encoder.config.to_dict()["preprocessing"], "crop_size": 192}}),
                                  encoder.backbone.state_dict())
    assert FeatureCache(tmp_path, other_preprocessing).path != same.path
    other_backbone = Encoder.pretrained("resnet34", "none")
    assert FeatureCache(tmp_path, other_backbone).path != same.path
    assert FeatureCache(tmp_path, Encoder(encoder.config, encoder.backbone.state_dict())).path == same.path


def test_views_are_mirrors_and_crops_of_the_centre_view(images, encoder):
    from captioner.models.preprocessing import VIEWS
    from captioner.data.images import load_image

    image = load_image(images[0]).resize((320, 256))  # symmetric centre crop after the resize to 256
    image.paste((0, 0, 0), (0, 0, 160, 256))  # left half black, right half red
    preprocessing = encoder.config.preprocessing
    centre = preprocessing.view_transform("center")(image)
    assert torch.allclose(centre, encoder.preprocess(image))
    assert torch.allclose(preprocessing.view_transform("flip")(image), centre.flip(-1), atol=1e-5)
    left, right = (preprocessing.view_transform(v)(image) for v in ("top-left", "top-right"))
    assert left.shape == right.shape == centre.shape
    assert left[0].mean() < centre[0].mean() < right[0].mean()  # red channel: more red towards the right
    assert len(VIEWS) == 10 and len(set(VIEWS)) == 10


def test_each_view_has_its_own_cache(tmp_path, images, encoder):
    for path in images:  # asymmetric pictures, so that the mirror image differs
        picture = Image.open(path).convert("RGB")
        picture.paste((255, 255, 255), (0, 0, 12, 30))
        picture.save(path)
    centre = FeatureCache(tmp_path, encoder)
    flipped = FeatureCache(tmp_path, encoder, "flip")
    assert centre.path != flipped.path
    a, _, _ = centre.get(images, progress=False)
    b, encoded, _ = flipped.get(images, progress=False)
    assert encoded == 3 and not torch.allclose(a, b)
