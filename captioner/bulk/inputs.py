"""What bulk captioning is asked to caption: paths and folders, ``--files-from`` lists, shards.

Folders are expanded and sorted, duplicates dropped, and the output files themselves never taken as
input; a list file is bounded in size and lines and must be a regular file or a pipe.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..bounds import check_value
from ..data.images import IMAGE_EXTENSIONS
from ..distributed import launched_rank
from ..errors import ConfigError
from ..files import UTF8_BOM, check_kind, open_regular

log = logging.getLogger(__name__)

MAX_WORKERS = 64
MAX_SHARDS = 1_000_000
MAX_LIST_BYTES = 2 << 30  # --files-from: about 20 million paths of 100 bytes
MAX_LIST_LINES = 20_000_000
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
_INSTEAD = "; give a file, a pipe or -"  # what a refused --files-from is told


# ---------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Shard:
    """Files ``index, index + count, index + 2 count, ...`` of an input list."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"`` with ``0 <= I < N <= MAX_SHARDS``, or :class:`ConfigError`."""
        match = re.fullmatch(r"(\d{1,7})/(\d{1,7})", text.strip())
        if not match or not 0 <= int(match[1]) < int(match[2]) <= MAX_SHARDS:
            raise ConfigError(f"--shard must be I/N with 0 <= I < N <= {MAX_SHARDS:,} (e.g. 0/4), not {text[:40]!r}")
        return cls(int(match[1]), int(match[2]))

    def of(self, files: Sequence[str]) -> list[str]:
        return list(files[self.index::self.count])

    def split(self, part: int, parts: int) -> "Shard":
        """Share ``part`` of ``parts`` of this shard (a torchrun rank's): ``Shard.split(r, W).of(f) == self.of(f)[r::W]``."""
        return Shard(self.index + self.count * part, self.count * parts)


def find_images(paths: Sequence[str]) -> list[str]:
    """Expand folders (recursively, image extensions only, sorted); files are taken as given.

    A path that does not exist is a usage mistake (:class:`ConfigError`); a file that exists but cannot
    be read is the captioning loop's to report and skip.
    """
    found: list[str] = []
    for name in paths:
        path = Path(name)
        try:
            is_dir, exists = path.is_dir(), path.exists() or path.is_symlink()
        except OSError:  # a name too long, a loop of links...: the loader reports it with the other failures
            is_dir, exists = False, True
        if is_dir:
            found.extend(str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif exists:
            found.append(str(path))
        else:
            raise ConfigError(f"{name}: no such file or folder")
    return found


def read_file_list(source: str) -> list[str]:
    """The paths listed one per line in file ``source`` (``"-"``: standard input), blank lines skipped.

    Entries are taken as files, unchecked: one that is missing or unreadable gets an error record like any
    bad image. Bounds: ``MAX_LIST_BYTES``, ``MAX_LIST_LINES`` paths, ``MAX_PATH_BYTES`` per line, no NUL byte.
    ``source``, standard input too, is a regular file or a pipe (``--files-from <(find ...)``), never a device
    or folder, checked before anything is read (:func:`open_regular`).
    """
    name = "--files-from " + ("standard input" if source == "-" else source)
    if source == "-":
        with contextlib.suppress(io.UnsupportedOperation):  # an in-memory stream put in its place has no descriptor
            check_kind(sys.stdin.buffer.fileno(), name, "file list", _INSTEAD, pipes=True)
        return _listed_paths(sys.stdin.buffer, name)
    with open_regular(source, name, "file list", _INSTEAD, pipes=True) as handle:
        return _listed_paths(handle, name)


def _listed_paths(stream: BinaryIO, name: str) -> list[str]:
    """:func:`read_file_list`'s paths of ``stream``, read one line at a time, so that a stream is refused as soon
    as a bound is passed: a file over ``MAX_LIST_BYTES`` by its size, unread; a line over ``MAX_PATH_BYTES`` or
    holding a NUL byte (``head -c 1G /dev/zero |``) after that line, never after reading ``MAX_LIST_BYTES``."""
    with contextlib.suppress(io.UnsupportedOperation):
        if os.fstat(stream.fileno()).st_size > MAX_LIST_BYTES:
            raise ConfigError(f"{name}: file list larger than {MAX_LIST_BYTES} bytes")
    files: list[str] = []
    total = number = 0
    try:
        while raw := stream.readline((0 if number else len(UTF8_BOM)) + MAX_PATH_BYTES + 2):  # a path, "\r\n"
            number, total = number + 1, total + len(raw)
            if total > MAX_LIST_BYTES:
                raise ConfigError(f"{name}: file list larger than {MAX_LIST_BYTES} bytes")
            line = raw.removeprefix(UTF8_BOM) if number == 1 else raw  # a BOM, which Windows editors write
            line = line.removesuffix(b"\n").removesuffix(b"\r")
            if b"\0" in line or len(line) > MAX_PATH_BYTES:
                problem = "holds a NUL byte" if b"\0" in line else f"is longer than {MAX_PATH_BYTES} bytes"
                raise ConfigError(f"{name}: line {number} {problem}; expected one path per line")
            if not line.strip():
                continue
            if len(files) == MAX_LIST_LINES:
                raise ConfigError(f"{name}: more than {MAX_LIST_LINES:,} paths; split the list")
            files.append(os.fsdecode(line))
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read the file list ({exc.strerror or exc})") from None
    return files


def collect_inputs(paths: Sequence[str], files_from: str | None = None) -> list[str]:
    """The input list: ``paths`` (folders expanded), then ``files_from``'s lines; each file once, first place kept."""
    if not paths and files_from is None:
        raise ConfigError("give image files or folders, or --files-from LIST")
    files = find_images(paths) + (read_file_list(files_from) if files_from is not None else [])
    unique = list(dict.fromkeys(files))
    if len(unique) < len(files):
        log.warning("%d files are listed more than once; each is captioned once", len(files) - len(unique))
    if not unique:
        raise ConfigError("no images found in the given paths")
    return unique


def without_outputs(files: Sequence[str], outputs: Sequence[Path], known: Container[str], what: str) -> list[str]:
    """``files`` less those that are one of ``outputs`` (existing files) under whatever name: the same, another
    spelling, a symbolic or hard link; each one left out is logged as ``what``.

    A run never captions the file it writes (no image, and growing), and ``merge`` expects no record of its
    parts. Applied to a process's share, after the split into shards and ranks, so that the split stays the
    same in every process. Files in ``known`` (with a record already) are kept unchecked; each other one costs
    a ``stat``, as loading it would.
    """
    ids = {(found.st_dev, found.st_ino) for found in map(os.stat, outputs)}

    def is_output(file: str) -> bool:
        try:
            found = os.stat(file)
        except OSError:
            return False
        return (found.st_dev, found.st_ino) in ids

    kept = []
    for file in files:
        if file not in known and is_output(file):
            log.warning("%s is %s; it is left out of the inputs", file, what)
        else:
            kept.append(file)
    return kept


def check_workers(num_workers: object) -> int:
    """``--num-workers``: an integer from 0 to ``MAX_WORKERS``, or :class:`ConfigError`."""
    return check_value("--num-workers", num_workers, int, (0, MAX_WORKERS))


def this_share(files: Sequence[str], shard: Shard) -> list[str]:
    """``shard`` of ``files``, and under torchrun this rank's part of it."""
    launch = launched_rank()
    return shard.split(launch.rank, launch.world_size).of(files)
