"""The client window's transfers, without a widget: states, speed and ETA, the download threads.

A ``TransferManager`` runs each download (``ClientEngine.download``) on its
own worker thread, at most ``max_active`` at once; the others wait, queued.
Every method of the manager is called from one thread, the window's (the Tk
thread); the workers never touch the manager's state or a widget: they post
past-tense events (``TransferFinished``...) with ``post`` and the window hands
them back to ``handle`` on its own thread. So the whole lifecycle is plain
code that tests drive with a fake engine and no Tk.

A transfer's life::

    queued -> downloading -> done
                          -> failed: reason     (resume: queued again)
                          -> pausing -> paused  (resume: queued again; verified chunks kept)
                          -> cancelling -> cancelled   (its .part and verified chunks dropped)
"""
from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from error_handler import DownloadCancelled, MiniTorrentError
from metrics import RateMeter
from minitorrent.client.downloader import DownloadResult
from minitorrent.client.progress import (
    FILE_DONE,
    FILE_FAILED,
    FILE_VERIFIED,
    Progress,
    describe_sources,
)
from minitorrent.common.units import human_duration, human_size, percent

log = logging.getLogger(__name__)

# Downloads at once. Each already runs two server streams (and splits the link with the others), and a
# server admits transfer.max_connections (10 by default) clients' connections: three leave room for the rest.
MAX_ACTIVE_TRANSFERS = 3
SPEED_WINDOW_S = 3.0  # speed is averaged over this long: steady enough to read, quick to follow a change
STOP_JOIN_S = 5.0  # how long closing the window waits for the download threads (they stop in ~0.1 s)


class TransferState(enum.Enum):
    """Where a transfer is in its life (the value is what the window shows)."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    PAUSING = "pausing…"
    PAUSED = "paused"
    CANCELLING = "cancelling…"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Action(enum.Enum):
    """What the user may ask of a transfer."""

    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


FINISHED = frozenset({TransferState.DONE, TransferState.CANCELLED})  # may be cleared from the list
_ALLOWED = {
    TransferState.QUEUED: {Action.PAUSE, Action.CANCEL},
    TransferState.DOWNLOADING: {Action.PAUSE, Action.CANCEL},
    TransferState.PAUSING: {Action.CANCEL},
    TransferState.PAUSED: {Action.RESUME, Action.CANCEL},
    TransferState.CANCELLING: set(),
    TransferState.DONE: set(),
    TransferState.FAILED: {Action.RESUME, Action.CANCEL},
    TransferState.CANCELLED: set(),
}


def allowed_actions(state: TransferState) -> frozenset[Action]:
    """The actions that make sense in ``state`` (the window enables exactly these buttons)."""
    return frozenset(_ALLOWED[state])


# Speed and ETA ---------------------------------------------------------------------------------------------


def without_name(reason: str, name: str) -> str:
    """``reason`` without a leading ``"NAME: "`` (the row already names the file)."""
    prefix = f"{name}: "
    while reason.startswith(prefix):
        reason = reason[len(prefix):]
    return reason


def eta_seconds(remaining_bytes: int, speed_bps: float) -> float | None:
    """Seconds left at ``speed_bps``; 0 when nothing remains, None when unknown (no speed)."""
    if remaining_bytes <= 0:
        return 0.0
    return remaining_bytes / speed_bps if speed_bps > 0 else None


# Transfers -------------------------------------------------------------------------------------------------

FILE_WAITING = "waiting"
FILE_DOWNLOADING = "downloading"


@dataclass
class FileProgress:
    """One file of a folder transfer, as its row shows it. Owned by the window's thread."""

    name: str  # the catalog name (``photos/2024/beach.jpg``)
    size: int
    done_bytes: int = 0
    state: str = FILE_WAITING  # waiting, downloading, then progress.FILE_STATES

    @property
    def percent(self) -> float:
        """Completion in percent (an empty file is 100 once done)."""
        if self.state in (FILE_VERIFIED, FILE_DONE):
            return 100.0
        return percent(self.done_bytes, self.size) if self.size else 0.0


