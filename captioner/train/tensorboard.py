"""TensorBoard event files of a run, in ``OUT/tensorboard/``: ``tensorboard --logdir runs/`` shows every run.

Each epoch writes the scalars RL and im2txt users look for (the training loss, the learning rate, every
validation set's metrics, the SCST reward) and, as text, the captions of a few fixed validation photos
beside one of their references, so a run's captions can be read as they change. ``log.jsonl`` and
``training.png`` stay the record; these files are a view of the same numbers.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import OutputError

BOARD_DIR = "tensorboard"
SAMPLE_PHOTOS = 4  # validation photos per set whose captions are shown each epoch


class TensorBoard:
    """One run's event writer. ``resume_after`` (the last epoch kept) drops any events a killed run wrote
    after its last checkpoint, so a resumed run's curves have one value per epoch."""

    def __init__(self, out: Path, resume_after: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        try:
            self.writer = SummaryWriter(str(out / BOARD_DIR), purge_step=resume_after + 1 if resume_after else None)
        except OSError as exc:
            raise OutputError(f"{out / BOARD_DIR}: cannot write TensorBoard events ({exc.strerror or exc})") from None

    def epoch(self, entry: dict, by_set: dict[str, dict[str, float]], samples: dict[str, list[tuple[str, str, str]]]) -> None:
        """Write one epoch: ``entry`` as ``log.jsonl`` holds it, each set's scores, and per set
        ``(file name, caption, a reference)`` of its sample photos."""
        step = entry["epoch"]
        if entry["phase"] == "scst":
            self.writer.add_scalar("train/scst_reward", -entry["loss"], step)  # the logged loss is minus the reward
        else:
            self.writer.add_scalar("train/loss", entry["loss"], step)
        self.writer.add_scalar("train/lr", entry["lr"], step)
        for name, scores in by_set.items():
            for metric, value in scores.items():
                self.writer.add_scalar(f"val/{name}/{metric}", value, step)
        for name, rows in samples.items():
            table = ["| photo | caption | a reference |", "|---|---|---|",
                     *(f"| {_cell(photo)} | {_cell(caption)} | {_cell(reference)} |" for photo, caption, reference in rows)]
            self.writer.add_text(f"captions/{name}", "\n".join(table), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _cell(text: str) -> str:
    """Text for a markdown table cell: one line, no column breaks."""
    return " ".join(text.split()).replace("|", "\\|")
