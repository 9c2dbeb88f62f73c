"""Running a headless server until it is told to stop, shared by both servers' command lines."""
from __future__ import annotations

import signal
import threading
from typing import Callable


def serve_until_signalled(start: Callable[[], str], stop: Callable[[], None], name: str,
                          extra: dict[int, Callable[[], None]] | None = None) -> None:
    """Call ``start`` (which returns a banner to print), wait for SIGINT or SIGTERM, then ``stop``.

    ``extra`` maps other signals to actions run in the main thread (for
    example SIGUSR1: approve a hand-back). The banner goes to stdout, flushed,
    so that scripts and tests can wait for it.
    """
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    for signum, action in (extra or {}).items():
        signal.signal(signum, lambda *_, act=action: act())
    print(start(), flush=True)
    stopping.wait()
    stop()
    print(f"{name} stopped", flush=True)
