"""Caption a collection: ``captioner caption PATHS... --out captions.jsonl`` and ``captioner merge``.

Images are loaded and preprocessed in DataLoader worker processes (:func:`features.image_batches`, the
loader of feature extraction) while this process runs one batched encode and decode per batch, the
next batch's encode on a second thread during this one's decode, each stage on half the cores; the
records of each batch are appended to ``--out`` and flushed before the next batch, so a kill at any
moment loses at most the batch in flight. ``captioner evaluate`` captions through the same
:func:`caption_records`.

The output is JSON lines, one record per input file, in input order::

    {"file": "photos/a.jpg", "captions": [{"text": "a dog runs", "log_prob": -4.1, "score": -1.3}],
     "labels": [{"label": "golden retriever", "probability": 0.83}, ...]}
    {"file": "photos/b.jpg", "error": "photos/b.jpg: not an image (unrecognised file format)"}

``file`` is the path as given (folders expanded, sorted); ``captions`` are most likely first;
``labels`` are the CNN's top ImageNet labels (see :meth:`Captioner.classify`); a file that cannot be
read gets an ``error`` record instead, and is not retried by a rerun.

Resume: a rerun with the same ``--out`` skips every file that already has a record there. A last line
without its newline (torn by a kill) after a complete record is cut off, and that file is captioned
again; nothing else in an existing file is ever changed, and a file that is not captioner JSONL is
refused. ``--out`` itself is never captioned, should it be among the inputs.

Shards: ``--shard I/N`` takes files ``I, I+N, I+2N, ...`` of the input list (after folders are expanded
and duplicates dropped), so the same command on N machines splits the work. Under ``torchrun`` each
rank further takes its share of that and writes ``OUT.rank-K.jsonl`` beside ``--out``.
``captioner merge`` is given the same inputs as the caption command: the input list is the order of
the merged file, and it checks that every input file has exactly one record among the parts.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import sys
import time
from collections.abc import Container, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

import torch
from tqdm.auto import tqdm

from .bounds import check_value, open_regular, read_bounded, read_limited
from .checkpoint import check_writable
from .decoding import Caption, GenerationConfig
from .distributed import launched_rank
from .errors import ConfigError, DataError, OutputError
from .features import ImageBatch, image_batches, loader_deaths
from .images import IMAGE_EXTENSIONS
from .model import Captioner
from .runtime import stage_threads, torch_threads

log = logging.getLogger(__name__)

MAX_WORKERS = 64
MAX_SHARDS = 1_000_000
MAX_LIST_BYTES = 2 << 30  # --files-from: about 20 million paths of 100 bytes
MAX_LIST_LINES = 20_000_000
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_RECORD_BYTES = 1 << 20  # one JSON line; ours are a few KB even with 64 captions
TOP_LABELS = 5
RECORD_START = b'{"file": '  # how every record we write begins (json.dumps keeps the key order)


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


def caption_record(file: str, captions: list[Caption], labels: list[tuple[str, float]] | None) -> dict:
    """A file's record: its captions (text, log_prob, score) and, when given, the CNN's labels."""
    record: dict = {"file": file, "captions": [{"text": c.text, "log_prob": round(c.log_prob, 4),
                                                "score": round(c.score, 4)} for c in captions]}
    if labels is not None:
        record["labels"] = [{"label": label, "probability": p} for label, p in labels]
    return record


class Writer(Protocol):
    done: dict[str, bool]  # files with a record already (True: an error record)

    @property
    def path(self) -> Path | None: ...  # the file written, if any

    def write(self, records: list[dict]) -> None: ...

    def close(self) -> None: ...


_LOCKS: set[int] = set()  # the descriptors of the --out locks this process holds


def _leave_locks_to_parent() -> None:
    """In a forked child (a DataLoader worker), close the copies of the lock descriptors: a ``flock`` lasts
    while any copy is open, and the lock must end with the process that holds it, not with its last worker."""
    while _LOCKS:
        os.close(_LOCKS.pop())


os.register_at_fork(after_in_child=_leave_locks_to_parent)


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
        """An exclusive ``flock`` on a descriptor of its own, which nothing else in this process touches.

        The kernel drops it when this process ends, however it ends, so a rerun after a kill is let in at once.
        Nothing else drops it: a POSIX lock (``lockf``) ends when the process closes any descriptor of the file,
        as the image loader did with an ``--out`` among the inputs, letting a second run in. Forked loader
        workers, which would keep a ``flock`` alive past this process, close their copy
        (:func:`_leave_locks_to_parent`).
        """
        descriptor = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not os.path.samestat(os.fstat(descriptor), os.fstat(self.handle.fileno())):
                raise OutputError(f"--out {self.path}: replaced by another file while being opened; run again")
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException as exc:
            os.close(descriptor)
            if isinstance(exc, BlockingIOError):
                raise OutputError(f"--out {self.path}: another captioner is writing to it; wait for it or choose "
                                  "another --out") from None
            raise
        _LOCKS.add(descriptor)
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
            _LOCKS.discard(self.lock)
            os.close(self.lock)
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


def this_share(files: Sequence[str], shard: Shard) -> list[str]:
    """``shard`` of ``files``, and under torchrun this rank's part of it."""
    launch = launched_rank()
    return shard.split(launch.rank, launch.world_size).of(files)


