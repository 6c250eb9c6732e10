"""Checkpoint directories on disk: safetensors and JSON only, written atomically.

A checkpoint is a directory. It is written under a temporary name and swapped into place with
renames, so a crash at any moment leaves either the previous complete checkpoint or the new one,
never a mixture. Pickle files are refused outright: nothing in a checkpoint is ever executed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import files
from .errors import CaptionerError, CheckpointError, OutputError
from .files import recover

CONFIG_FILE, VOCAB_FILE, MODEL_FILE, ENCODER_FILE = "config.json", "vocab.json", "model.safetensors", "encoder.safetensors"
# A training run's: resume state in last/ (train_state), the selecting scores in best/.
TRAINER_FILE, STATE_FILE, METRICS_FILE = "trainer.json", "training_state.safetensors", "metrics.json"
RUN_FILES = (TRAINER_FILE, STATE_FILE, METRICS_FILE)
GRAPH_FILES = ("encoder.onnx", "decoder_init.onnx", "decoder_step.onnx")  # for other runtimes; never executed here
OUR_FILES = frozenset({CONFIG_FILE, VOCAB_FILE, MODEL_FILE, ENCODER_FILE, *RUN_FILES, *GRAPH_FILES})
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar"}
MAX_JSON_BYTES = 64 << 20  # config.json, vocab.json, trainer.json: far above any real one
MAX_TENSOR_FILE_BYTES = 2 << 30  # a weights file is read whole into memory (float16 doubles on loading)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces ``path`` in one swap
    (:func:`captioner.files.atomic_directory`: concurrent writers all succeed, the last one wins).

    A write that fails (full disk, read-only folder) is a :class:`CheckpointError` and leaves ``path`` as it was.
    """
    path = Path(path)
    try:
        with files.atomic_directory(path) as temporary:
            yield temporary
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: checkpoint not saved ({_reason(exc)}); any previous one is kept") from None


def _reason(exc: Exception) -> str:
    """The operating system's words for a failed write; safetensors wraps them as ``... (os error 28)``."""
    code = getattr(exc, "errno", None) or next(map(int, re.findall(r"os error (\d+)", str(exc))), None)
    return os.strerror(code) if code else str(exc)


def check_directory(path: str | os.PathLike[str]) -> Path:
    """A readable checkpoint directory holding no pickles, whose files stay inside it, or :class:`CheckpointError`.

    A link among the files loading reads may point within the folder, never outside it: a folder must not
    make loading read another model's weights or any other file of the machine.
    """
    path = recover(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: refusing a checkpoint holding pickle files ({', '.join(pickles[:3])}); only safetensors "
            "and JSON are loaded, since unpickling can run arbitrary code"
        )
    for name in (CONFIG_FILE, VOCAB_FILE, MODEL_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: not a captioner checkpoint ({name} is missing)")
    inside = path.resolve()
    for name in (CONFIG_FILE, VOCAB_FILE, MODEL_FILE, ENCODER_FILE):
        if (path / name).is_symlink() and not (path / name).resolve().is_relative_to(inside):
            raise CheckpointError(f"{path}: {name} is a link to a file outside the checkpoint folder; copy the file in")
    return path


def check_replaceable(path: str | os.PathLike[str]) -> Path:
    """``path``, if a checkpoint may be saved there: missing, an empty folder, or a checkpoint of ours.

    A save replaces the whole folder, so anything else (a file, a link, a folder holding other files or
    folders, a checkpoint's parent) is refused with :class:`OutputError` before anything is touched.
    """
    path = recover(path)
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; give the checkpoint folder itself")
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputError(f"{path}: is a file, not a checkpoint folder; refusing to replace it")
    entries = list(path.iterdir())
    foreign = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in entries
                     if entry.name not in OUR_FILES or entry.is_symlink() or not entry.is_file())
    if foreign or (entries and not (path / CONFIG_FILE).is_file()):
        held = f"holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}" if foreign else "no config.json"
        raise OutputError(f"{path}: not a captioner checkpoint ({held}); refusing to replace it, "
                          "choose a new or empty folder")
    return path


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parsed JSON of a checkpoint file (:func:`captioner.files.read_json`), problems as :class:`CheckpointError`."""
    return files.read_json(path, max_bytes, "checkpoint file", CheckpointError)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o644)  # safetensors creates files 0600; a checkpoint is meant to be shared like its JSON


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file from its header alone (no tensor is read)."""
    _check_size(path)
    try:
        with safe_open(str(path), "pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    _check_size(path)
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


def _check_size(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if size > MAX_TENSOR_FILE_BYTES:
        raise CheckpointError(f"{path}: {size:,} bytes, above the limit of {MAX_TENSOR_FILE_BYTES:,} for a weights file")


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str,
                 optional_prefix: str | None = None, error: type[CaptionerError] = CheckpointError) -> None:
    """The names and shapes a weights file holds equal those a module expects (``optional_prefix``: may be
    absent, e.g. a classifier head), else one ``error`` line naming the first difference."""
    mismatched = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    missing = sorted(k for k in set(expected) - set(found) if not (optional_prefix and k.startswith(optional_prefix)))
    unexpected = sorted(set(found) - set(expected))
    if mismatched:
        name = mismatched[0]
        raise error(f"{where}: shape of {name} is {tuple(found[name])}, expected {tuple(expected[name])}")
    if missing or unexpected:
        raise error(f"{where}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def check_values(tensors: dict[str, torch.Tensor], where: str, error: type[CaptionerError] = CheckpointError) -> None:
    """Weights are floating point and finite: NaN or infinity would caption every image with noise."""
    for name, tensor in tensors.items():
        if name.endswith("num_batches_tracked"):  # BatchNorm's one integer buffer
            continue
        if tensor.dtype not in WEIGHT_DTYPES:
            raise error(f"{where}: {name} is {tensor.dtype}; weights must be float32, float16 or bfloat16")
        if not torch.isfinite(tensor).all():
            raise error(f"{where}: {name} holds NaN or infinite values")