@dataclass
class Transfer:
    """One file being (or having been) downloaded into ``folder``. Owned by the window's thread."""

    tid: int
    name: str
    folder: Path
    total_bytes: int = 0
    done_bytes: int = 0
    state: TransferState = TransferState.QUEUED
    reason: str = ""  # why it failed
    sources: dict[str, int] = field(default_factory=dict)
    result: DownloadResult | None = None
    meter: RateMeter = field(default_factory=lambda: RateMeter(SPEED_WINDOW_S))
    cancel: threading.Event = field(default_factory=threading.Event)  # set: stop this run (pause or cancel)
    discard: threading.Event = field(default_factory=threading.Event)  # set: the stop is a cancel
    running: bool = False  # a download thread works on it now
    started_at: float = 0.0
    resume_on_reconnect: bool = False  # it failed while no server answered: resume when one does
    files: dict[str, FileProgress] = field(default_factory=dict)  # a folder's files by name; empty for one file
    folder_fetched: int = 0  # a folder's fetched bytes at its last report (a file's own reports add to it)

    @property
    def percent(self) -> float:
        """Completion in percent (100.0 only when really done)."""
        if self.state is TransferState.DONE:
            return 100.0
        return percent(self.done_bytes, self.total_bytes) if self.total_bytes else 0.0

    @property
    def path(self) -> Path:
        """Where the file lands."""
        return self.folder / self.name


@dataclass(frozen=True)
class DownloadProgressed:
    """Event: the engine reported ``progress`` at ``at`` (``time.monotonic``)."""

    at: float
    progress: Progress


@dataclass(frozen=True)
class TransferFinished:
    """Event: the download of transfer ``tid`` verified and installed its file."""

    tid: int
    result: DownloadResult


@dataclass(frozen=True)
class TransferFailed:
    """Event: the download of transfer ``tid`` stopped with a one-line ``reason``."""

    tid: int
    reason: str


@dataclass(frozen=True)
class TransferStopped:
    """Event: transfer ``tid`` stopped on request; ``discarded``: its partial data is gone (a cancel)."""

    tid: int
    discarded: bool
    from_download: bool = True  # False: only a discard ran (the transfer had no download thread)


TransferEvent = DownloadProgressed | TransferFinished | TransferFailed | TransferStopped


