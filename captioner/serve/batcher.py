"""Micro-batching for servers: requests that arrive together share one batched encode and one batched search.

A beam search over many photos at once costs far less per photo than one photo at a time (every step reads
the decoder's weights once for all rows), so a server under load should decode its requests together. The
:class:`Batcher` owns the model on one worker thread. Callers :meth:`~Batcher.submit` an image with its
:class:`GenerationConfig` and get a future; the worker takes the first waiting request, waits at most
``batch_window_ms`` for others (``max_batch`` at most), loads each image on its own (a corrupt one fails only
its own future) unless it came already decoded (the HTTP API's decode pool), runs the CNN over the readable ones,
and one search per distinct decoding config.

Everything is bounded: at most ``max_queue`` requests wait (more are refused with :class:`BusyError` at
once, not queued), one thread computes, and a request not answered within ``deadline_s`` is given up
(its future fails, and the worker skips it if it has not started). The captions are those of
:meth:`Captioner.generate` for the same image and config: batched search equals one image at a time, and
seeded sampling, whose random draws depend on the batch, decodes each request alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from ..data.images import ImageInput
from ..errors import BusyError, CaptionerError
from ..generation.config import GenerationConfig
from ..models.captioner import Captioner
from ..models.pipeline import CaptionPipeline, Prediction
from .limits import BatchConfig as BatchConfig  # declared beside the other bounds, torch-free

log = logging.getLogger(__name__)
POLL_SECONDS = 0.25  # how often an idle worker looks whether it should stop


@dataclass
class Timing:
    """Where a request's time went, in seconds; ``encoder`` and ``decoder`` are its batch's and its group's."""

    queued: float  # from submit to the start of its batch
    encoder: float  # loading the batch's images (those not already decoded) and running the CNN over them
    decoder: float  # the search of the requests with its decoding config
    batch: int  # requests in its batch


@dataclass
class Result:
    """One request's answer: its captions (most likely first) with the CNN's top ImageNet labels, and the timing."""

    prediction: Prediction
    timing: Timing


@dataclass
class Request:
    image: ImageInput | torch.Tensor  # a tensor: the pixels the encoder takes, already preprocessed
    config: GenerationConfig
    deadline: float  # time.monotonic() by which it must be answered
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)


class Batcher:
    """The model's one worker: ``start()``, then ``submit()`` or ``caption()`` from any thread, ``close()`` at the end."""

    def __init__(self, model: Captioner, config: BatchConfig | None = None):
        self.model, self.config = model, config or BatchConfig()
        self.pipeline = CaptionPipeline(model)
        self.on_batch: Callable[[int], None] = lambda size: None  # told each batch's size (the server's metrics)
        self._queue: queue.Queue[Request] = queue.Queue(self.config.max_queue)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="caption-batcher", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop after the batch in hand; requests still waiting fail with :class:`BusyError`."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait().future.set_exception(BusyError("the server is shutting down"))

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, image: ImageInput | torch.Tensor, config: GenerationConfig) -> Future:
        """A future of ``image``'s :class:`Result` (``image`` may be its preprocessed pixels); :class:`BusyError`
        at once when the queue is full or closed."""
        if self._stop.is_set():
            raise BusyError("the server is shutting down")
        request = Request(image, config, time.monotonic() + self.config.deadline_s)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise BusyError(f"the server is busy ({self.config.max_queue} requests are waiting); retry in a "
                            "moment") from None
        return request.future

    def caption(self, image: ImageInput, config: GenerationConfig) -> Result:
        """:meth:`submit` and wait, at most the deadline: the result, or its :class:`CaptionerError`."""
        future = self.submit(image, config)
        try:
            return future.result(timeout=self.config.deadline_s)
        except FutureTimeout:
            future.cancel()
            raise missed_deadline(self.config.deadline_s) from None

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self.on_batch(len(batch))
                caption_batch(self.pipeline, batch)

    def _collect(self) -> list[Request]:
        """The next batch: the first waiting request and those arriving within the window, unexpired, uncancelled."""
        try:
            batch = [self._queue.get(timeout=POLL_SECONDS)]
        except queue.Empty:
            return []
        closes = time.monotonic() + self.config.batch_window_ms / 1000
        while len(batch) < self.config.max_batch:
            try:
                batch.append(self._queue.get(timeout=max(0.0, closes - time.monotonic())))
            except queue.Empty:
                break
        now, kept = time.monotonic(), []
        for request in batch:
            if not request.future.set_running_or_notify_cancel():
                continue  # its caller gave up waiting
            if request.deadline < now:
                request.future.set_exception(missed_deadline(self.config.deadline_s))
            else:
                kept.append(request)
        return kept


def missed_deadline(seconds: float) -> BusyError:
    return BusyError(f"the server did not answer within {seconds:g} s; it is overloaded, retry in a moment")


def caption_now(model: Captioner, image: ImageInput, config: GenerationConfig) -> Result:
    """One image's :class:`Result` computed in this thread, as the worker computes a batch of one."""
    request = Request(image, config, deadline=float("inf"))
    request.future.set_running_or_notify_cancel()
    caption_batch(CaptionPipeline(model), [request])
    return request.future.result()


def caption_batch(pipeline: CaptionPipeline, batch: list[Request]) -> None:
    """Resolve every request's future through the pipeline: each image preprocessed on its own, one CNN pass, one
    search per config.

    An unreadable image fails its own future with its :class:`ImageError`; anything unexpected (a bug, out of
    memory) fails the futures still unresolved, logged once, and the worker goes on with the next batch.
    """
    started = time.perf_counter()
    try:
        readable, pixels = [], []
        for request in batch:
            try:
                pixels.append(pipeline.preprocess(request.image))
                readable.append(request)
            except CaptionerError as exc:
                request.future.set_exception(exc)
        if not readable:
            return
        features = pipeline.encode(torch.stack(pixels))
        encoded = time.perf_counter()
        groups: dict[Hashable, list[int]] = {}
        for index, request in enumerate(readable):
            groups.setdefault(_group(request, index), []).append(index)
        for indices in groups.values():
            begin = time.perf_counter()
            predictions = pipeline.decode(features[indices], readable[indices[0]].config)
            decoder = time.perf_counter() - begin
            for index, prediction in zip(indices, predictions):
                request = readable[index]
                timing = Timing(started - request.submitted, encoded - started, decoder, len(batch))
                request.future.set_result(Result(prediction, timing))
    except Exception as exc:  # noqa: BLE001 - every caller must get an answer, and the worker must live on
        unanswered = [request.future for request in batch if not request.future.done()]
        if not isinstance(exc, CaptionerError):
            log.exception("captioning a batch of %d failed", len(batch))
        for future in unanswered:
            future.set_exception(exc)


def _group(request: Request, index: int) -> Hashable:
    """Requests decoded together: the same config, except seeded sampling, which draws per batch and so alone."""
    if request.config.strategy == "sample" and request.config.seed is not None:
        return index
    return request.config
