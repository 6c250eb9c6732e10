"""A server's log that an attacker cannot fill: repeated warnings and errors once per cause per interval.

Every refused request, dropped connection or failed accept is worth a line, but one line each lets a client
write the disk full (thousands of idle sockets once gave 1.6 million lines in 40 s). :class:`RepeatFilter`
lets the first record of a cause through, holds back the rest for ``interval_s``, and the next one after
that says how many were held. A record's cause is its ``cause`` attribute (``log.warning(...,
extra={"cause": "busy"})``) or else its logger and message template.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

INTERVAL_S = 10.0
MAX_CAUSES = 10_000  # causes remembered; past it the stalest are forgotten (pre-formatted messages vary)


class RepeatFilter(logging.Filter):
    """Passes one WARNING-or-worse record per cause per ``interval_s``; lower levels pass untouched."""

    def __init__(self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval_s, self.clock = interval_s, clock
        self._seen: dict[Hashable, tuple[float, int]] = {}  # cause -> (when its last record passed, held since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        cause = getattr(record, "cause", None) or (record.name, str(record.msg))
        now = self.clock()
        passed, held = self._seen.get(cause, (-float("inf"), 0))
        if now - passed < self.interval_s:
            self._seen[cause] = (passed, held + 1)
            return False
        if len(self._seen) >= MAX_CAUSES:
            for stale in sorted(self._seen, key=lambda key: self._seen[key][0])[:MAX_CAUSES // 2]:
                del self._seen[stale]
        self._seen[cause] = (now, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held:,} more like it in the last {now - passed:.0f} s)"
            record.args = ()
        return True


def install(interval_s: float = INTERVAL_S) -> RepeatFilter:
    """One :class:`RepeatFilter` on every handler of the root logger (made if there is none), so that uvicorn's,
    asyncio's and our own records all pass it."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    repeat = RepeatFilter(interval_s)
    for handler in root.handlers:
        handler.addFilter(repeat)
    return repeat
