"""uvicorn with per-connection bounds: a cap on open connections, a header deadline, and a shutdown that drains.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but bounds nothing else: a client that
connects and sends nothing, or half a header, holds its socket for ever, and enough of them exhaust the
process's descriptors. :class:`GuardedProtocol` is uvicorn's h11 protocol with three bounds more:

- past ``max_connections`` open connections, a new one is answered 503 and closed before anything is parsed;
- a request's line and headers must arrive within ``header_timeout_s`` of the connection's opening (or of its
  previous answer), or the connection gets 408 and is closed;
- on shutdown, a request whose body is still arriving is cut at once instead of holding the drain.

Bodies are timed where they are read (``http.read_upload``), so that the client gets its 408 as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import ACCEPT_BURST, ServerLimits

log = logging.getLogger(__name__)


def canned(status: int, reason: str, detail: str) -> bytes:
    """A whole HTTP/1.1 answer that closes its connection, written without the parser's state machine."""
    body = json.dumps({"detail": detail}).encode()
    headers = ["content-type: application/json", f"content-length: {len(body)}", "connection: close"]
    if status == 503:
        headers.append("retry-after: 1")
    return "\r\n".join([f"HTTP/1.1 {status} {reason}", *headers, "", ""]).encode() + body


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol under :class:`ServerLimits`; made per server by :func:`guarded_protocol`."""

    limits: ServerLimits
    on_refused: Callable[[str], None]  # told the reason of each connection refused or closed by a bound

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.connection_cap:
            self._close_with(503, "Service Unavailable", "connections",
                             f"the server holds {self.limits.connection_cap:,} connections; retry in a moment")
            return
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, except that an upload still arriving is cut rather than waited for."""
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.more_body:
            self.transport.close()
        else:
            super().shutdown()

    def _await_headers(self) -> None:
        """Close the connection unless a new request's headers are complete within the header timeout."""
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_late, self.cycle)

    def _headers_late(self, cycle: object) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no request began since the timer was set
            self._close_with(408, "Request Timeout", "header-timeout",
                             f"no complete request headers within {self.limits.header_timeout_s:g} s")

    def _close_with(self, status: int, reason: str, cause: str, detail: str) -> None:
        log.warning("closed a connection (%d): %s", status, detail, extra={"cause": f"connection {cause}"})
        self.on_refused(cause)
        self.transport.write(canned(status, reason, detail))
        self.transport.close()


def guarded_protocol(limits: ServerLimits, on_refused: Callable[[str], None] = lambda cause: None) -> type:
    """A :class:`GuardedProtocol` class bound to ``limits``, for ``uvicorn.Config(http=...)``."""
    return type("BoundedH11Protocol", (GuardedProtocol,), {"limits": limits,
                                                            "on_refused": staticmethod(on_refused)})


def server_config(app, limits: ServerLimits, host: str, port: int,
                  on_refused: Callable[[str], None] = lambda cause: None) -> uvicorn.Config:
    """uvicorn's configuration of a server of ``app`` under ``limits``: its own log lines go to the root
    logger (and so through its handlers' filters), no access log."""
    return uvicorn.Config(app, host=host, port=port, http=guarded_protocol(limits, on_refused), ws="none",
                          lifespan="on", timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
                          timeout_graceful_shutdown=limits.shutdown_timeout_s,  # type: ignore[arg-type]
                          backlog=ACCEPT_BURST, log_config=None, access_log=False)
