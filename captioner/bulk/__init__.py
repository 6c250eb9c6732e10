"""Captioning collections offline: folders, file lists and shards of photos, to JSON lines, and scoring a split.

Split along its stages: ``inputs`` (paths, folders, file lists, shards), ``jsonl`` (the output format, its
resume scan and writers), ``captioning`` (the batched load-encode-decode run over a collection, the encoder one
batch ahead of the search) and ``merge`` (joining the parts of a sharded run). ``evaluation`` scores captions
against references through the same run. It builds on ``models`` (through its pipeline) and never on ``train``
or ``serve``; only the command line imports it.
"""

# The public surface: its submodules. None is imported here: importing the package loads no PyTorch.
__all__ = ["captioning", "evaluation", "inputs", "jsonl", "merge"]
