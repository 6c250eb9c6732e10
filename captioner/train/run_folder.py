"""The run's output folder (``--out``): claimed before any work, and its log rewritten after each epoch.

Claiming checks that ``--out`` may hold a run (not a checkpoint folder, no links in it) and that it and the
feature cache are writable folders, and takes an exclusive lock on ``--out/.lock``, so a mistaken ``--out``,
a read-only or full disk, or a second run with the same ``--out``, fails at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..checkpoint import OUR_FILES
from ..files import check_writable
from ..distributed import Distributed
from ..errors import OutputError
from ..files import atomic_file, lock, release
from ..runtime import cache_dir
from .config import TrainConfig

LOG_FILE, PLOT_FILE, LOCK_FILE = "log.jsonl", "training.png", ".lock"


@contextmanager
def claim_output(config: TrainConfig, dist: Distributed) -> Iterator[None]:
    """Hold ``--out`` for one run: its folders must be writable, and no other training may write to it.

    Checked before any work, so a read-only or full disk, ``--out`` naming a file, or a second run with
    the same ``--out`` fails at once, not after an epoch. Rank 0 checks; every rank raises its error.
    """
    out, held, problem = Path(config.out), None, None
    if dist.is_main:
        folders = {"--out": out}
        if not config.finetune_encoder:
            folders["--feature-cache"] = Path(config.feature_cache or cache_dir("features"))
        try:
            _check_run_folder(out)
            for flag, folder in folders.items():
                check_writable(folder, flag)
            held = _lock(out)
        except OutputError as exc:
            problem = str(exc)
        except OSError as exc:  # the lock itself, on a file system without locks
            problem = f"--out {out}: cannot lock {LOCK_FILE} ({exc.strerror or exc})"
    problem = dist.broadcast(problem)
    if problem:
        raise OutputError(problem)
    try:
        yield
    finally:
        if held is not None:
            release(held)


def _check_run_folder(out: Path) -> None:
    """Nothing if a run may write into folder ``out`` (missing, empty, an earlier run's, or any other folder);
    else :class:`OutputError`.

    Refused: a checkpoint folder (``assets/model``, a run's ``best/``), which would get best/, last/, logs and
    locks among its files; and a link in ``out``, through which the run would write elsewhere (TensorBoard's
    events through a linked ``tensorboard/``, a lock or ``training.png`` onto the file a link names).
    """
    if not out.is_dir():
        return  # missing: created by check_writable, which also reports a file
    try:
        entries = sorted(out.iterdir())
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot list the folder ({exc.strerror or exc})") from None
    checkpoint_files = [entry.name for entry in entries if entry.name in OUR_FILES]
    if checkpoint_files:
        raise OutputError(f"--out {out}: is a checkpoint folder (it holds {', '.join(checkpoint_files[:3])}), not a "
                          "training run's; give a new or empty folder, or an earlier run's")
    links = [entry.name for entry in entries if entry.is_symlink()]
    if links:
        raise OutputError(f"--out {out}: {', '.join(links[:3])} {'is a link' if len(links) == 1 else 'are links'}; "
                          "a run writes only into its own folder, never through a link (remove it)")


def _lock(out: Path) -> int:
    """An exclusive lock on ``out/.lock`` (:func:`captioner.files.lock`), which holds our pid; the kernel releases it
    when the process ends, however it ends, so a killed run never leaves ``--out`` locked."""
    try:
        descriptor = lock(out / LOCK_FILE, blocking=False)
    except BlockingIOError:
        holder = ""
        with suppress(OSError):
            holder = (out / LOCK_FILE).read_bytes()[:32].decode("ascii", "replace").strip()
        raise OutputError(f"--out {out}: another training (pid {holder if holder.isdigit() else 'unknown'}) is "
                          "writing there; wait for it to finish or choose another --out") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


def write_log(out: Path, history: list[dict], metric: str) -> None:
    """Rewrite log.jsonl and training.png from the whole history (so a resumed run has one log)."""
    with atomic_file(out / LOG_FILE) as temporary:
        temporary.write_text("".join(json.dumps(entry) + "\n" for entry in history), encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] for e in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [e["loss"] for e in history], marker="o")
    scst = any(e["phase"] == "scst" for e in history)
    left.set(title="training loss" + (" (SCST epochs: minus mean reward)" if scst else ""), xlabel="epoch")
    for name in dict.fromkeys(["BLEU-4", "CIDEr-D", metric]):
        right.plot(epochs, [e.get(name, float("nan")) for e in history], marker="o", label=name)
    best = max((e for e in history if e.get("best")), key=lambda e: e["epoch"], default=None)
    if best is not None:
        right.axvline(best["epoch"], color="grey", linestyle="--", label=f"best (epoch {best['epoch']})")
    right.set(title="validation", xlabel="epoch")
    right.legend()
    figure.tight_layout()
    figure.savefig(out / PLOT_FILE, dpi=100)
    plt.close(figure)
