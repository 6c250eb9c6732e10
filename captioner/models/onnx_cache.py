"""The per-user cache of the ONNX engine's graphs: ``$CAPTIONER_CACHE_DIR/onnx/<fingerprint>/``.

A graph is a program, so the engine runs only graphs it exported itself from weights already loaded and
checked, never a graph file found in a checkpoint folder. Exporting costs seconds, so those graphs are kept
here, keyed by the fingerprint of the weights they compute (a cached graph can only belong to identical
weights), each entry written whole and read without following links, the least recently used evicted beyond
``MAX_CACHE_BYTES``. Loaders that miss together, in threads or processes, export once: the first holds the
entry's lock while it exports, the others wait and then read its entry.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import checkpoint
from ..errors import CheckpointError
from ..files import lock, open_folder, read_bounded, release
from ..runtime import cache_dir

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "captioner_weights_sha256"  # the graphs' metadata entry naming the weights they compute
MAX_GRAPH_BYTES = 2 << 30  # protobuf's own limit for one model
MAX_CACHE_BYTES = 4 << 30  # the least recently used models go first

Graphs = dict[str, bytes]  # file name (checkpoint.GRAPH_FILES) -> serialized graph


def graphs(fingerprint: str, export: Callable[[], Graphs], folder: Path | None = None) -> Graphs:
    """The graphs of the weights ``fingerprint`` names: from the cache (``folder``, default the user's), else
    ``export()``-ed and stored.

    The cache is looked at again once the entry's lock is held: concurrent first loads export once, not once
    each. A cache that cannot be used (read-only, full, not private) costs an export, never a failure.
    """
    folder = folder or cache_dir("onnx")
    if not _private(folder):
        return export()
    found = _cached_graphs(folder, fingerprint)
    if found is None:
        with _export_lock(folder, fingerprint):
            found = _cached_graphs(folder, fingerprint)  # stored meanwhile by the loader that held the lock
            if found is None:
                found = export()
                _store(folder, fingerprint, found)
    return found


def _private(folder: Path) -> bool:
    """Create ``folder`` (mode 0700); whether it is a real folder of this user that nobody else can write."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        log.warning("ONNX graph cache %s unusable (%s); exporting the graphs again at every load", folder,
                    exc.strerror or exc)
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        log.warning("ONNX graph cache %s is not a private folder of this user; exporting the graphs again at "
                    "every load (chmod 700 it, or set CAPTIONER_CACHE_DIR)", folder)
        return False
    return True


@contextlib.contextmanager
def _export_lock(folder: Path, fingerprint: str) -> Iterator[None]:
    """Hold entry ``fingerprint``'s export lock, if the file system has locks: without, loaders export alike."""
    try:
        descriptor = lock(folder / f".{fingerprint}.export-lock")
    except OSError as exc:
        log.info("ONNX graph cache %s: cannot lock it (%s); exporting without", folder / fingerprint,
                 exc.strerror or exc)
        yield
        return
    try:
        yield
    finally:
        release(descriptor)


def _cached_graphs(folder: Path, fingerprint: str) -> Graphs | None:
    """The graphs cached for ``fingerprint``, or ``None`` when missing, incomplete or not as the engine wrote them.

    The entry and its graphs are opened without following links (a link is exported again, never read), the
    graphs relative to the entry's open folder, so no rename meanwhile can put other files in their place.
    """
    try:
        entry = open_folder(folder / fingerprint)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # a link, a file: exported again, and the export replaces it
            log.info("ONNX graph cache %s unusable (%s); exporting it again", folder / fingerprint,
                     exc.strerror or exc)
        return None
    try:
        found = {}
        for name in checkpoint.GRAPH_FILES:
            data = _read_graph(entry, name)
            if data is None or fingerprint_of(data) != fingerprint:
                log.info("ONNX graph cache %s: %s missing or damaged; exporting it again", folder / fingerprint, name)
                return None
            found[name] = data
        os.utime(entry)  # recently used: evicted last
        return found
    finally:
        os.close(entry)


def _read_graph(entry: int, name: str) -> bytes | None:
    """Graph file ``name`` of open cache folder ``entry``: a regular file's bytes (not a link, at most
    ``MAX_GRAPH_BYTES``), or ``None``. A read that fails, memory included, makes the entry unusable: an export
    costs a second, a failed load a whole process."""
    try:
        return read_bounded(name, MAX_GRAPH_BYTES, name, "graph", error=CheckpointError, follow=False, dir_fd=entry)
    except (CheckpointError, MemoryError, OSError):
        return None


def fingerprint_of(data: bytes) -> str | None:
    """The fingerprint a self-contained graph carries; ``None`` for anything else (garbage, external data)."""
    import onnx

    try:
        graph = onnx.load_model_from_string(data)
        if _uses_external_data(graph):
            return None
    except Exception:  # protobuf raises DecodeError, RuntimeWarning-turned-errors, RecursionError and more
        return None
    return {prop.key: prop.value for prop in graph.metadata_props}.get(FINGERPRINT_KEY)


def _uses_external_data(message) -> bool:
    """Whether any tensor anywhere in ``message`` (initializers, constants, attributes, subgraphs, functions,
    sparse tensors) points at another file: the message's every field is walked, not a list of known places."""
    import onnx

    if isinstance(message, onnx.TensorProto) and (message.data_location == onnx.TensorProto.EXTERNAL
                                                  or len(message.external_data)):
        return True
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            if any(_uses_external_data(item) for item in (value if field.is_repeated else [value])):
                return True
    return False


def _store(folder: Path, fingerprint: str, found: Graphs) -> None:
    """Put graphs in the cache as one entry (swapped in whole), then evict beyond ``MAX_CACHE_BYTES``."""
    try:
        with checkpoint.atomic_directory(folder / fingerprint) as entry:
            for name, data in found.items():
                (entry / name).write_bytes(data)
    except CheckpointError as exc:
        log.warning("ONNX graph cache: %s; exporting the graphs again at the next load", exc)
        return
    _evict(folder, keep=folder / fingerprint)


def _evict(folder: Path, keep: Path) -> None:
    """Delete the least recently used entries until the rest fit in ``MAX_CACHE_BYTES`` (``keep`` stays)."""
    total = 0
    for modified, size, entry in sorted(_entries(folder), reverse=True):
        total += size
        if total > MAX_CACHE_BYTES and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            for lock_file in (f".{entry.name}.lock", f".{entry.name}.export-lock"):
                (folder / lock_file).unlink(missing_ok=True)


def _entries(folder: Path) -> Iterator[tuple[float, int, Path]]:
    """``(last used, bytes, path)`` of each cache entry; another process may be evicting some meanwhile."""
    for entry in folder.iterdir():
        if len(entry.name) == 64 and all(c in "0123456789abcdef" for c in entry.name):
            try:
                yield entry.stat().st_mtime, sum(file.stat().st_size for file in entry.iterdir()), entry
            except OSError:
                continue
