"""``captioner evaluate``: caption every image of a split and score it with the coco-caption metrics."""

from __future__ import annotations

import os
import time

from tqdm.auto import tqdm

from ..data.annotations import load_captions
from ..data.loader import loader_deaths
from ..errors import ImageError
from ..metrics import ALL_METRICS, score_captions
from ..models.captioner import Captioner
from ..runtime import stage_threads
from .captioning import caption_records


def evaluate(images: str | os.PathLike, captions: str | os.PathLike, model: Captioner | str | None = None,
             split: str = "test", device: str = "auto", batch_size: int = 32, metrics=ALL_METRICS,
             engine: str = "auto", num_workers: int = 0, **options) -> dict:
    """Return ``{"metrics": {...}, "predictions": [{"image_id", "caption"}]}`` for one split.

    ``model`` is a loaded :class:`Captioner`, a checkpoint directory, or ``None`` for the bundled
    model (run by ``engine``, see :meth:`Captioner.from_pretrained`); ``options`` are decoding options
    (``beam_size=5``...). Images are loaded in ``num_workers`` processes, as by ``captioner caption``
    (:func:`captioner.bulk.captioning.caption_records`); one that cannot be read is an :class:`ImageError`, a killed
    loader process a :class:`LoaderError`.
    """
    if not isinstance(model, Captioner):
        model = Captioner.from_pretrained(model, device=device, engine=engine, num_threads=stage_threads())
    config = model.generation_config.updated(**options)  # bad options fail before the long encoding
    records, _ = load_captions(captions, images, split)
    started = time.perf_counter()
    generated: list[dict] = []
    with tqdm(total=len(records), desc="captioning", unit="image", leave=False) as bar, \
            loader_deaths("rerun the command"):
        for batch in caption_records(model, [str(r.path) for r in records], config, batch_size, num_workers,
                                     labels=False):
            for record in batch:
                if "error" in record:
                    raise ImageError(record["error"])
            generated.extend(batch)
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    predictions = {i: record["captions"][0]["text"] for i, record in enumerate(generated)}
    scores: dict[str, float | str] = dict(score_captions(predictions, {i: r.captions for i, r in enumerate(records)},
                                                         metrics))
    scores["images"] = len(records)
    scores["seconds"] = round(seconds, 1)
    scores["engine"] = model.engine
    return {"metrics": scores,
            "predictions": [{"image_id": r.image_id, "caption": predictions[i]} for i, r in enumerate(records)]}
