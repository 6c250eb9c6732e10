"""``captioner merge``: join the per-rank or per-shard parts of a run into one file in input order.

Every input file must have exactly one record among the parts; the merged file is written atomically
and nothing is lost if a part is missing or holds a file twice.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, DataError, OutputError
from ..files import atomic_file, open_regular
from .inputs import without_outputs
from .jsonl import Entry, part_path, scan_records

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- merge
def default_parts(out: Path) -> list[Path]:
    """The torchrun parts of ``out`` (``captions.rank-K.jsonl``), by rank."""
    pattern = re.compile(re.escape(out.stem) + r"\.rank-(\d+)" + re.escape(out.suffix))
    candidates = out.parent.glob(f"{glob.escape(out.stem)}.rank-*{glob.escape(out.suffix)}")
    found = [(int(m[1]), p) for p in candidates if (m := pattern.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def merge(files: Sequence[str], parts: Sequence[Path], out: Path) -> int:
    """Join the records of ``parts`` into ``out`` in the order of ``files``; returns the number of error records.

    Every file must have exactly one record among the parts, and the parts no other record
    (:class:`DataError` otherwise, naming counts and examples); a part among the files needs none, as
    caption runs leave out the file they write. ``out`` is written under a temporary
    name and renamed into place; an existing ``out`` is replaced only when it is captioner JSONL whose
    files all have a record in the merge, so nothing it holds is lost.
    """
    if not parts:
        raise ConfigError(f"no parts to merge: give --parts, or run under torchrun first ({part_path(out, 0)}...)")
    if any(out.resolve() == part.resolve() for part in parts):
        raise ConfigError(f"--out {out} is one of the parts; merge into another file")
    handles = [open_regular(part, str(part), "part") for part in parts]
    try:
        found: dict[str, tuple[BinaryIO, Entry]] = {}
        twice: list[str] = []
        for part, handle in zip(parts, handles):
            entries, end = scan_records(part, handle)
            if end < handle.seek(0, os.SEEK_END):
                raise DataError(f"{part}: its last line is torn (an interrupted run); rerun its caption command first")
            for entry in entries:
                if entry.file in found:
                    twice.append(entry.file)
                found.setdefault(entry.file, (handle, entry))
        files = without_outputs(files, parts, found, "one of the parts")
        _check_complete(files, found, twice)
        _keep_nothing_lost(out, found)
        try:
            with atomic_file(out) as temporary, open(temporary, "wb") as target:
                for file in files:
                    handle, entry = found[file]
                    handle.seek(entry.start)
                    target.write(handle.read(entry.end - entry.start))
        except OSError as exc:
            raise OutputError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    finally:
        for handle in handles:
            handle.close()
    failed = sum(found[file][1].failed for file in files)
    log.info("%s: %d records from %d parts (%d errors)", out, len(files), len(parts), failed)
    return failed


def _check_complete(files: Sequence[str], found: dict, twice: list[str]) -> None:
    inputs = set(files)
    missing = [file for file in files if file not in found]
    extra = [file for file in found if file not in inputs]
    problems = [f"{len(names):,} {what} (e.g. {names[0]})" for what, names in
                (("input files have no record", missing), ("files have more than one record", twice),
                 ("records are of files not among the inputs", extra)) if names]
    if problems:
        raise DataError("cannot merge: " + "; ".join(problems))


def _keep_nothing_lost(out: Path, found: dict) -> None:
    if not out.exists():
        return
    if not out.is_file():
        raise OutputError(f"--out {out}: not a regular file")
    with open(out, "rb") as handle:
        entries, _ = scan_records(out, handle)
    lost = [entry.file for entry in entries if entry.file not in found]
    if lost:
        raise OutputError(f"--out {out} exists and holds {len(lost):,} records the merge would not (e.g. {lost[0]}); "
                          "choose another --out")