class TransferManager:
    """Downloads on worker threads, ``max_active`` at once, the rest queued.

    ``download(name, folder, cancel)`` and ``discard(name, folder)`` are the
    engine's; ``post(event)`` puts an event on the window's queue (any
    thread). Every method here is for the window's thread only.
    """

    def __init__(self, download: Callable[[str, Path, threading.Event], DownloadResult],
                 discard: Callable[[str, Path], None], post: Callable[[Any], None],
                 max_active: int = MAX_ACTIVE_TRANSFERS, clock: Callable[[], float] = time.monotonic) -> None:
        self._download = download
        self._discard = discard
        self._post = post
        self.max_active = max_active
        self._clock = clock
        self.transfers: dict[int, Transfer] = {}  # in the order they were added
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []

    # Asking -----------------------------------------------------------------------------------------------

    def add(self, name: str, folder: Path, total_bytes: int = 0,
            files: list[tuple[str, int]] | None = None) -> Transfer | None:
        """Queue a download of ``name`` into ``folder``; None if that file is already in the list, unfinished.

        ``files``: for a folder (``photos/``), its files as (name, size), each shown with its own progress.
        """
        if self.find_unfinished(name) is not None:
            return None
        transfer = Transfer(next(self._ids), name, Path(folder), total_bytes,
                            files={file: FileProgress(file, size) for file, size in sorted(files or [])})
        self.transfers[transfer.tid] = transfer
        self._start_queued()
        return transfer

    def add_paused(self, name: str, folder: Path, total_bytes: int, done_bytes: int) -> Transfer | None:
        """List an interrupted download (from an earlier run) as paused, ready to resume."""
        if self.find_unfinished(name) is not None:
            return None
        transfer = Transfer(next(self._ids), name, Path(folder), total_bytes, done_bytes, TransferState.PAUSED)
        self.transfers[transfer.tid] = transfer
        return transfer

    def find_unfinished(self, name: str) -> Transfer | None:
        """The transfer of ``name`` that is not done or cancelled, if any (one per name at a time)."""
        return next((t for t in self.transfers.values() if t.name == name and t.state not in FINISHED), None)

    def pause(self, tid: int) -> bool:
        """Pause a queued or running transfer (its verified chunks are kept); False if it cannot be."""
        transfer = self.transfers[tid]
        if Action.PAUSE not in allowed_actions(transfer.state):
            return False
        if transfer.running:
            transfer.state = TransferState.PAUSING
            transfer.cancel.set()
        else:
            transfer.state = TransferState.PAUSED
        return True

    def resume(self, tid: int) -> bool:
        """Queue a paused or failed transfer again (it resumes from its verified chunks)."""
        transfer = self.transfers[tid]
        if Action.RESUME not in allowed_actions(transfer.state):
            return False
        transfer.state = TransferState.QUEUED
        transfer.reason = ""
        transfer.resume_on_reconnect = False
        self._start_queued()
        return True

    def cancel(self, tid: int) -> bool:
        """Stop a transfer and drop its partial file and verified chunks (in a worker thread)."""
        transfer = self.transfers[tid]
        if Action.CANCEL not in allowed_actions(transfer.state):
            return False
        transfer.state = TransferState.CANCELLING
        transfer.discard.set()
        if transfer.running:
            transfer.cancel.set()  # the download thread discards when it has stopped
        else:
            self._spawn(self._discard_only, transfer, "discard")
        return True

    def resume_after_outage(self) -> list[int]:
        """Resume the failed transfers marked ``resume_on_reconnect`` (a server answers again); their ids."""
        waiting = [t.tid for t in self.transfers.values()
                   if t.state is TransferState.FAILED and t.resume_on_reconnect]
        for tid in waiting:
            self.transfers[tid].resume_on_reconnect = False
            self.resume(tid)
        return waiting

    def clear_finished(self) -> list[int]:
        """Drop done and cancelled transfers from the list; the ids dropped."""
        gone = [tid for tid, t in self.transfers.items() if t.state in FINISHED]
        for tid in gone:
            del self.transfers[tid]
        return gone

    def counts(self) -> dict[TransferState, int]:
        """How many transfers are in each state."""
        counts: dict[TransferState, int] = {}
        for transfer in self.transfers.values():
            counts[transfer.state] = counts.get(transfer.state, 0) + 1
        return counts

    # Hearing back -----------------------------------------------------------------------------------------

    def handle(self, event: TransferEvent) -> Transfer | None:
        """Apply a worker's event; the transfer it changed (None if it is gone or the event is stale)."""
        if isinstance(event, DownloadProgressed):
            return self._progressed(event)
        transfer = self.transfers.get(event.tid)
        if transfer is None:
            return None
        if isinstance(event, TransferStopped) and not event.from_download:
            transfer.state = TransferState.CANCELLED
            return transfer
        transfer.running = False
        if isinstance(event, TransferFinished):
            for file in transfer.files.values():  # a folder that finished has every file in place
                file.state, file.done_bytes = FILE_DONE, file.size
            transfer.state = TransferState.DONE
            transfer.result = event.result
            transfer.total_bytes = transfer.done_bytes = event.result.size
            transfer.sources = dict(event.result.sources) or transfer.sources
        elif isinstance(event, TransferFailed):
            transfer.state, transfer.reason = TransferState.FAILED, without_name(event.reason, transfer.name)
        elif event.discarded:
            transfer.state = TransferState.CANCELLED
        elif transfer.state is TransferState.CANCELLING:  # cancel asked just after the thread saw a pause
            self._spawn(self._discard_only, transfer, "discard")
        else:
            transfer.state = TransferState.PAUSED
        self._start_queued()
        return transfer

    def _progressed(self, event: DownloadProgressed) -> Transfer | None:
        progress = event.progress
        transfer = next((t for t in self.transfers.values() if t.running and t.name == progress.name), None)
        if transfer is None:
            return self._file_progressed(event)
        transfer.total_bytes = progress.total_bytes
        transfer.done_bytes = progress.done_bytes
        transfer.sources = dict(progress.sources)
        transfer.meter.add_total(progress.fetched_bytes, event.at)
        if transfer.files:
            transfer.folder_fetched = progress.fetched_bytes
            for name, state in progress.files:
                _set_file_state(transfer.files.get(name), state)
            transfer.done_bytes = sum(file.done_bytes for file in transfer.files.values())
        return transfer

    def _file_progressed(self, event: DownloadProgressed) -> Transfer | None:
        """A file of a running folder transfer reported its own progress (a file of many chunks)."""
        progress = event.progress
        transfer = next((t for t in self.transfers.values() if t.running and progress.name in t.files), None)
        if transfer is None:
            return None
        file = transfer.files[progress.name]
        file.done_bytes = min(file.size, progress.done_bytes)
        file.state = FILE_VERIFIED if progress.done_bytes >= progress.total_bytes else FILE_DOWNLOADING
        transfer.done_bytes = sum(f.done_bytes for f in transfer.files.values())
        transfer.meter.add_total(transfer.folder_fetched + progress.fetched_bytes, event.at)
        return transfer

    def speed(self, transfer: Transfer, now: float | None = None) -> float:
        """The transfer's current speed in bytes/s (0 unless it is downloading)."""
        if transfer.state is not TransferState.DOWNLOADING:
            return 0.0
        return transfer.meter.rate(self._clock() if now is None else now)

    # Threads ----------------------------------------------------------------------------------------------

    def running_count(self) -> int:
        """Transfers with a download thread now."""
        return sum(1 for t in self.transfers.values() if t.running)

    def _start_queued(self) -> None:
        for transfer in self.transfers.values():
            if self.running_count() >= self.max_active:
                return
            if transfer.state is TransferState.QUEUED:
                self._start(transfer)

    def _start(self, transfer: Transfer) -> None:
        transfer.state = TransferState.DOWNLOADING
        transfer.running = True
        transfer.cancel = threading.Event()
        transfer.discard = threading.Event()
        transfer.started_at = self._clock()
        transfer.meter.reset(transfer.started_at)
        self._spawn(self._run, transfer, "get")

    def _spawn(self, target: Callable[[Transfer], None], transfer: Transfer, what: str) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(target=target, args=(transfer,), name=f"{what}-{transfer.tid}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, transfer: Transfer) -> None:
        """A download thread: run one download, post how it ended. Touches no shared state."""
        tid, name, folder, cancel, discard = (transfer.tid, transfer.name, transfer.folder, transfer.cancel,
                                              transfer.discard)
        try:
            result = self._download(name, folder, cancel)
        except DownloadCancelled:
            if not discard.is_set():
                self._post(TransferStopped(tid, False))
            elif self._try_discard(tid, name, folder):  # a failed discard posts TransferFailed itself
                self._post(TransferStopped(tid, True))
        except MiniTorrentError as error:
            self._post(TransferFailed(tid, str(error)))
        except Exception as error:  # a bug: say so in the window, keep the traceback in the log
            log.exception("the download of %s failed unexpectedly", name)
            self._post(TransferFailed(tid, f"unexpected error: {error!r}"))
        else:
            self._post(TransferFinished(tid, result))

    def _discard_only(self, transfer: Transfer) -> None:
        """A discard thread for a transfer with no download running (queued, paused or failed)."""
        if self._try_discard(transfer.tid, transfer.name, transfer.folder):
            self._post(TransferStopped(transfer.tid, True, from_download=False))

    def _try_discard(self, tid: int, name: str, folder: Path) -> bool:
        try:
            self._discard(name, folder)
        except (MiniTorrentError, OSError) as error:
            self._post(TransferFailed(tid, f"could not remove the partial file: {error}"))
            return False
        return True

    def stop_all(self, timeout_s: float = STOP_JOIN_S) -> list[str]:
        """Stop every download (a pause: chunks are kept) and wait for the threads; the names still running."""
        for transfer in self.transfers.values():
            transfer.cancel.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]


