"""Bandwidth limits: a token bucket shared by every connection it governs.

One ``TokenBucket`` per direction per program (a server's uploads, a
client's downloads, a seeder's uploads). Senders and receivers call
``consume(n)`` for every chunk they move; the bucket makes them wait just
long enough that the long-run rate stays at ``rate_bps``. A rate of 0 means
unlimited, and ``set_rate`` changes it while transfers run (a window's
slider, say).

The bucket holds at most ``BURST_S`` seconds of tokens, so an idle link does
not save up a burst that would break the limit over the next few seconds.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

BURST_S = 0.25  # tokens saved up at most: a quarter second's worth


class TokenBucket:
    """A rate limit in bytes per second (0: unlimited). Thread-safe."""

    def __init__(self, rate_bps: int = 0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._rate = 0
        self._tokens = 0.0
        self._updated = clock()
        self.set_rate(rate_bps)

    @property
    def rate_bps(self) -> int:
        """The current limit (0: unlimited)."""
        with self._lock:
            return self._rate

    def set_rate(self, rate_bps: int) -> None:
        """Change the limit; takes effect for the next ``consume``."""
        if rate_bps < 0:
            raise ValueError("a rate limit cannot be negative")
        with self._lock:
            self._refill()
            self._rate = rate_bps
            self._tokens = min(self._tokens, self._capacity())

    def consume(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may pass, then take them. Returns at once when unlimited.

        A request larger than the bucket goes into debt and the caller waits
        it off, so a 1 MiB chunk under a 100 KB/s limit still passes, ten
        seconds later, and the average holds.
        """
        with self._lock:
            if self._rate == 0:
                return
            self._refill()
            self._tokens -= nbytes
            wait_s = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait_s > 0:
            self._sleep(wait_s)  # pacing by design: the wait *is* the limit

    def _capacity(self) -> float:
        return self._rate * BURST_S

    def _refill(self) -> None:
        now = self._clock()
        if self._rate:
            self._tokens = min(self._capacity(), self._tokens + (now - self._updated) * self._rate)
        self._updated = now
