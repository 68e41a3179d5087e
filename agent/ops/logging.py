"""Journald-friendly logging: priority levels, no duplicated timestamps, repeated errors counted.

Under systemd (stderr is the journal stream named by ``$JOURNAL_STREAM``) every line starts with
its syslog priority as ``<N>`` (sd-daemon(3)), which journald turns into PRIORITY= and strips, and
carries no timestamp of its own (journald adds one). Run by hand, lines carry a timestamp and the
level name. A warning or error that repeats within ``window_s`` is logged once; the next one after
the window says how many were suppressed in between.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Mapping, TextIO

# sd-daemon(3) / syslog(3) priorities.
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
REPEAT_WINDOW_S = 60.0


def under_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM`` = dev:inode)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message`` (journald parses the prefix; it stamps the time itself)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        # A traceback spans lines; journald would take each as its own entry: prefix every line.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


class RepeatFilter(logging.Filter):
    """Lets the first of a repeated warning/error through, counts the rest for ``window_s``.

    "The same" means the same logger, level and format string (``record.msg``), so one message about
    a port that keeps failing is one line a minute, with the count, whatever the arguments.
    """

    def __init__(self, window_s: float = REPEAT_WINDOW_S, monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self._monotonic = monotonic
        self._seen: dict[tuple, list] = {}  # key -> [window start, suppressed count]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window_s:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg = f"{record.msg} (repeated {entry[1]} more times in the last {now - entry[0]:.0f} s)"
        self._seen[key] = [now, 0]
        if len(self._seen) > 1000:  # bounded: forget the oldest windows
            for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                del self._seen[old]
        return True


def setup_logging(level: str = "INFO", stream: TextIO | None = None, environ: Mapping[str, str] | None = None,
                  window_s: float = REPEAT_WINDOW_S) -> logging.Handler:
    """Configure the root logger for the agent; returns the handler (tests read its stream)."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if under_journal(stream, environ):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter(window_s))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
