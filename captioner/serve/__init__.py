"""Serving people and programs online: the Gradio demo and the HTTP API, both over one micro-batching worker.

``batcher`` decodes concurrent requests together on one worker thread; ``http`` is the JSON API (``captioner
serve``, and beside the demo) and ``webapp`` the demo. What guards a server from its clients lives apart:
``limits`` (the bounds per connection, upload and decode), ``connections`` (uvicorn's protocol with a connection
cap and header deadline), ``decode_pool`` (uploads decoded in worker processes bounded in time and memory),
``access`` (API key and Host checks), ``metrics`` (Prometheus counters) and ``logs`` (a repeated warning logged
once per interval). It builds on ``models`` and never on ``train`` or ``bulk``; only the command line imports it.
"""

# The public surface: its submodules. None is imported here: importing the package loads no PyTorch.
__all__ = ["access", "batcher", "connections", "decode_pool", "http", "limits", "logs", "metrics", "webapp"]
