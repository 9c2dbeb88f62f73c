"""Thread-safe counters for a server or a client, read as one snapshot dict.

Connection threads update the counters; a status request, the terminal or a
window reads ``snapshot()``. One lock guards everything: updates are a few
additions, far cheaper than the socket work around them.

Speeds come in two flavours: the average since start (bytes / uptime) and the
recent rate over the last ``RATE_WINDOW_S`` seconds, which is what a person
watching a transfer wants to see.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any, Callable

RATE_WINDOW_S = 5.0


class RateMeter:
    """Bytes per second over the last ``window_s`` seconds: the one rate meter (server counters, transfer rows).

    The rate is the bytes recorded within the window divided by the window's
    length, or by the time since ``reset`` when that is shorter, so a
    transfer reads its true speed from its first second. When samples stop,
    the rate falls as they leave the window and reads 0 after a whole window
    of silence. Bytes come as amounts (``add``) or as a running total
    (``add_total``). Not thread-safe: the owner serialises calls.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()  # (time, bytes) within the window
        self._in_window = 0
        self._total = 0
        self._started = clock()

    def reset(self, at: float | None = None) -> None:
        """Start over at ``at`` (default: now) with nothing recorded."""
        self._samples.clear()
        self._in_window = self._total = 0
        self._started = self._clock() if at is None else at

    def add(self, nbytes: int, at: float | None = None) -> None:
        """Record ``nbytes`` moved at ``at`` (default: now)."""
        now = self._clock() if at is None else at
        if self._samples and now < self._samples[-1][0]:
            now = self._samples[-1][0]  # samples from two threads may arrive a hair out of order
        self._samples.append((now, nbytes))
        self._in_window += nbytes
        self._total += nbytes
        self._expire(now)

    def add_total(self, total: int, at: float | None = None) -> None:
        """Record that ``total`` bytes had moved since ``reset`` by ``at`` (default: now)."""
        self.add(max(0, total - self._total), at)

    def rate(self, now: float | None = None) -> float:
        """Bytes per second over the window ending at ``now`` (default: now)."""
        now = self._clock() if now is None else now
        self._expire(now)
        span = min(self.window_s, now - self._started)
        return self._in_window / span if span > 0 else 0.0

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._in_window -= self._samples.popleft()[1]


class Metrics:
    """Counters of one running program. Every method may be called from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._bytes_sent = 0
        self._bytes_received = 0
        self._active_connections = 0
        self._connections_total = 0
        self._requests_ok = 0
        self._requests_failed = 0
        self._downloads: Counter[str] = Counter()
        self._upload = RateMeter(clock=clock)
        self._download = RateMeter(clock=clock)

    def add_sent(self, nbytes: int) -> None:
        """Count bytes sent (uploaded)."""
        with self._lock:
            self._bytes_sent += nbytes
            self._upload.add(nbytes)

    def add_received(self, nbytes: int) -> None:
        """Count bytes received (downloaded)."""
        with self._lock:
            self._bytes_received += nbytes
            self._download.add(nbytes)

    def connection_opened(self) -> None:
        """A connection started being served."""
        with self._lock:
            self._active_connections += 1
            self._connections_total += 1

    def connection_closed(self) -> None:
        """A connection ended."""
        with self._lock:
            self._active_connections -= 1

    def request_done(self, ok: bool) -> None:
        """Count one request, answered successfully or with an error."""
        with self._lock:
            if ok:
                self._requests_ok += 1
            else:
                self._requests_failed += 1

    def set_downloads(self, counts: dict[str, int]) -> None:
        """Replace the per-file download counts (loaded from the catalog)."""
        with self._lock:
            self._downloads = Counter(counts)

    def download_finished(self, name: str) -> None:
        """Count one completed download of ``name``."""
        with self._lock:
            self._downloads[name] += 1

    def downloads_finished(self, names: list[str]) -> None:
        """``download_finished`` for each of ``names`` (a folder's batch), under the lock once."""
        with self._lock:
            self._downloads.update(names)

    @property
    def active_connections(self) -> int:
        """Connections being served right now."""
        with self._lock:
            return self._active_connections

    def snapshot(self, top_files: int | None = None) -> dict[str, Any]:
        """All counters as a JSON-safe dict (the body of a status reply).

        ``top_files`` keeps only that many of the most downloaded files in
        ``downloads_per_file`` (a status reply must stay small whatever the
        catalog's size); files never downloaded are then left out.
        """
        with self._lock:
            uptime = self._clock() - self._started
            averaging_s = max(uptime, 1.0)  # no absurd averages in the first instant
            requests = self._requests_ok + self._requests_failed
            return {
                "uptime_s": round(uptime, 3),
                "bytes_sent": self._bytes_sent,
                "bytes_received": self._bytes_received,
                "active_connections": self._active_connections,
                "connections_total": self._connections_total,
                "requests_total": requests,
                "requests_failed": self._requests_failed,
                "success_rate": round(self._requests_ok / requests, 4) if requests else 1.0,
                "average_upload_bps": round(self._bytes_sent / averaging_s, 1),
                "average_download_bps": round(self._bytes_received / averaging_s, 1),
                "upload_bps": round(self._upload.rate(), 1),
                "download_bps": round(self._download.rate(), 1),
                "downloads_per_file": _top(self._downloads, top_files),
            }


def _top(counts: Counter[str], limit: int | None) -> dict[str, int]:
    if limit is None:
        return dict(sorted(counts.items()))
    return {name: count for name, count in counts.most_common(limit) if count}
