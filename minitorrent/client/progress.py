"""A download's progress: the value the downloader reports, and a terminal display of it."""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from minitorrent.common.units import human_duration, human_size, percent

BAR_WIDTH = 24
REDRAW_INTERVAL_S = 0.1  # a terminal redrawn more often only flickers
PLAIN_STEP_PERCENT = 10  # without a terminal, one line per this much progress


@dataclass(frozen=True)
class Progress:
    """A download's progress, as told to ``on_progress`` (from worker threads)."""

    name: str
    total_bytes: int
    done_bytes: int
    fetched_bytes: int  # received in this run (resumed bytes excluded)
    chunks_done: int
    chunks_total: int
    sources: dict[str, int] = field(default_factory=dict)  # bytes received per source ("server", "peer h:p")
    # A folder's progress only: the files whose state changed since its last report, as
    # (name, state) with state one of FILE_STATES, so a window can show one row per file.
    files: tuple[tuple[str, str], ...] = ()


FILE_VERIFIED = "verified"  # its bytes match its SHA-256; not under its final name yet
FILE_DONE = "done"  # under its final name, verified (fetched now or already there)
FILE_FAILED = "failed"
FILE_STATES = (FILE_VERIFIED, FILE_DONE, FILE_FAILED)


def describe_sources(sources: dict[str, int], server_name: str = "") -> str:
    """Who sent the bytes: ``"main server"``, ``"server 60% · 2 peers 40%"``; empty if no one yet.

    ``sources`` maps a source label (``"server"``, ``"peer host:port"``) to
    bytes; ``server_name`` ("main" or "backup") names the server in use (the
    label "server" covers both: after a failover, the backup's bytes add to it).
    """
    total = sum(sources.values())
    if total <= 0:
        return ""
    server_label = f"{server_name} server" if server_name else "server"
    from_server = sum(n for label, n in sources.items() if not label.startswith("peer "))
    peers = [n for label, n in sources.items() if label.startswith("peer ")]
    if not peers:
        return f"from {server_label}"
    peer_part = f"{len(peers)} peer{'s' if len(peers) != 1 else ''} {round(100 * sum(peers) / total)}%"
    if not from_server:
        return f"from {peer_part}"
    return f"from {server_label} {round(100 * from_server / total)}% · {peer_part}"


class TerminalProgress:
    """An ``on_progress`` callback that draws a bar on a terminal, or prints plain lines.

    Thread-safe: download streams call it from their own threads.
    """

    def __init__(self, out: TextIO = sys.stdout, interactive: bool | None = None) -> None:
        self.out = out
        self.interactive = out.isatty() if interactive is None else interactive
        self._lock = threading.Lock()
        self._started: dict[str, tuple[float, int]] = {}
        self._last_draw = 0.0
        self._last_step: dict[str, int] = {}

    def __call__(self, progress: Progress) -> None:
        with self._lock:
            now = time.monotonic()
            started_at, fetched_at_start = self._started.setdefault(progress.name, (now, progress.fetched_bytes))
            speed = (progress.fetched_bytes - fetched_at_start) / max(now - started_at, 1e-6)
            if self.interactive:
                self._draw(progress, speed, now)
            else:
                self._print_step(progress, speed)

    def _draw(self, progress: Progress, speed: float, now: float) -> None:
        finished = progress.done_bytes >= progress.total_bytes
        if not finished and now - self._last_draw < REDRAW_INTERVAL_S:
            return
        self._last_draw = now
        self.out.write("\r\x1b[K" + format_line(progress, speed, bar=True))
        if finished:
            self.out.write("\n")
        self.out.flush()

    def _print_step(self, progress: Progress, speed: float) -> None:
        step = int(percent(progress.done_bytes, progress.total_bytes) // PLAIN_STEP_PERCENT)
        if self._last_step.get(progress.name) == step:
            return
        self._last_step[progress.name] = step
        self.out.write(format_line(progress, speed, bar=False) + "\n")
        self.out.flush()


def format_line(progress: Progress, speed_bps: float, *, bar: bool) -> str:
    """One status line: name, optional bar, percent, sizes, speed and ETA."""
    done_percent = percent(progress.done_bytes, progress.total_bytes)
    remaining = progress.total_bytes - progress.done_bytes
    eta = remaining / speed_bps if speed_bps > 0 else (0.0 if remaining == 0 else None)
    parts = [progress.name]
    if bar:
        filled = int(BAR_WIDTH * done_percent / 100)
        parts.append("[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]")
    parts.append(f"{done_percent:5.1f}%")
    parts.append(f"{human_size(progress.done_bytes)}/{human_size(progress.total_bytes)}")
    parts.append(f"{human_size(speed_bps)}/s")
    parts.append(f"ETA {human_duration(eta)}")
    return "  ".join(parts)
