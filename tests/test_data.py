"""Annotation loading: both formats, and every kind of problem reported at once."""

import json

import pytest

from captioner.data.annotations import encode_captions, load_captions
from captioner.errors import DataError
from captioner.data.vocab import END_ID, START_ID, Vocabulary


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (images / name).write_bytes(b"x")
    return tmp_path


def coco(folder, images=None, annotations=None) -> str:
    data = {"images": images if images is not None else [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": annotations if annotations is not None else [
                {"id": 1, "image_id": 1, "caption": "A dog."}, {"id": 2, "image_id": 1, "caption": "a brown dog"},
                {"id": 3, "image_id": 2, "caption": "A cat"}]}
    path = folder / "captions.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_format(folder):
    records, report = load_captions(coco(folder), folder / "images")
    assert [(r.image_id, r.path.name, r.captions) for r in records] == \
        [(1, "a.jpg", ["A dog.", "a brown dog"]), (2, "b.jpg", ["A cat"])]
    assert (report.images, report.captions, report.skipped) == (2, 3, [])


def test_karpathy_format_with_splits(folder):
    (folder / "images" / "sub").mkdir()
    (folder / "images" / "sub" / "d.jpg").write_bytes(b"x")
    data = {"images": [
        {"filename": "a.jpg", "split": "train", "imgid": 0, "sentences": [{"raw": "a dog"}, {"tokens": ["big", "dog"]}]},
        {"filename": "d.jpg", "filepath": "sub", "split": "restval", "imgid": 1, "sentences": [{"raw": "a cat"}]},
        {"filename": "b.jpg", "split": "val", "imgid": 2, "sentences": [{"raw": "a bird"}]},
        {"filename": "c.jpg", "split": "test", "imgid": 3, "sentences": [{"raw": "a fish"}]}]}
    path = folder / "dataset_flickr8k.json"
    path.write_text(json.dumps(data))
    train, _ = load_captions(path, folder / "images", "train")
    assert [(r.path.relative_to(folder / "images").as_posix(), r.captions) for r in train] == \
        [("a.jpg", ["a dog", "big dog"]), ("sub/d.jpg", ["a cat"])]
    assert [r.captions for r in load_captions(path, folder / "images", "val")[0]] == [["a bird"]]
    assert [r.captions for r in load_captions(path, folder / "images", "test")[0]] == [["a fish"]]
    with pytest.raises(DataError, match="no images with split"):
        load_captions(path, folder / "images", "nonexistent")


@pytest.mark.parametrize("content, message", [
    ("{not json", "malformed JSON at line 1"),
    ("[1, 2]", "expected a JSON object with an 'images' list"),
    ('{"images": [{"id": 1}]}', "neither COCO format"),
    ('{"images": [], "annotations": {}}', "'annotations' must be a list"),
])
def test_file_level_problems(folder, content, message):
    path = folder / "captions.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_captions(path, folder / "images")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_non_utf8_file(folder):
    path = folder / "captions.json"
    path.write_bytes('{"images": [], "annotations": [{"caption": "caf\u00e9"}]}'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_captions(path, folder / "images")


def test_missing_files(folder):
    with pytest.raises(DataError, match="annotation file not found"):
        load_captions(folder / "nope.json", folder / "images")
    with pytest.raises(DataError, match="image folder not found"):
        load_captions(coco(folder), folder / "no-images")


BAD_ITEMS = [
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}]}, "duplicate image id 1"),
    ({"images": [{"file_name": "a.jpg"}]}, "images[0]: missing or invalid 'id'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}]}, "images[1]: missing or invalid 'file_name'"),
    ({"annotations": [{"id": 1, "image_id": 99, "caption": "a dog"}]}, "image_id 99 is not in images"),
    ({"annotations": [{"id": 1, "image_id": 1}]}, "missing key 'caption'"),
    ({"annotations": [{"id": 1, "image_id": 1, "caption": "  "}]}, "caption is empty"),
    ({"annotations": [{"id": 1, "image_id": 1, "caption": 42}]}, "caption must be a string"),
    ({"annotations": [{"id": 1, "image_id": 1, "caption": "!!"}]}, "has no words"),
    ({"annotations": [{"id": 1, "image_id": 1, "caption": "a"}, {"id": 1, "image_id": 2, "caption": "b"}]},
     "duplicate annotation id 1"),
    ({"images": [{"id": 1, "file_name": "missing.jpg"}], "annotations": [{"image_id": 1, "caption": "a dog"}]},
     "file missing.jpg not found"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
      "annotations": [{"image_id": 1, "caption": "a dog"}]}, "image 2 (b.jpg): has no captions"),
]


@pytest.mark.parametrize("change, message", BAD_ITEMS)
def test_item_problems(folder, change, message):
    path = coco(folder, change.get("images"), change.get("annotations"))
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")) as error:
        load_captions(path, folder / "images")
    assert "--skip-invalid" in str(error.value)


def test_all_problems_reported_together_and_skip_invalid(folder):
    path = coco(folder, annotations=[{"image_id": 1, "caption": "a dog"}, {"image_id": 7, "caption": "x"},
                                     {"image_id": 2, "caption": ""}, {"image_id": 8, "caption": "y"},
                                     {"image_id": 9, "caption": "z"}, {"image_id": 2, "caption": "a cat"}])
    with pytest.raises(DataError, match=r": 4 problems: .*\(and 1 more\)"):
        load_captions(path, folder / "images")
    records, report = load_captions(path, folder / "images", skip_invalid=True)
    assert [r.captions for r in records] == [["a dog"], ["a cat"]]
    assert len(report.skipped) == 4


def test_encode_captions_pads_and_truncates():
    from captioner.data.annotations import ImageCaptions
    from pathlib import Path

    vocab = Vocabulary.build(["one two three four five"], min_count=1)
    records = [ImageCaptions(1, Path("a"), ["one two three four five", "two"]), ImageCaptions(2, Path("b"), ["three"])]
    encoded = encode_captions(records, vocab, max_length=3)
    assert encoded.truncated == 1
    assert encoded.lengths.tolist() == [5, 3, 3]
    assert encoded.image_index.tolist() == [0, 0, 1]
    assert encoded.tokens[0].tolist() == [START_ID, *vocab.encode("one two three"), END_ID]
    assert encoded.tokens[1].tolist() == [START_ID, vocab.index["two"], END_ID, 0, 0]
