"""Caption a collection, the pipeline of ``captioner caption PATHS... --out captions.jsonl``.

Images are loaded and preprocessed in DataLoader worker processes (:func:`..data.loader.image_batches`,
the loader of feature extraction too) while this process runs one batched encode and decode per batch, the
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

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.loader import ImageBatch, image_batches, loader_deaths
from ..distributed import launched_rank
from ..generation.config import GenerationConfig
from ..models.captioner import Captioner
from ..models.pipeline import CaptionPipeline
from ..runtime import stage_threads, torch_threads
from .inputs import without_outputs
from .jsonl import Writer

log = logging.getLogger(__name__)


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
    pipeline, pin = CaptionPipeline(model, labels), model.device.type == "cuda"
    with torch_threads(stage_threads()):
        for batch, features in _encoded_ahead(pipeline, image_batches(pipeline.preprocess, files, batch_size,
                                                                      num_workers, pin_memory=pin)):
            records = {index: {"file": files[index], "error": reason} for index, reason in batch.failures.items()}
            if features is not None:
                predictions = pipeline.decode(features, config)
                records.update((index, {"file": files[index], **pipeline.postprocess(prediction)})
                               for index, prediction in zip(batch.indices, predictions))
            yield [records[index] for index in sorted(records)]


def _encoded_ahead(pipeline: CaptionPipeline, batches: Iterable[ImageBatch]) -> Iterator[tuple[ImageBatch,
                                                                                               torch.Tensor | None]]:
    """Each batch with its features, the next batch's being computed on a thread meanwhile (one batch ahead)."""

    def encode(batch: ImageBatch) -> torch.Tensor | None:
        return None if batch.pixels is None else pipeline.encode(batch.pixels)

    with ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
        pending: tuple[ImageBatch, Future] | None = None
        for batch in batches:
            submitted = (batch, pool.submit(encode, batch))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1].result()


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
