"""The JSON-lines output of bulk captioning: one record per input file, the resume scan and the writers.

:class:`JsonlFile` holds an ``flock`` on ``--out`` for the whole run, scans what earlier runs wrote
(cutting only a torn last line) and appends each batch's records flushed; :class:`StandardOutput`
writes to stdout, as JSON lines or as ``file<TAB>caption``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from ..distributed import launched_rank
from ..errors import ConfigError, OutputError
from ..files import check_writable, lock, release

log = logging.getLogger(__name__)
MAX_RECORD_BYTES = 1 << 20  # one JSON line; ours are a few KB even with 64 captions
RECORD_START = b'{"file": '  # how every record we write begins (json.dumps keeps the key order)


# ---------------------------------------------------------------------------------------- records
class Entry(NamedTuple):
    """One complete record of a JSONL file: its input file, whether it is an error, and its bytes' span."""

    file: str
    failed: bool
    start: int
    end: int


def scan_records(path: Path, handle: BinaryIO) -> tuple[list[Entry], int]:
    """The complete records of captioner JSONL ``handle``, and where they end: before a torn last line, if any.

    A torn last line (no newline: a write cut short by a kill) must look like the start of a record and
    follow a complete one: a file of one unfinished line may well be someone else's (``{"file": ...``
    cut by a tool, a lone ``{``), and holds no record anyway. Anything else that is not a record means the
    file is not ours: :class:`OutputError`, saying to delete the file if a run was killed in its first write.
    """
    entries: list[Entry] = []
    offset = number = 0
    handle.seek(0)
    while line := handle.readline(MAX_RECORD_BYTES + 1):
        number += 1
        torn = not line.endswith(b"\n") and len(line) <= MAX_RECORD_BYTES and (
            line.startswith(RECORD_START) or RECORD_START.startswith(line))
        if torn and entries:
            break  # readline stops short of a newline only at the end of the file
        record = _parse_record(line)
        if record is None:
            problem = "its only line is an unfinished record: delete the file if a run was killed writing it" if torn \
                else f"line {number} is not a record"
            raise OutputError(f"{path}: not a captioner JSONL file ({problem}); refusing to change it, choose "
                              "another file")
        entries.append(Entry(record["file"], "error" in record, offset, offset + len(line)))
        offset += len(line)
    return entries, offset


def _parse_record(line: bytes) -> dict | None:
    if not line.endswith(b"\n") or not line.startswith(RECORD_START):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = (isinstance(record, dict) and isinstance(record.get("file"), str)
          and (isinstance(record.get("captions"), list) or isinstance(record.get("error"), str)))
    return record if ok else None


class Writer(Protocol):
    done: dict[str, bool]  # files with a record already (True: an error record)

    @property
    def path(self) -> Path | None: ...  # the file written, if any

    def write(self, records: list[dict]) -> None: ...

    def close(self) -> None: ...


class JsonlFile:
    """Appends records to ``path``, one flushed write per batch, holding an exclusive lock on it.

    Opening checks the folder (written, synced and deleted probe), refuses what is not a regular file or not
    captioner JSONL, takes the lock (:meth:`_lock`), cuts a torn last line off and notes the files already done.
    """

    def __init__(self, path: Path):
        self.path = path
        check_writable(path.parent, "--out")
        if path.exists() and not path.is_file():
            raise OutputError(f"--out {path}: not a regular file")
        try:
            self.handle = open(path, "a+b")
        except OSError as exc:
            raise OutputError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
        self.lock: int | None = None
        try:
            self.lock = self._lock()
            self.done = self._claim()
        except BaseException as exc:
            self.close()
            if isinstance(exc, OSError):
                raise OutputError(f"--out {path}: cannot lock or read it ({exc.strerror or exc})") from None
            raise

    def _lock(self) -> int:
        """An exclusive ``flock`` (:func:`captioner.files.lock`) on a descriptor of its own, which nothing else in
        this process touches.

        The kernel drops it when this process ends, however it ends, so a rerun after a kill is let in at once.
        Nothing else drops it: a POSIX lock (``lockf``) ends when the process closes any descriptor of the file,
        as the image loader did with an ``--out`` among the inputs, letting a second run in. Forked loader
        workers, which would keep a ``flock`` alive past this process, close their copy.
        """
        try:
            descriptor = lock(self.path, blocking=False, flags=os.O_RDONLY)
        except BlockingIOError:
            raise OutputError(f"--out {self.path}: another captioner is writing to it; wait for it or choose "
                              "another --out") from None
        if not os.path.samestat(os.fstat(descriptor), os.fstat(self.handle.fileno())):
            release(descriptor)
            raise OutputError(f"--out {self.path}: replaced by another file while being opened; run again")
        return descriptor

    def _claim(self) -> dict[str, bool]:
        """Cut a torn last line off, and return the files the file has records of."""
        entries, end = scan_records(self.path, self.handle)
        size = self.handle.seek(0, os.SEEK_END)
        if end < size:
            self.handle.truncate(end)
            log.warning("%s: cut off a torn last line (%d bytes) left by an interrupted run; its file is captioned "
                        "again", self.path, size - end)
        return {entry.file: entry.failed for entry in entries}

    def write(self, records: list[dict]) -> None:
        try:
            self.handle.write(b"".join(json.dumps(record).encode() + b"\n" for record in records))
            self.handle.flush()
        except OSError as exc:
            raise OutputError(f"--out {self.path}: cannot write ({exc.strerror or exc}); the records written so "
                              "far are kept, rerun the same command to resume") from None

    def close(self) -> None:
        """Flush and close the file, then release the lock, so that no run gets in before the last records."""
        self.handle.close()
        if self.lock is not None:
            release(self.lock)
            self.lock = None


class StandardOutput:
    """Records on stdout: JSON lines, or ``file<TAB>caption`` per caption (errors go to stderr only).

    Lines are written as bytes, each file name as the bytes it has on disk (:func:`os.fsencode`), so that
    any name prints, whatever stdout's encoding, and names the very file (JSON escapes them instead).
    """

    path: Path | None = None  # nothing is written to a file

    def __init__(self, json_lines: bool):
        self.json_lines = json_lines
        self.done: dict[str, bool] = {}

    def write(self, records: list[dict]) -> None:
        if self.json_lines:
            lines = [json.dumps(record) for record in records]
        else:
            lines = [f"{record['file']}\t{caption['text']}" for record in records
                     for caption in record.get("captions", [])]
        sys.stdout.flush()  # anything printed before goes first
        sys.stdout.buffer.write(b"".join(os.fsencode(line) + b"\n" for line in lines))
        sys.stdout.buffer.flush()

    def close(self) -> None:
        sys.stdout.flush()


def part_path(out: Path, rank: int) -> Path:
    """Where torchrun rank ``rank`` writes: ``captions.rank-3.jsonl`` for ``captions.jsonl``."""
    return out.with_name(f"{out.stem}.rank-{rank}{out.suffix}")


def open_output(out: str | None, json_lines: bool = False) -> JsonlFile | StandardOutput:
    """The writer for ``--out`` (``None``: stdout); under torchrun, this rank's part file beside it."""
    launch = launched_rank()
    if out is None:
        if launch.world_size > 1:
            raise ConfigError("under torchrun, give --out FILE: each rank writes FILE's part .rank-K")
        return StandardOutput(json_lines)
    path = Path(out)
    return JsonlFile(part_path(path, launch.rank) if launch.world_size > 1 else path)
