"""The last lines a program logged, kept in memory for the page and the API."""
from __future__ import annotations

import collections
import logging
import threading

RECENT_LINES = 200  # what the page shows; a bounded deque, whatever the uptime


class RecentLines(logging.Handler):
    """A logging handler that keeps the last ``capacity`` records as dicts. Thread-safe."""

    def __init__(self, capacity: int = RECENT_LINES) -> None:
        super().__init__(logging.INFO)
        self._lines: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._sequence = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in someone's log call must not break logging
            message = str(record.msg)
        with self._guard:
            self._sequence += 1
            self._lines.append({"seq": self._sequence, "time": record.created, "level": record.levelname,
                                "logger": record.name, "message": message})

    def lines(self, after: int = 0) -> list[dict]:
        """The kept lines whose ``seq`` is above ``after``, oldest first."""
        with self._guard:
            return [line for line in self._lines if line["seq"] > after]
