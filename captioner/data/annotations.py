"""Caption annotations: load COCO or Karpathy-split files, validate them, and batch them for training.

Two formats are accepted, detected from the file's content:
- COCO captions: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``.
- Karpathy splits (``dataset_coco.json``, ``dataset_flickr8k.json``): ``{"images": [{"filename",
  "filepath"?, "split", "sentences": [{"raw"}]}]}``; a ``split`` argument selects the images.

Every problem in a file is collected before anything is reported, so a user fixes them in one pass.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import torch

from ..errors import DataError
from ..files import read_json
from .vocab import END_ID, START_ID, Vocabulary, pad, tokenize

MAX_EXAMPLES = 3
MAX_ANNOTATION_BYTES = 2 * 1024**3  # larger files are refused unread (parsed, 2 GB of JSON takes about 20 GB)
MAX_NAME_BYTES = 255  # longest file or folder name most file systems allow
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


@dataclass
class ImageCaptions:
    """One image and its reference captions."""

    image_id: int | str
    path: Path
    captions: list[str] = field(default_factory=list)


@dataclass
class LoadReport:
    """What loading kept and what ``skip_invalid`` left out."""

    images: int
    captions: int
    skipped: list[str] = field(default_factory=list)


def load_captions(
    annotation_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    split: str | None = None,
    skip_invalid: bool = False,
) -> tuple[list[ImageCaptions], LoadReport]:
    """Read and validate ``annotation_file`` against the images in ``image_dir``.

    ``split`` selects images of a Karpathy-split file (``train`` includes ``restval``); it is
    ignored for COCO files, which hold one split each. With ``skip_invalid`` the bad items are
    left out and listed in the report; otherwise any problem raises :class:`DataError`.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    data = read_json(annotation_file, MAX_ANNOTATION_BYTES, "annotation file", DataError)
    problems = _Problems(annotation_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{annotation_file}: expected a JSON object with an 'images' list")
    if "annotations" in data:
        records = _parse_coco(data, image_dir, problems)
    elif any(isinstance(image, dict) and "sentences" in image for image in data["images"]):
        records = _parse_karpathy(data, image_dir, split, problems)
    else:
        raise DataError(
            f"{annotation_file}: neither COCO format (images + annotations) "
            "nor Karpathy format (images[].sentences)"
        )
    for record in records:
        if not record.captions and not problems.image_has_problem(record.image_id):
            problems.add(record.image_id, f"image {record.image_id!r} ({record.path.name}): has no captions")
        if not _is_file(record.path):
            problems.add(record.image_id, f"image {record.image_id!r}: file {record.path.name} not found in {image_dir}")
    if problems.messages and not skip_invalid:
        raise DataError(problems.summary())
    kept = [r for r in records if not problems.image_has_problem(r.image_id) and r.captions]
    if not kept:
        raise DataError(f"{annotation_file}: no usable images with captions" + (
            f" ({problems.summary()})" if problems.messages else ""))
    return kept, LoadReport(len(kept), sum(len(r.captions) for r in kept), problems.messages)


class _Problems:
    """Collects problems; remembers which images they disqualify."""

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[str] = []
        self.bad_images: set = set()

    def add(self, image_id, message: str) -> None:
        self.messages.append(message)
        if image_id is not None:
            self.bad_images.add(_key(image_id))

    def image_has_problem(self, image_id) -> bool:
        return _key(image_id) in self.bad_images

    def summary(self) -> str:
        shown = "; ".join(self.messages[:MAX_EXAMPLES])
        more = f" (and {len(self.messages) - MAX_EXAMPLES} more)" if len(self.messages) > MAX_EXAMPLES else ""
        count = len(self.messages)
        return (f"{self.path}: {count} problem{'s' if count > 1 else ''}: {shown}{more}; "
                "fix the file or pass --skip-invalid to use only the valid items")


def _key(image_id) -> str:
    return str(image_id)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a path longer than the system allows
        return False


def _caption_problem(caption) -> str | None:
    if not isinstance(caption, str):
        return f"caption must be a string, got {type(caption).__name__}"
    if not caption.strip():
        return "caption is empty"
    if not tokenize(caption):
        return f"caption {caption!r} has no words"
    return None


def _valid_id(value: object) -> TypeGuard[int | str]:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value != "")


