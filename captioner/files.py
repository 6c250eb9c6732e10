"""File safety in one place: reading what comes from outside, writing atomically, locking exclusively.

Every file the package reads from outside is opened by :func:`open_regular` (checked on its descriptor, a device
or a folder refused before a byte is read, links refused where asked) and read within a bound; every file or
folder it writes is written under a unique temporary name beside its target, synced and renamed into place, so a
crash leaves the old version or the new one, never half of one; every exclusive lock is a ``flock`` taken by
:func:`lock`, which the kernel drops when its process ends however it ends, and which a forked child gives up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CaptionerError, ConfigError, OutputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]  # the same parser under its former name


# ---------------------------------------------------------------------------------------- reading
UTF8_BOM = b"\xef\xbb\xbf"
READ_CHUNK = 1 << 20
_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a pipe", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device",
          stat.S_IFSOCK: "a socket"}


def open_regular(path: str | os.PathLike, name: str, what: str, instead: str = "", pipes: bool = False,
                 error: type[CaptionerError] = ConfigError, follow: bool = True, dir_fd: int | None = None) -> BinaryIO:
    """Regular file ``path`` (or, with ``pipes``, a pipe) opened for reading, or a one-line ``error``
    starting with ``name``: ``<what> not found``, ``cannot read the <what> (reason)`` or ``<what> is not a
    regular file (a device)`` followed by ``instead``. Without ``follow`` a link is refused (``cannot read``);
    ``dir_fd`` is the open folder a relative ``path`` is in.

    Opened without blocking and checked on the descriptor, not the name (which a rename could change
    meanwhile), so that a device such as /dev/zero or a folder is refused before anything is read, and
    a named pipe without a writer reads as empty instead of blocking forever.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        descriptor = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise error(f"{name}: {what} not found") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # what opening a socket gives
            raise error(f"{name}: {what} is not a regular file (a socket or device){instead}") from None
        raise error(f"{name}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        check_kind(descriptor, name, what, instead, pipes, error)
    except CaptionerError:
        os.close(descriptor)
        raise
    os.set_blocking(descriptor, True)
    return open(descriptor, "rb")


def check_kind(descriptor: int, name: str, what: str, instead: str = "", pipes: bool = False,
               error: type[CaptionerError] = ConfigError) -> None:
    """Nothing if open ``descriptor`` is a regular file (or, with ``pipes``, a pipe); else ``error``:
    ``<name>: <what> is not a regular file (a device)`` followed by ``instead``. For what arrives already
    open (standard input) as for what :func:`open_regular` opens."""
    mode = os.fstat(descriptor).st_mode
    if not (stat.S_ISREG(mode) or (pipes and stat.S_ISFIFO(mode))):
        raise error(f"{name}: {what} is not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special')}){instead}")


def open_folder(path: str | os.PathLike) -> int:
    """A descriptor of folder ``path``, never of what a link there points at (``OSError`` instead): files opened
    relative to it (``dir_fd``) are then the folder's, whatever is renamed meanwhile."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def read_bounded(path: str | os.PathLike, limit: int, name: str, what: str,
                 error: type[CaptionerError] = ConfigError, follow: bool = True, dir_fd: int | None = None) -> bytes:
    """The bytes of regular file ``path`` (:func:`open_regular`), at most ``limit``; else ``error``:
    ``<name>: <what> larger than <limit> bytes``, a file larger by its size refused unread.

    Memory follows what is read, never ``limit``: the file is read in one piece of its size (plus a byte, to
    see it grow), then in chunks (a growing file, or one whose size says 0, as in /proc). Reading ``limit + 1``
    bytes at once reserves that much: 2 GiB for every ONNX graph read from the cache, which a 6 GB
    address-space limit did not allow.
    """
    with open_regular(path, name, what, error=error, follow=follow, dir_fd=dir_fd) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise error(f"{name}: {what} larger than {limit} bytes")
        parts, total, step = [], 0, size + 1 if size else READ_CHUNK
        try:
            while total <= limit and (part := handle.read(min(step, limit + 1 - total))):
                parts.append(part)
                total, step = total + len(part), READ_CHUNK
        except OSError as exc:
            raise error(f"{name}: cannot read the {what} ({exc.strerror or exc})") from None
    if total > limit:
        raise error(f"{name}: {what} larger than {limit} bytes")
    return b"".join(parts)


def read_json(path: str | os.PathLike, limit: int, what: str, error: type[CaptionerError] = ConfigError,
              toml: bool = False) -> Any:
    """The parsed JSON (or, with ``toml``, TOML) of file ``path``, read by :func:`read_bounded`.

    The one reader of every JSON file that comes from outside (config files, annotations, checkpoints), so
    each fails the same way: one ``error`` line naming the file, never a traceback or a parser's
    multi-line message.
    """
    name = str(path)
    raw = read_bounded(path, limit, name, what, error=error).removeprefix(UTF8_BOM)  # which Windows editors write
    syntax = "TOML" if toml else "JSON"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{name}: invalid {what} (not UTF-8 text: invalid byte at offset {exc.start})") from None
    try:
        return tomllib.loads(text) if toml else json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{name}: invalid {what} (malformed JSON at line {exc.lineno}, column {exc.colno}: "
                    f"{exc.msg})") from None
    except ValueError as exc:  # a TOML syntax error, or an integer of more than 4300 digits
        raise error(f"{name}: invalid {what} (unusable {syntax}: {str(exc).partition(chr(10))[0]})") from None
    except RecursionError:
        raise error(f"{name}: invalid {what} ({syntax} nested too deeply)") from None


# ---------------------------------------------------------------------------------------- atomic writes
def temporary_beside(path: Path) -> Path:
    """``.NAME.tmp-PID-RANDOM`` beside ``path``: unique to this writer, and naming its process for
    :func:`remove_dead_writers`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


@contextlib.contextmanager
def atomic_file(path: Path, stale: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is synced and renamed over ``path``.

    A crash or a full disk leaves the previous file or the complete new one, never half of one; a failure
    removes the temporary and raises the ``OSError`` (or the writer's own error) for the caller to word.
    Temporaries of dead writers matching ``stale`` (default ``.NAME.tmp-*``) are removed first.
    """
    temporary = temporary_beside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers(path.parent, stale or f".{path.name}.tmp-*")
        yield temporary
        fsync(temporary)
        os.replace(temporary, path)
        fsync(path.parent)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def check_writable(folder: Path, flag: str) -> None:
    """Create ``folder``, then write, sync and delete a small file in it; or raise :class:`OutputError`."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{flag} {folder}: is a file, not a folder")
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"captioner checks that this folder is writable\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise OutputError(f"{flag} {folder}: cannot write there ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def check_output_file(path: Path, flag: str) -> Path:
    """``path`` can receive a result: not a folder or device, in a writable folder (created if missing).

    Checked before the work whose result it receives, so a mistyped path costs nothing.
    """
    if path.exists() and not path.is_file():
        raise OutputError(f"{flag} {path}: not a regular file")
    check_writable(path.parent, flag)
    return path


def write_atomically(path: Path, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`): a crash or a full disk leaves
    the previous file or the complete new one, never half of one. A failure is one :class:`OutputError` line."""
    try:
        with atomic_file(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``path`` in one swap, files synced first.

    Concurrent writers each fill their own temporary and swap one at a time, so all succeed and the last one
    wins; a failure raises its ``OSError`` and leaves ``path`` as it was. A swap interrupted between its two
    renames is undone by :func:`recover`.
    """
    temporary = temporary_beside(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_writers(path.parent, f".{path.name}.tmp-*")
        temporary.mkdir()
        yield temporary
        for file in temporary.iterdir():
            fsync(file)
        with _swap_lock(path):
            previous = path.parent / f".{path.name}.old-{os.getpid()}"
            if os.path.lexists(path):  # a link too (a cache entry may be one): moved aside, never followed
                os.rename(path, previous)  # from here until the next rename, recover() restores it
            os.rename(temporary, path)
            fsync(path.parent)
            for obsolete in path.parent.glob(f".{path.name}.old-*"):  # ours, and any a killed writer left behind
                remove(obsolete)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def recover(path: str | os.PathLike[str]) -> Path:
    """Undo a swap of :func:`atomic_directory` interrupted between its two renames, then return ``path``."""
    path = Path(path)
    if not path.exists() and path.parent.is_dir() and any(path.parent.glob(f".{path.name}.old-*")):
        with _swap_lock(path):  # not a swap in progress: that one would still hold the lock
            leftovers = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
            if leftovers and not path.exists():
                os.rename(leftovers[-1], path)
    return path


def _swap_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """Held while ``path`` is swapped (two renames), so swaps and recoveries of it never interleave."""
    return locked(path.parent / f".{path.name}.lock")


def remove_dead_writers(folder: Path, pattern: str) -> None:
    """Delete temporaries named ``<pattern>``, ``...tmp-<pid>[-...]``, whose writing process is gone."""
    for stale in folder.glob(pattern):
        pid = stale.name.rpartition(".tmp-")[2].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            remove(stale)


def remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder; one another process removed is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid > 0


def fsync(path: Path) -> None:
    """Flush file or folder ``path`` to the disk: a rename is durable only once the folder is synced."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------- locks
_LOCKS: set[int] = set()  # the descriptors of the locks this process holds


def _leave_locks_to_parent() -> None:
    """In a forked child (a DataLoader worker), close the copies of the lock descriptors: a ``flock`` lasts
    while any copy is open, and a lock must end with the process that holds it, not with its last worker."""
    while _LOCKS:
        os.close(_LOCKS.pop())


os.register_at_fork(after_in_child=_leave_locks_to_parent)


def lock(path: Path, blocking: bool = True, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """A descriptor of its own on ``path`` holding an exclusive ``flock``; :func:`release` it.

    The kernel drops the lock when this process ends, however it ends; nothing else drops it (a POSIX
    ``lockf`` ends when the process closes any descriptor of the file). Without ``blocking``, a lock held
    elsewhere is a :class:`BlockingIOError` at once.
    """
    descriptor = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BaseException:
        os.close(descriptor)
        raise
    _LOCKS.add(descriptor)
    return descriptor


def release(descriptor: int) -> None:
    """Give up a lock of :func:`lock`."""
    _LOCKS.discard(descriptor)
    os.close(descriptor)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (waiting for it) for the ``with`` block."""
    descriptor = lock(path)
    try:
        yield
    finally:
        release(descriptor)