def _set_file_state(file: FileProgress | None, state: str) -> None:
    """Apply a folder report's news about one file (a name not in the folder is ignored)."""
    if file is None:
        return
    file.state = state
    if state in (FILE_VERIFIED, FILE_DONE):
        file.done_bytes = file.size


# What a transfer row shows --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferView:
    """The texts of one transfer row."""

    percent: float
    percent_text: str
    state_text: str  # "downloading", "failed"...: the state's badge
    detail: str  # sizes, speed, ETA, sources; or why it failed
    tone: str  # "active", "ok", "error", "muted": the row's colour


def transfer_view(transfer: Transfer, speed_bps: float, server_name: str = "", max_active: int = 0) -> TransferView:
    """What a row shows for ``transfer`` going at ``speed_bps`` (plain text, no widget)."""
    state = transfer.state
    sizes = (f"{human_size(transfer.done_bytes)} of {human_size(transfer.total_bytes)}"
             if transfer.total_bytes else "size not known yet")
    sources = describe_sources(transfer.sources)  # a finished run may have had both servers: not named
    if state is TransferState.DOWNLOADING:
        sources = describe_sources(transfer.sources, server_name)  # the server sending now
        if not transfer.total_bytes:
            parts = ["asking the server for the file's manifest…"]
        else:
            eta = eta_seconds(transfer.total_bytes - transfer.done_bytes, speed_bps)
            parts = [sizes, f"{human_size(speed_bps)}/s", f"ETA {human_duration(eta)}", sources]
        tone = "active"
    elif state is TransferState.DONE and transfer.result is not None:
        result = transfer.result
        if result.outcome == "already present":
            parts = [human_size(result.size), "already in the folder, SHA-256 verified"]
        else:
            average = result.fetched_bytes / result.seconds if result.seconds > 0 else 0.0
            parts = [human_size(result.size), f"SHA-256 verified in {human_duration(result.seconds)}",
                     f"average {human_size(average)}/s", sources]
        tone = "ok"
    elif state is TransferState.FAILED:
        parts = [f"failed: {transfer.reason or 'unknown reason'}", "Resume tries again from the verified chunks"]
        tone = "error"
    elif state is TransferState.QUEUED:
        parts = [sizes, f"waiting for a free slot ({max_active} downloads at a time)" if max_active else "waiting"]
        tone = "muted"
    elif state is TransferState.PAUSED:
        parts = [sizes, "paused: verified chunks are kept, Resume continues"]
        tone = "muted"
    elif state is TransferState.CANCELLED:
        parts = ["cancelled: the partial file was removed"]
        tone = "muted"
    else:  # pausing, cancelling
        parts = [sizes, "stopping…"]
        tone = "muted"
    return TransferView(transfer.percent, f"{transfer.percent:.1f}%", state.value,
                        " · ".join(part for part in parts if part), tone)


def file_row(file: FileProgress, folder: str) -> tuple[str, str, str, str]:
    """One file of a folder transfer as its row shows it: path inside the folder, size, percent, state."""
    inside = file.name.removeprefix(folder)
    return inside, human_size(file.size), f"{file.percent:.1f}%", file.state


def files_summary(files: dict[str, FileProgress]) -> str:
    """``"3 of 10 files done · 1 downloading · 1 failed"`` for a folder transfer's file list."""
    counts: dict[str, int] = {}
    for file in files.values():
        counts[file.state] = counts.get(file.state, 0) + 1
    parts = [f"{counts.get(FILE_DONE, 0)} of {len(files)} files done"]
    parts += [f"{counts[state]} {state}" for state in (FILE_VERIFIED, FILE_DOWNLOADING, FILE_FAILED) if counts.get(state)]
    return " · ".join(parts)
