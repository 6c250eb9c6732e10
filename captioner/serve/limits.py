"""What one client of the HTTP API may hold, and for how long: ``captioner serve --header-timeout-s ...``.

A server put on a network is attacked by its clients: connections that send nothing, headers or bodies that
trickle in a byte at a time, uploads that are small but cost seconds and gigabytes to decode. Each of these
holds something (a descriptor, a place in the server, a core), so each has a bound in time as well as in size.
:class:`ServerLimits` declares them once; the connection guard, the body reader and the decode pool enforce them.
:class:`BatchConfig` bounds the micro-batching worker (:mod:`captioner.serve.batcher`). Neither imports torch:
the command line builds its flags from them.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from ..bounds import check_fields, option
from ..errors import ConfigError

ACCEPT_BURST = 256  # the listen backlog, and so the connections accepted at once before refused ones are closed
RESERVED_DESCRIPTORS = 64 + ACCEPT_BURST  # also kept: the model's files, the decode workers' pipes, logs
MAX_BODY_BYTES = 20_000_000  # the demo's upload limit too
MIN_BODY_RATE = 65_536  # bytes a second: each byte received extends its body's deadline by 1 / MIN_BODY_RATE s


@dataclass(frozen=True)
class ServerLimits:
    """Per-connection, per-upload and per-decode bounds of the HTTP API, checked on construction."""

    max_connections: int | None = option(
        None, "open connections at most; more are answered 503 and closed at once (None: the process's "
              f"descriptor limit less {RESERVED_DESCRIPTORS}, at most 10,000)", range=(1, 1_000_000))
    header_timeout_s: float = option(10.0, "a request's line and headers must arrive within this many seconds "
                                           "(from the connection's opening or its previous answer), or it is closed",
                                     range=(0.1, 600))
    body_timeout_s: float = option(10.0, "a request body must start and keep arriving: it gets this many seconds, "
                                         f"plus one for every {MIN_BODY_RATE:,} bytes received, or HTTP 408",
                                   range=(0.1, 600))
    keep_alive_s: float = option(5.0, "an idle keep-alive connection is closed after this many seconds",
                                 range=(0.1, 600))
    upload_memory_mb: int = option(512, "request bodies held at once, all uploads together; more get HTTP 503",
                                   range=(1, 65536))
    decode_workers: int = option(min(4, os.cpu_count() or 1), "processes decoding uploads beside the model",
                                 range=(1, 64))
    decode_timeout_s: float = option(3.0, "an upload whose decoding takes longer fails alone (HTTP 400)",
                                     range=(0.1, 600))
    decode_memory_mb: int = option(1024, "memory one upload's decoding may take; more fails it alone (HTTP 400)",
                                   range=(64, 65536))
    shutdown_timeout_s: float = option(10.0, "on SIGTERM, requests in progress get this long to be answered; "
                                             "uploads still arriving are cut at once", range=(0, 3600))

    def __post_init__(self) -> None:
        check_fields(self, ConfigError)
        allowed = descriptor_budget()
        if self.max_connections is None:
            object.__setattr__(self, "max_connections", min(10_000, allowed))
        elif self.max_connections > allowed:
            raise ConfigError(f"max_connections {self.max_connections:,} is more than this process's descriptor "
                              f"limit allows ({allowed:,}: `ulimit -n` less {RESERVED_DESCRIPTORS}); raise "
                              "`ulimit -n` or ask for fewer")

    @property
    def connection_cap(self) -> int:
        assert self.max_connections is not None  # set by __post_init__
        return self.max_connections


@dataclass(frozen=True)
class BatchConfig:
    """The micro-batching knobs (``captioner serve --max-batch ...``), checked on construction."""

    max_batch: int = option(32, "requests encoded and decoded together at most", range=(1, 256))
    batch_window_ms: float = option(5.0, "how long a batch's first request waits for others, in ms", range=(0, 1000))
    max_queue: int = option(64, "requests waiting at most; more are refused (HTTP 503)", range=(1, 4096))
    deadline_s: float = option(30.0, "a request not answered within this many seconds is given up (HTTP 503)",
                               range=(0.1, 3600))

    def __post_init__(self) -> None:
        check_fields(self, ConfigError)


def descriptor_budget() -> int:
    """Connections this process can hold open: its soft descriptor limit less what the server itself needs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, (soft if soft != resource.RLIM_INFINITY else 1_000_000) - RESERVED_DESCRIPTORS)
