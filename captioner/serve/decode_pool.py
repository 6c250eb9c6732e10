"""Uploads decoded beside the model, in worker processes, each decode under a time and a memory budget.

A photo API decodes what strangers send, and some small files cost seconds and gigabytes inside the pixel bound
(an 811-byte JPEG 2000 of 7000 x 7000 took 5.6 s and 0.5 GB; a 95 KB 16-bit PNG 6.1 s). Decoded on the event loop
or by the batch worker, one of them holds every other request. Here :class:`DecodePool` hands each upload to one
of ``decode_workers`` processes, which opens only the formats a photo comes in (:data:`PHOTO_FORMATS`; others are
refused by name, unread), decodes it and preprocesses it to the encoder's input. A decode that runs past
``decode_timeout_s`` has its process killed and replaced; one that needs more than ``decode_memory_mb`` fails in
its process (an address-space limit above what the process holds at rest). Either way that upload fails alone
with an :class:`ImageError`, and the batch worker only encodes and searches.

Workers are forked from a fork server that has imported the preprocessing once, so a replacement starts in
milliseconds without inheriting the model's threads.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pillow_heif
import torch
from PIL import AvifImagePlugin

from ..data.images import load_image
from ..errors import ImageError
from .limits import ServerLimits

# Pillow's names; MPO: phones' JPEGs; HEIF (HEIC) and AVIF: phones' newer formats
PHOTO_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["captioner.models.preprocessing", "captioner.data.images"])


def _serve_decodes(conn: Connection, transform: Any, memory_bytes: int) -> None:
    """A worker's loop: bytes in, ``("ok", pixels)`` or ``("error", reason)`` out, until its pipe closes."""
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + memory_bytes, resource.RLIM_INFINITY))
    # One core per decode, as JPEG's and PNG's: libheif and libavif would otherwise start threads of their own
    # (libavif one per core), so a few uploads at once could take every core from the model.
    torch.set_num_threads(1)
    pillow_heif.options.DECODE_THREADS = 1
    AvifImagePlugin.DEFAULT_MAX_THREADS = 1
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        try:
            image = load_image(data, PHOTO_FORMATS, min_side=transform.preprocessing.resize_size)
            conn.send(("ok", transform(image).numpy()))
        except ImageError as exc:
            conn.send(("error", str(exc)))
        except MemoryError:
            conn.send(("error", f"<{len(data)} bytes>: needs more than {memory_bytes >> 20:,} MB to decode"))
        except Exception as exc:  # noqa: BLE001 - a decoder's own failure is this upload's, not the server's
            conn.send(("error", f"<{len(data)} bytes>: cannot be decoded ({type(exc).__name__}: {exc})"[:300]))


def _address_space() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


class _Worker:
    def __init__(self, transform: Any, memory_bytes: int):
        self.conn, child = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_serve_decodes, args=(child, transform, memory_bytes),
                                        name="caption-decoder", daemon=True)
        self.process.start()
        child.close()

    def decode(self, data: bytes, timeout: float) -> tuple[str, Any] | None:
        """Its answer, or ``None`` if it took longer than ``timeout`` or died (the worker is then unusable)."""
        try:
            self.conn.send_bytes(data)
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def stop(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class DecodePool:
    """``decode_workers`` decoding processes: ``start()``, ``await decode(data)`` from the event loop, ``close()``."""

    def __init__(self, transform: Any, limits: ServerLimits):
        self.transform, self.limits = transform, limits
        self._idle: asyncio.Queue[_Worker] | None = None
        self._threads = ThreadPoolExecutor(limits.decode_workers, thread_name_prefix="caption-decode")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the workers; call on the event loop that will await :meth:`decode`."""
        self._idle = asyncio.Queue()
        for _ in range(self.limits.decode_workers):
            self._idle.put_nowait(self._spawn())

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()
        self._threads.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> int:
        """Workers decoding now."""
        return self.limits.decode_workers - (self._idle.qsize() if self._idle is not None else 0)

    async def decode(self, data: bytes) -> torch.Tensor:
        """``data``'s pixels as the encoder takes them, ``(3, crop, crop)``; :class:`ImageError` naming the reason
        (``<N bytes>: ...``) if it is not a photo, or costs more time or memory than its budget."""
        assert self._idle is not None, "start() the pool first"
        worker = await self._idle.get()
        try:
            answer = await asyncio.get_running_loop().run_in_executor(
                self._threads, worker.decode, data, self.limits.decode_timeout_s)
        except BaseException:  # cancelled while its worker works: that worker's next answer would be stale
            self._idle.put_nowait(self._replace(worker))
            raise
        if answer is None:
            exit_code = worker.process.exitcode
            self._idle.put_nowait(self._replace(worker))
            reason = (f"took longer than {self.limits.decode_timeout_s:g} s to decode" if exit_code is None else
                      f"crashed its decoder (exit code {exit_code})")
            raise ImageError(f"<{len(data)} bytes>: {reason}")
        self._idle.put_nowait(worker)
        status, value = answer
        if status == "error":
            raise ImageError(value)
        return torch.from_numpy(np.asarray(value))

    def _spawn(self) -> _Worker:
        worker = _Worker(self.transform, self.limits.decode_memory_mb << 20)
        with self._lock:
            self._workers.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> _Worker:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        worker.stop()
        return self._spawn()
