"""The exceptions MiniTorrent raises, and retry with backoff.

Every expected failure is a ``MiniTorrentError``: the programs catch it at the
top, print its one-line message and exit non-zero. Anything else is a bug and
is allowed to show its traceback.

``retry`` is the single place where the suite waits and tries again. It backs
off exponentially with full jitter (so thirty clients turned away at once do
not come back in lockstep) and always stops at an overall deadline.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class MiniTorrentError(Exception):
    """Base of every expected failure; ``str(error)`` is a one-line reason."""


class ConfigError(MiniTorrentError):
    """The configuration file is missing, malformed or holds a bad value."""


class IntegrityError(MiniTorrentError):
    """Data did not match the SHA-256 its manifest promised."""


class CatalogError(MiniTorrentError):
    """A file could not be added to, or found in, the catalog."""


class ConnectionFailed(MiniTorrentError):
    """A server could not be reached or the connection broke; worth retrying."""


class ServerBusy(ConnectionFailed):
    """The server is at max_connections; worth retrying after a pause."""


class NotActive(ConnectionFailed):
    """The server is on standby (or no server is active); another may be: retry."""


class AuthenticationFailed(MiniTorrentError):
    """A peer could not prove it knows the shared secret."""


class RemoteError(MiniTorrentError):
    """The server answered a request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class DownloadError(MiniTorrentError):
    """A download could not finish; nothing was left under the final name."""


class DownloadCancelled(DownloadError):
    """The user paused or cancelled the download; its verified chunks are kept unless cancelled."""


class RetryGaveUp(ConnectionFailed):
    """``retry`` reached its deadline; ``__cause__`` is the last failure."""


def backoff_delays(
    base_s: float = 0.1, cap_s: float = 5.0, rng: random.Random | None = None
):
    """Yield endless 'full jitter' delays: uniform in [0, min(cap, base * 2**n)]."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap_s, base_s * (2**attempt)))
        attempt += 1


def retry(
    operation: Callable[[], T],
    *,
    deadline_s: float,
    retry_on: tuple[type[BaseException], ...] = (ConnectionFailed, OSError),
    base_delay_s: float = 0.1,
    max_delay_s: float = 5.0,
    stop: threading.Event | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """Call ``operation`` until it succeeds or ``deadline_s`` seconds have passed.

    Only exceptions in ``retry_on`` are retried; others propagate at once.
    When the deadline passes (or ``stop`` is set) ``RetryGaveUp`` is raised
    from the last failure. ``on_retry(error, delay_s)`` is told before each
    wait. The wait itself is an ``Event.wait`` so a stop request cuts it short.
    """
    stop = stop or threading.Event()
    give_up_at = time.monotonic() + deadline_s
    for delay in backoff_delays(base_delay_s, max_delay_s):
        try:
            return operation()
        except retry_on as error:
            remaining = give_up_at - time.monotonic()
            if remaining <= 0 or stop.is_set():
                raise RetryGaveUp(f"gave up after {deadline_s:g} s: {error}") from error
            delay = min(delay, remaining)
            if on_retry:
                on_retry(error, delay)
            log.debug("retrying in %.2f s after: %s", delay, error)
            if stop.wait(delay):
                raise RetryGaveUp(f"stopped while retrying: {error}") from error
    raise AssertionError("unreachable: backoff_delays is endless")
