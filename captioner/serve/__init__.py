"""Using a trained captioner on many photos and people's: bulk captioning, evaluation, the Gradio demo and the
HTTP API.

Bulk captioning is split along its stages: ``inputs`` (paths, folders, file lists, shards), ``jsonl``
(the output format, its resume scan and writers), ``bulk`` (the batched load-encode-decode pipeline)
and ``merge`` (joining the parts of a sharded run). ``evaluation`` scores captions against references
through the same pipeline, and ``webapp`` is the demo. ``http`` serves captions as JSON (``captioner serve``,
and beside the demo) through ``batcher``, which decodes concurrent requests together. It builds on ``models``
and never on ``train``; only the command line imports it.
"""
