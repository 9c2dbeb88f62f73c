"""Running a headless server until it is told to stop, and editing its catalog: both servers' command lines."""
from __future__ import annotations

import signal
import sys
from typing import Callable, Protocol, Sequence, TypeVar

from config_loader import Config, load_config
from error_handler import MiniTorrentError
from logger_config import setup_logging

T = TypeVar("T")


def serve_until_signalled(start: Callable[[], str], stop: Callable[[], None], name: str,
                          extra: dict[int, Callable[[], None]] | None = None) -> None:
    """Call ``start`` (which returns a banner to print), wait for SIGINT or SIGTERM, then ``stop``.

    ``extra`` maps other signals to actions (for example SIGUSR1: approve a
    hand-back). The signals are blocked *before* ``start`` creates any thread,
    so every thread inherits the block and the kernel can only hand them to
    the main thread's ``sigwait``; a handler instead would run only when the
    main thread executes Python code, and a signal delivered to a worker
    thread while the main one sleeps would be lost. The banner goes to
    stdout, flushed, so that scripts and tests can wait for it.
    """
    actions = dict(extra or {})
    watched = {signal.SIGINT, signal.SIGTERM, *actions}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        print(start(), flush=True)
        while (received := signal.sigwait(watched)) in actions:
            actions[received]()
        stop()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    print(f"{name} stopped", flush=True)


def build_engine(config_path: str | None, program: str, factory: Callable[[Config], T]) -> T | None:
    """Load the config, set up logging and build a server's engine.

    On an expected failure (bad config, unusable data folder) prints the
    one-line reason and returns None: the caller exits with status 2.
    """
    try:
        config = load_config(config_path)
        setup_logging(config.logging, program)
        return factory(config)
    except MiniTorrentError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


class CatalogEditor(Protocol):
    """What ``edit_catalog`` needs of a server's engine (the server floor's ``ServerEngine`` is one)."""

    def remove_path(self, path: str) -> int: ...

    def rename_path(self, old: str, new: str) -> int: ...


def edit_catalog(engine: CatalogEditor, remove: Sequence[str], rename: Sequence[str] | None) -> bool:
    """Apply ``--remove`` and ``--rename``, one line each; False if any failed."""
    ok = True
    for path in remove:
        removed = engine.remove_path(path)
        print(f"removed: {path} ({removed} files)" if removed else f"error: {path}: not shared",
              file=sys.stdout if removed else sys.stderr, flush=True)
        ok = ok and bool(removed)
    if rename:
        try:
            print(f"renamed: {rename[0]} -> {rename[1]} ({engine.rename_path(*rename)} files)", flush=True)
        except MiniTorrentError as error:
            print(f"error: {error}", file=sys.stderr)
            ok = False
    return ok