def rank_device(device: str) -> str:
    """``device``, except that ``auto``/``cuda`` under torchrun means this rank's own GPU (``LOCAL_RANK``)."""
    launch = launched_rank()
    if launch.world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{launch.local_rank % torch.cuda.device_count()}"
    return device


# ---------------------------------------------------------------------------------------- captioning
def caption_records(model: Captioner, files: Sequence[str], config: GenerationConfig, batch_size: int = 32,
                    num_workers: int = 0, labels: bool = True) -> Iterator[list[dict]]:
    """The records of ``files`` in order, one list per batch of ``batch_size``.

    Images are loaded in ``num_workers`` processes (0: this one); each batch is encoded once, decoded as
    ``config`` says and, with ``labels``, classified from the same features. Unreadable files get error records.
    The next batch is encoded on a second thread while this one is decoded, so the CNN's work and the
    search's overlap (both release the GIL); PyTorch computes on half the cores meanwhile
    (:func:`stage_threads`), as should ONNX Runtime (``Captioner.from_pretrained(num_threads=)``).
    """
    pin = model.device.type == "cuda"
    with torch_threads(stage_threads()):
        for batch, features in _encoded_ahead(model, image_batches(model.encoder, files, batch_size, num_workers,
                                                                   pin_memory=pin)):
            records = {index: {"file": files[index], "error": reason} for index, reason in batch.failures.items()}
            if features is not None:
                readable = [files[index] for index in batch.indices]
                records.update(zip(batch.indices, _caption_batch(model, readable, features, config, batch_size,
                                                                 labels)))
            yield [records[index] for index in sorted(records)]


def _encoded_ahead(model: Captioner, batches: Iterable[ImageBatch]) -> Iterator[tuple[ImageBatch, torch.Tensor | None]]:
    """Each batch with its features, the next batch's being computed on a thread meanwhile (one batch ahead)."""

    @torch.inference_mode()
    def encode(batch: ImageBatch) -> torch.Tensor | None:
        return None if batch.pixels is None else model.encode_pixels(batch.pixels)

    with ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
        pending: tuple[ImageBatch, Future] | None = None
        for batch in batches:
            submitted = (batch, pool.submit(encode, batch))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1].result()


@torch.inference_mode()
def _caption_batch(model: Captioner, files: list[str], features: torch.Tensor, config: GenerationConfig,
                   batch_size: int, labels: bool) -> list[dict]:
    """The records of a batch's readable images: one decode and, with ``labels``, one classification."""
    found = model.generate(features, config, batch_size=batch_size)
    tops: list = model.encoder.classify(features, TOP_LABELS) if labels else [None] * len(found)
    return [caption_record(file, captions, top) for file, captions, top in zip(files, found, tops)]


@dataclass
class Summary:
    """What :func:`caption_files` did."""

    files: int  # in this process's share
    skipped: int  # already in --out
    captioned: int  # records written now, error records included
    failed: int  # files of the share with an error record, earlier runs' included
    seconds: float


def caption_files(model: Captioner, files: Sequence[str], writer: Writer, config: GenerationConfig,
                  batch_size: int = 32, num_workers: int = 0, labels: bool = True) -> Summary:
    """Caption the ``files`` that ``writer`` has no record of yet, writing each batch's records as it is done.

    The file ``writer`` writes is not captioned if it is among ``files``. Each bad file is reported on stderr
    as it comes; progress (photos/s, ETA) shows on a terminal. A loader process that dies (killed) stops the
    run with a :class:`LoaderError`; the records written are kept.
    """
    if writer.path is not None:
        files = without_outputs(files, [writer.path], writer.done, "the file this run writes")
    todo = [file for file in files if file not in writer.done]
    failed = sum(writer.done.get(file, False) for file in files)
    started = time.perf_counter()
    resume = "the records written so far are kept, rerun the same command to resume" if writer.path else \
        "rerun the command"
    with tqdm(total=len(files), initial=len(files) - len(todo), unit="photo", desc="captioning",
              dynamic_ncols=True, disable=None) as bar, loader_deaths(resume):
        for records in caption_records(model, todo, config, batch_size, num_workers, labels):
            writer.write(records)
            for record in records:
                if "error" in record:
                    failed += 1
                    tqdm.write(f"error: {record['error']}", file=sys.stderr)
            bar.update(len(records))
    seconds = time.perf_counter() - started
    if todo:
        log.info("captioned %d file%s in %.1f s (%.1f photos/s)%s", len(todo), "" if len(todo) == 1 else "s", seconds,
                 len(todo) / seconds,
                 f"; {len(files) - len(todo)} already done" if len(todo) < len(files) else "")
    else:
        log.info("all %d files were already done", len(files))
    return Summary(len(files), len(files) - len(todo), len(todo), failed, seconds)


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
        temporary = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as target:
                for file in files:
                    handle, entry = found[file]
                    handle.seek(entry.start)
                    target.write(handle.read(entry.end - entry.start))
                target.flush()
                os.fsync(target.fileno())
            os.replace(temporary, out)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
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