def _name_problem(value) -> str | None:
    """Why ``value`` cannot name a file or folder inside the image folder, or None."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    try:
        encoded = os.fsencode(value)
    except UnicodeEncodeError:
        return f"{reprlib.repr(value)} holds characters no file name can"
    if b"\0" in encoded:
        return f"{reprlib.repr(value)} holds a NUL character"
    parts = Path(value).parts
    if Path(value).is_absolute() or ".." in parts:
        return f"{reprlib.repr(value)} leads outside the image folder"
    if any(len(os.fsencode(part)) > MAX_NAME_BYTES for part in parts):
        return f"{reprlib.repr(value)} has a name longer than {MAX_NAME_BYTES} bytes"
    return None


def _image_file(problems: _Problems, where: str, image_id: int | str, file_name: object, field: str,
                seen) -> str | None:
    """``file_name`` if it is usable and the id was not seen before; otherwise None, the problem recorded."""
    if not isinstance(file_name, str) or not file_name:
        problems.add(image_id, f"{where}: missing or invalid '{field}'")
        return None
    problem = _name_problem(file_name)
    if problem:
        problems.add(image_id, f"{where}: '{field}' {problem}")
        return None
    if _key(image_id) in seen:
        problems.add(image_id, f"{where}: duplicate image id {image_id!r}")
        return None
    return file_name


def _parse_coco(data: dict, image_dir: Path, problems: _Problems) -> list[ImageCaptions]:
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise DataError(f"{problems.path}: 'annotations' must be a list")
    by_id: dict[str, ImageCaptions] = {}
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(image, dict):
            problems.add(None, f"{where}: must be an object")
            continue
        image_id = image.get("id")
        if not _valid_id(image_id):
            problems.add(None, f"{where}: missing or invalid 'id'")
            continue
        file_name = _image_file(problems, where, image_id, image.get("file_name"), "file_name", by_id)
        if file_name is not None:
            by_id[_key(image_id)] = ImageCaptions(image_id, image_dir / file_name)
    seen_annotation_ids: set = set()
    for j, annotation in enumerate(annotations):
        where = f"annotations[{j}]"
        if not isinstance(annotation, dict):
            problems.add(None, f"{where}: must be an object")
            continue
        if "id" in annotation:
            if not _valid_id(annotation["id"]):
                problems.add(None, f"{where}: invalid 'id' {reprlib.repr(annotation['id'])}")
                continue
            if annotation["id"] in seen_annotation_ids:
                problems.add(None, f"{where}: duplicate annotation id {annotation['id']!r}")
                continue
            seen_annotation_ids.add(annotation["id"])
        image_id = annotation.get("image_id")
        if "image_id" not in annotation or "caption" not in annotation:
            problems.add(None, f"{where}: missing key {'image_id' if 'image_id' not in annotation else 'caption'!r}")
            continue
        if not _valid_id(image_id) or _key(image_id) not in by_id:
            problems.add(None, f"{where}: image_id {image_id!r} is not in images")
            continue
        problem = _caption_problem(annotation["caption"])
        if problem:
            problems.add(None, f"{where}: {problem}")
            continue
        by_id[_key(image_id)].captions.append(annotation["caption"].strip())
    return list(by_id.values())


def _parse_karpathy(data: dict, image_dir: Path, split: str | None, problems: _Problems) -> list[ImageCaptions]:
    wanted = KARPATHY_SPLITS.get(split, (split,)) if split else None
    records: list[ImageCaptions] = []
    seen: set = set()
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(image, dict):
            problems.add(None, f"{where}: must be an object")
            continue
        if wanted and image.get("split") not in wanted:
            continue
        image_id = image.get("cocoid", image.get("imgid", i))
        if not _valid_id(image_id):
            problems.add(None, f"{where}: invalid 'cocoid' or 'imgid' {reprlib.repr(image_id)}")
            continue
        file_name = _image_file(problems, where, image_id, image.get("filename"), "filename", seen)
        if file_name is None:
            continue
        seen.add(_key(image_id))
        folder = image.get("filepath") or ""
        problem = folder and _name_problem(folder)
        if problem:
            problems.add(image_id, f"{where}: 'filepath' {problem}")
            continue
        record = ImageCaptions(image_id, image_dir / folder / file_name)
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            problems.add(image_id, f"{where}: 'sentences' must be a list")
            continue
        for k, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if raw is None and isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
                raw = " ".join(map(str, sentence["tokens"]))
            problem = "missing 'raw'" if raw is None else _caption_problem(raw)
            if problem or raw is None:  # (a missing raw is a problem: tested again for the type checker)
                problems.add(None, f"{where}.sentences[{k}]: {problem}")
                continue
            record.captions.append(raw.strip())
        records.append(record)
    if wanted and not records and not problems.messages:
        raise DataError(f"{problems.path}: no images with split {' or '.join(wanted)!r}")
    return records


@dataclass
class EncodedCaptions:
    """All captions of a split as one padded tensor: ``<start> w1 .. wn <end> <pad>..``."""

    tokens: torch.Tensor  # (num_captions, max_length + 2), long
    lengths: torch.Tensor  # (num_captions,), number of tokens including <start> and <end>
    image_index: torch.Tensor  # (num_captions,), row of the caption's image
    truncated: int  # captions cut to max_length words

    def __len__(self) -> int:
        return len(self.lengths)


def encode_captions(records: Sequence[ImageCaptions], vocab: Vocabulary, max_length: int) -> EncodedCaptions:
    """Turn every caption into ids, cut to ``max_length`` words (the count of cuts is reported)."""
    rows, owners, truncated = [], [], 0
    for index, record in enumerate(records):
        for caption in record.captions:
            ids = vocab.encode(caption)
            if len(ids) > max_length:
                ids, truncated = ids[:max_length], truncated + 1
            rows.append([START_ID, *ids, END_ID])
            owners.append(index)
    tokens, lengths = pad(rows)
    return EncodedCaptions(tokens, lengths, torch.tensor(owners), truncated)
