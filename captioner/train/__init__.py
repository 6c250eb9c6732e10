"""Training a captioner: the run's config, the feature cache, the loop, self-critical fine-tuning and resume.

``config`` is :class:`TrainConfig` (every option and its bounds); ``features`` encodes each photo once
into an on-disk cache; ``data`` loads the sets and deals out each step's rows; ``model`` builds the model a run
starts from; ``optim`` its optimizer and schedule; ``trainer`` composes these and runs cross-entropy epochs with
teacher forcing and then self-critical ones (``scst``), validating and keeping ``best/``; ``state`` saves and
checks what an exact resume needs; ``run_folder`` claims the output folder and writes the log; ``tensorboard``
writes the event files. It builds on ``models``; nothing but the command line imports it.
"""

# The public surface: its submodules. None is imported here: importing the package loads no PyTorch.
__all__ = ["config", "data", "features", "model", "optim", "run_folder", "scst", "state", "tensorboard", "trainer"]
