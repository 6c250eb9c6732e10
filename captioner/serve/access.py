"""Who may call ``captioner serve``: an optional API key, and on a loopback bind only loopback ``Host`` names.

A server bound beyond loopback is reachable by anyone on the network, so :func:`api_key_from` reads a key
(``--api-key-file FILE`` or ``$CAPTIONER_API_KEY``) and :class:`AccessGuard` answers 401 to a request without
``Authorization: Bearer <key>``, comparing in constant time; ``/v1/health`` stays open for load balancers.
:class:`Access` refuses to serve such an address without a key unless ``--no-auth`` says so. On a
loopback bind a web page the user visits can still reach the server through DNS rebinding (its own host name
resolved to 127.0.0.1), so there a request whose ``Host`` is not a loopback name is refused. Both answer
before the body is read.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError
from ..files import read_bounded

log = logging.getLogger(__name__)

KEY_VARIABLE = "CAPTIONER_API_KEY"
MAX_KEY_BYTES = 4096
MIN_KEY_LENGTH = 16
OPEN_PATHS = frozenset({"/v1/health"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1", "[::1]"})


def api_key_from(path: str | None) -> str | None:
    """The API key of ``--api-key-file path`` (its first line), else of ``$CAPTIONER_API_KEY``, else ``None``;
    a key shorter than 16 characters, or not printable ASCII, is refused with one line."""
    if path is not None:
        text = read_bounded(path, MAX_KEY_BYTES, path, "API key file").decode("ascii", "replace")
        key, where = (text.splitlines() or [""])[0].strip(), path
    elif os.environ.get(KEY_VARIABLE):
        key, where = os.environ[KEY_VARIABLE].strip(), f"${KEY_VARIABLE}"
    else:
        return None
    if len(key) < MIN_KEY_LENGTH or not key.isascii() or not key.isprintable() or " " in key:
        raise ConfigError(f"{where}: an API key must be at least {MIN_KEY_LENGTH} printable ASCII characters "
                          "without spaces (for example `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    return key


def is_loopback(host: str) -> bool:
    """Whether an address to bind (or a Host name) is this machine's alone."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """A ``Host`` header's name without its port: ``[::1]:8000`` -> ``[::1]``, ``localhost:80`` -> ``localhost``."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class AccessGuard:
    """ASGI middleware: ``api_key`` required but on :data:`OPEN_PATHS`; with ``loopback_hosts``, a ``Host``
    that is not a loopback name refused. ``on_refused`` is told each refusal's reason."""

    def __init__(self, app, api_key: str | None, loopback_hosts: bool,
                 on_refused: Callable[[str], None] = lambda reason: None):
        self.app, self.loopback_hosts, self.on_refused = app, loopback_hosts, on_refused
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1")
            if self.loopback_hosts and not is_loopback(host_name(host)):
                return await self._refuse(send, 400, "host", f"Host {host[:60]!r} is not a loopback name; this "
                                                             "server listens on loopback only (DNS rebinding)")
            if (self.expected is not None and scope["path"] not in OPEN_PATHS
                    and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected)):
                return await self._refuse(send, 401, "auth", "missing or wrong API key: send the header "
                                                             "'Authorization: Bearer <key>'")
        await self.app(scope, receive, send)

    async def _refuse(self, send, status: int, reason: str, detail: str) -> None:
        log.warning("refused a request (%d): %s", status, detail, extra={"cause": reason})
        self.on_refused(reason)
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Access:
    """Who may call the server: ``api_key`` (``None``: anyone), and whether a network bind without one was
    asked for on purpose (``--no-auth``)."""

    api_key: str | None = None
    no_auth: bool = False

    @classmethod
    def from_options(cls, api_key_file: str | None, no_auth: bool) -> "Access":
        key = api_key_from(api_key_file)
        if key is not None and no_auth:
            raise ConfigError("--no-auth and an API key (--api-key-file or $CAPTIONER_API_KEY) contradict each other")
        return cls(key, no_auth)

    def check(self, host: str) -> None:
        """Refuse, with one line, to serve a network address with no key unless ``--no-auth`` says so."""
        if self.api_key is None and not self.no_auth and not is_loopback(host):
            raise ConfigError(f"--host {host} is reachable from the network and no API key is set: give "
                              "--api-key-file FILE (or $CAPTIONER_API_KEY), or --no-auth to serve anyone")
