"""What bulk captioning is asked to caption: paths and folders, ``--files-from`` lists, shards.

Folders are expanded and sorted, duplicates dropped, and the output files themselves never taken as
input; a list file is bounded in size and lines and must be a regular file or a pipe.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..bounds import check_value, read_bounded, read_limited
from ..data.images import IMAGE_EXTENSIONS
from ..distributed import launched_rank
from ..errors import ConfigError

log = logging.getLogger(__name__)

MAX_WORKERS = 64
MAX_SHARDS = 1_000_000
MAX_LIST_BYTES = 2 << 30  # --files-from: about 20 million paths of 100 bytes
MAX_LIST_LINES = 20_000_000
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux


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
    ``source`` is a regular file or a pipe (``--files-from <(find ...)``), never a device or folder
    (:func:`read_bounded`).
    """
    name = "--files-from " + ("standard input" if source == "-" else source)
    if source == "-":
        raw = read_limited(sys.stdin.buffer, MAX_LIST_BYTES, name, "file list")
    else:
        raw = read_bounded(source, MAX_LIST_BYTES, name, "file list", "; give a file, a pipe or -", pipes=True)
    files: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        line = line.removesuffix(b"\r")
        if not line.strip():
            continue
        if len(line) > MAX_PATH_BYTES or b"\0" in line:
            problem = f"is {len(line):,} bytes long (at most {MAX_PATH_BYTES})" if b"\0" not in line else "holds a NUL byte"
            raise ConfigError(f"{name}: line {number} {problem}; expected one path per line")
        if len(files) == MAX_LIST_LINES:
            raise ConfigError(f"{name}: more than {MAX_LIST_LINES:,} paths; split the list")
        files.append(os.fsdecode(line))
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
