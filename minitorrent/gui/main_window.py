"""The main server's window: the shared files, Add Files/Add Folder/Rename/Remove, Start/Stop, live status and the log.

Dropping files on the window is not offered: Tk has no drop target without a
non-standard-library package (tkinterdnd2); Add Folder… covers the need.

Three layers, as in every MiniTorrent window (DESIGN principle 1):

* pure functions (``file_rows``, ``status_tiles``, ``headline``...) turn a
  snapshot into what is shown; tests call them without Tk;
* ``MainController`` does the engine work in worker threads (imports,
  removals, start and stop) and takes the ``MainSnapshot`` the ``Poller``
  posts; it never touches a widget;
* ``MainWindow`` draws on the Tk thread what the ``EventPump`` hands it.

Start/Stop: a ``RequestServer`` and the replication threads run once, and
``ServerEngine.stop`` closes the catalog. Rather than make the engine
restartable, *Stop Server* stops the engine completely (the backup sees the
heartbeats stop, exactly as if the program had quit) and puts a fresh,
unstarted ``MainServer`` on the same config in its place; the files can
still be added and removed while stopped, and *Start Server* starts it.
"""
from __future__ import annotations

import enum
import logging
import os
import queue
import threading
import time
import tkinter as tk
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from tkinter import filedialog, messagebox, simpledialog, ttk
from typing import Any, Callable, Iterator, Sequence

from error_handler import MiniTorrentError
from minitorrent.common.units import human_duration, human_size, percent
from minitorrent.gui.base import entry_row
from minitorrent.gui.pairing import (
    ClientRevoked,
    ClientsPanel,
    PairingCodeOffered,
    PairingEnded,
    WEB_TOKEN_COPIED,
    WebTokenReady,
    pairing_ended_text,
)
from minitorrent.gui.server_window import ServerWindow
from minitorrent.gui.shell import run_window
from minitorrent.gui.widgets import ProgressStrip, TileStrip
from minitorrent.server.access import CODE_TTL_S, AccessList, wait_for_pairing

log = logging.getLogger(__name__)

DEFAULT_GEOMETRY = "1120x720"
MAX_TABLE_ROWS = 20_000  # a catalog beyond this is shown in part (the status line says so)
IMPORT_PROGRESS_INTERVAL_S = 0.05  # progress events per import: at most 20 a second
WORKER_JOIN_TIMEOUT_S = 30.0  # a stop waits for replication threads (io_timeout + 1 each)

COLUMNS = [  # key, heading, width, anchor
    ("name", "Name", 260, "w"),
    ("size", "Size", 90, "e"),
    ("chunks", "Chunks", 70, "e"),
    ("sha256", "SHA-256", 120, "w"),
    ("downloads", "Downloads", 90, "e"),
    ("backup", "On backup", 90, "center"),
    ("added", "Added", 140, "w"),
]
COLUMN_KEYS = [key for key, *_ in COLUMNS]
TILES = {"role": "Role", "backup": "Backup link", "clients": "Clients", "uptime": "Uptime", "sent": "Sent",
         "speed": "Upload speed"}


class ServerState(str, enum.Enum):
    """Where the window's engine is in its life."""

    STOPPED = "stopped"
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"


class ImportCancelled(InterruptedError):
    """Raised from an import's progress callback when the window closes (an OSError: the catalog cleans up)."""


# Events (posted by worker threads, drawn by the Tk thread) ----------------------------------------------------


@dataclass(frozen=True)
class ImportStarted:
    """An import began: ``queued`` more wait behind it."""

    path: str
    size: int
    queued: int


@dataclass(frozen=True)
class ImportProgressed:
    """Bytes of the current import copied and hashed so far."""

    path: str
    done: int
    total: int


@dataclass(frozen=True)
class ImportFinished:
    """An import ended: ``outcome`` (added, unchanged, renamed) or ``error``."""

    path: str
    name: str = ""
    outcome: str = ""
    error: str = ""
    queued: int = 0


@dataclass(frozen=True)
class FilesRemoved:
    """A removal ended; ``errors`` holds one readable line per failure."""

    names: tuple[str, ...]
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerStateChanged:
    """The engine started, stopped or failed to (``error``)."""

    state: ServerState
    address: str = ""
    error: str = ""


@dataclass(frozen=True)
class MainSnapshot:
    """Everything the window shows, read off the Tk thread by the poller (``rows`` None: engine being replaced)."""

    state: ServerState
    address: str = ""
    uptime_s: float | None = None
    role: str = ""
    epoch: int = 0
    rows: list | None = field(default_factory=list)
    file_count: int = 0
    total_bytes: int = 0
    backup: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    data_dir: str = ""
    paired: list = field(default_factory=list)  # (identity, paired at) of each paired client
    access: str = "open"  # server.access


# Pure functions: what is shown ---------------------------------------------------------------------------------


def replica_state(name: str, sha256: str, holds: dict[str, str], backup: dict) -> str:
    """Whether the backup holds this file: ``yes``, ``pending`` (on its way) or ``no``."""
    if holds.get(name) == sha256:
        return "yes"
    if backup.get("replicating") and backup.get("connected"):
        return "pending"
    return "no"


REPLICA_ORDER = {"yes": 0, "pending": 1, "no": 2}


def file_rows(entries: list[dict], holds: dict[str, str], backup: dict) -> list[tuple[str, tuple, dict]]:
    """The table's rows for catalog ``entries``: (iid, shown values, raw sort keys)."""
    rows = []
    for entry in entries:
        replica = replica_state(entry["name"], entry["sha256"], holds, backup)
        values, keys = entry_row(entry, COLUMN_KEYS, {"backup": (replica, REPLICA_ORDER[replica])})
        rows.append((entry["name"], values, keys))
    return rows


def age_text(seconds: float | None) -> str:
    """``0.4`` -> ``"0.4 s ago"``, ``75`` -> ``"1:15 ago"``; None -> ``"never"``."""
    if seconds is None:
        return "never"
    return f"{seconds:.1f} s ago" if seconds < 60 else f"{human_duration(seconds)} ago"


def backup_tile(backup: dict, state: ServerState) -> tuple[str, str, str]:
    """(value, detail, tone) of the backup link tile, from ``MainServer.backup_link()``."""
    if not backup.get("replicating"):
        return "Off", "no backup configured", "idle"
    if state is not ServerState.SERVING:
        return "—", backup.get("address", ""), "idle"
    if backup.get("role") == "active":
        return "Backup active", f"it serves with epoch {backup.get('epoch', '?')}", "warn"
    # Heartbeats are acknowledged every interval; replication acks only come when there is something to send.
    acks = [age for age in (backup.get("last_heartbeat_ack_age_s"), backup.get("last_ack_age_s")) if age is not None]
    last_ack = f"last ack {age_text(min(acks) if acks else None)}"
    if not backup.get("connected"):
        return "Unreachable", last_ack, "error"
    files, nbytes = backup.get("files_pending", 0), backup.get("bytes_pending", 0)
    if files:
        lag = f"{files} file{'s' if files != 1 else ''} · {human_size(nbytes)} behind"
        return "Syncing", lag, "info"
    return ("In sync" if backup.get("in_sync") else "Connected"), last_ack, "ok"


def status_tiles(snapshot: MainSnapshot) -> dict[str, tuple[str, str, str]]:
    """The status strip's tiles: key -> (value, detail, tone)."""
    serving = snapshot.state is ServerState.SERVING
    metrics = snapshot.metrics
    if serving:
        active = snapshot.role == "active"
        role = ("Active" if active else "Standby", f"epoch {snapshot.epoch}", "ok" if active else "warn")
    else:
        role = (snapshot.state.value.capitalize(), f"epoch {snapshot.epoch}" if snapshot.epoch else "", "idle")
    clients = metrics.get("active_connections", 0) if serving else 0
    total = metrics.get("connections_total", 0)
    return {
        "role": role,
        "backup": backup_tile(snapshot.backup, snapshot.state),
        "clients": (str(clients), f"{total} since start" if serving else "", ""),
        "uptime": (human_duration(snapshot.uptime_s) if serving else "—",
                   f"since {time.strftime('%H:%M', time.localtime(time.time() - snapshot.uptime_s))}"
                   if serving and snapshot.uptime_s is not None else "", ""),
        "sent": (human_size(metrics.get("bytes_sent", 0)), f"{metrics.get('requests_total', 0)} requests", ""),
        "speed": (f"{human_size(metrics.get('upload_bps', 0) if serving else 0)}/s",
                  f"average {human_size(metrics.get('average_upload_bps', 0))}/s" if serving else "", ""),
    }


def headline(state: ServerState, address: str, role: str = "", error: str = "") -> tuple[str, str, bool]:
    """(text under the title, dot tone, whether the dot pulses)."""
    if state is ServerState.SERVING and role == "standby":
        return f"On standby at {address}: the backup is active, catching up before taking over", "warn", False
    if state is ServerState.SERVING:
        return f"Serving on {address}", "ok", True
    if state is ServerState.STARTING:
        return "Starting…", "info", False
    if state is ServerState.STOPPING:
        return "Stopping…", "info", False
    if error:  # the banner above the table shows the whole reason; a long one would not fit here
        return "Stopped after an error (see the message and the log)", "error", False
    return "Stopped: clients are not served", "idle", False


def import_text(path: str, done: int, total: int, queued: int) -> str:
    """The import strip's line: name, percent, sizes, how many wait."""
    more = f"  ·  {queued} more queued" if queued else ""
    return (f"Importing {Path(path).name}: {int(percent(done, total))}%  "
            f"({human_size(done)} of {human_size(total)}){more}")


def import_error_text(path: str, error: str) -> str:
    """The banner line for a failed import, naming the file once."""
    reason = error[len(path) + 2:] if error.startswith(f"{path}: ") else error
    return f"Could not add {Path(path).name}: {reason}"


def summary_line(count: int, total_bytes: int, shown: int, data_dir: str) -> str:
    """The status bar: how many files, how big, where they are stored."""
    files = f"{count} file{'s' if count != 1 else ''} shared, {human_size(total_bytes)}"
    if shown < count:
        files += f" (the first {shown} shown)"
    return f"{files}  ·  store: {data_dir}" if data_dir else files


# The controller: engine work off the Tk thread ------------------------------------------------------------------


class EngineHolder:
    """The window's engine, which ``replace`` swaps for a new one once no thread is using it.

    ``use`` (any thread) waits while a swap is under way; ``try_use`` yields
    None instead, so the poller never blocks behind a long stop.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._users = 0
        self._swapping = False

    @contextmanager
    def use(self) -> Iterator[Any]:
        with self._cond:
            self._cond.wait_for(lambda: not self._swapping)
            self._users += 1
            engine = self._engine
        try:
            yield engine
        finally:
            self._leave()

    @contextmanager
    def try_use(self) -> Iterator[Any | None]:
        with self._cond:
            if self._swapping:
                engine = None
            else:
                self._users += 1
                engine = self._engine
        try:
            yield engine
        finally:
            if engine is not None:
                self._leave()

    def replace(self, renew: Callable[[Any], Any]) -> None:
        """Wait until no thread uses the engine, then put ``renew(old)`` in its place."""
        with self._cond:
            self._cond.wait_for(lambda: not self._swapping)
            self._swapping = True
            self._cond.wait_for(lambda: self._users == 0)
        try:
            self._engine = renew(self._engine)
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()

    def _leave(self) -> None:
        with self._cond:
            self._users -= 1
            self._cond.notify_all()


class MainController:
    """Starts, stops and feeds the main server's engine from worker threads; reports with events.

    ``post`` receives the events (any thread). Public methods may be called
    from the Tk thread: none of them blocks it, except ``close``.
    """

    def __init__(self, engine: Any, post: Callable[[Any], None]) -> None:
        self.holder = EngineHolder(engine)
        self.post = post
        self.on_change: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._state = ServerState.STOPPED
        self._address = ""
        self._started_at: float | None = None
        self._last_holds: dict[str, str] = {}
        self._paired_version: int | None = None  # the paired list's version last read (poller thread only)
        self._paired_list: list[tuple[str, float]] = []
        self._imports: queue.Queue[str | None] = queue.Queue()
        self._importing = 0  # queued or running
        self._cancel = threading.Event()
        self._import_thread = threading.Thread(target=self._import_loop, name="window-imports", daemon=True)
        self._import_thread.start()
        self._workers: list[threading.Thread] = []

    # State ------------------------------------------------------------------------------------------------

    @property
    def state(self) -> ServerState:
        with self._lock:
            return self._state

    @property
    def importing(self) -> int:
        """Imports queued or running."""
        with self._lock:
            return self._importing

    def _set_state(self, state: ServerState, address: str = "", error: str = "") -> None:
        with self._lock:
            self._state = state
            self._address = address
            self._started_at = time.monotonic() if state is ServerState.SERVING else None
        self.post(ServerStateChanged(state, address, error))
        self.on_change()

    # Start and stop ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving (in a worker thread); ignored unless stopped."""
        with self._lock:
            if self._state is not ServerState.STOPPED:
                return
            self._state = ServerState.STARTING
        self.post(ServerStateChanged(ServerState.STARTING))
        self._spawn(self._start, "window-start")

    def stop(self) -> None:
        """Stop serving (in a worker thread); ignored unless serving."""
        with self._lock:
            if self._state is not ServerState.SERVING:
                return
            self._state = ServerState.STOPPING
        self.post(ServerStateChanged(ServerState.STOPPING))
        self._spawn(self._stop, "window-stop")

    def _start(self) -> None:
        try:
            with self.holder.use() as engine:
                host, port = engine.start()
        except MiniTorrentError as error:
            log.error("could not start the main server: %s", error)
            self._set_state(ServerState.STOPPED, error=f"The server could not start: {error}")
            return
        self._set_state(ServerState.SERVING, f"{host}:{port}")

    def _stop(self) -> None:
        error = ""
        try:
            self.holder.replace(_stop_and_renew)
        except Exception as failure:  # a fresh engine could not open the catalog: say so, keep the old one
            log.exception("the main server did not restart cleanly")
            error = f"The server stopped but cannot reopen its catalog: {failure}"
        self._set_state(ServerState.STOPPED, error=error)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._workers = [t for t in self._workers if t.is_alive()] + [thread]
        thread.start()

    # Files ----------------------------------------------------------------------------------------------

    def add_files(self, paths: Sequence[str]) -> None:
        """Queue imports; one worker thread copies and hashes them in turn."""
        for path in paths:
            with self._lock:
                self._importing += 1
            self._imports.put(str(path))

    def remove_files(self, names: Sequence[str]) -> None:
        """Stop sharing ``names`` (in a worker thread)."""
        self._spawn(lambda: self._remove(tuple(names)), "window-remove")

    def rename(self, old: str, new: str) -> None:
        """Rename a shared file or folder (in a worker thread); a failure comes back as ``FilesRemoved`` errors."""
        self._spawn(lambda: self._rename(old, new), "window-rename")

    def _rename(self, old: str, new: str) -> None:
        errors: tuple[str, ...] = ()
        with self.holder.use() as engine:
            try:
                engine.rename_path(old, new)
            except MiniTorrentError as error:
                errors = (f"could not rename {old}: {error}",)
        self.post(FilesRemoved((), errors))
        self.on_change()

    def _remove(self, names: tuple[str, ...]) -> None:
        errors = []
        with self.holder.use() as engine:
            for name in names:
                try:
                    if not engine.remove_file(name):
                        errors.append(f"{name} was not shared any more")
                except Exception as error:
                    log.exception("could not remove %s", name)
                    errors.append(f"could not remove {name}: {error}")
        self.post(FilesRemoved(names, tuple(errors)))
        self.on_change()

    def _import_loop(self) -> None:
        while (path := self._imports.get()) is not None:
            try:
                if not self._cancel.is_set():  # closing: what is still queued is dropped
                    self._import_one(path)
            finally:
                with self._lock:
                    self._importing -= 1
            self.on_change()

    def _import_one(self, path: str) -> None:
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        self.post(ImportStarted(path, size, self._imports.qsize()))
        done, last_post = 0, 0.0

        def progress(nbytes: int) -> None:
            nonlocal done, last_post
            if self._cancel.is_set():
                raise ImportCancelled("the window was closed")
            done += nbytes
            now = time.monotonic()
            if now - last_post >= IMPORT_PROGRESS_INTERVAL_S:
                last_post = now
                self.post(ImportProgressed(path, done, size))

        try:
            with self.holder.use() as engine:
                if os.path.isdir(path):
                    self._import_folder(engine, path, progress)
                    return
                result = engine.add_file(path, progress)
        except MiniTorrentError as error:
            log.error("could not add %s: %s", Path(path).name, error)
            self.post(ImportFinished(path, error=str(error), queued=self._imports.qsize()))
            return
        except Exception as error:  # an unexpected failure still reaches the user as a line in the window
            log.exception("could not add %s", path)
            self.post(ImportFinished(path, error=f"{Path(path).name}: {error}", queued=self._imports.qsize()))
            return
        self.post(ImportFinished(path, result.record.name, result.outcome, queued=self._imports.qsize()))

    def _import_folder(self, engine: Any, path: str, progress: Callable[[int], None]) -> None:
        """A whole tree: one ImportFinished for the folder, each skipped file's reason shown as an error."""
        results, warnings = engine.add_folder(path, progress)
        for warning in warnings:
            self.post(ImportFinished(path, error=warning, queued=self._imports.qsize() + 1))
        self.post(ImportFinished(path, f"{Path(path).name}/ ({len(results)} files)", "added",
                                 queued=self._imports.qsize()))

    # Pairing (server.access: paired) -------------------------------------------------------------------------

    def offer_code(self) -> None:
        """Show a new one-time code (in a worker), then wait for the client that uses it; events tell the rest."""
        self._spawn(self._offer_code, "window-pair")

    def _offer_code(self) -> None:
        with self.holder.use() as engine:
            code = engine.offer_pairing_code()
            data_dir = engine.config.server.main.data_dir
        self.post(PairingCodeOffered(code, time.time() + CODE_TTL_S))
        access = AccessList(data_dir)  # its own connection: Stop Server may replace the engine while we wait
        try:
            identity = wait_for_pairing(access, code, self._cancel)
        except LookupError as error:  # a wrong code, none used in time, a newer code, or the window closing
            if not self._cancel.is_set():
                self.post(PairingEnded(code, error=str(error)))
            return
        finally:
            access.close()
        self.post(PairingEnded(code, identity))
        self.on_change()  # the list shows the new client at once

    def fetch_web_token(self) -> None:
        """Fetch the operator's web token (in a worker: it may read ``access.db``) for the clipboard."""
        self._spawn(self._fetch_web_token, "window-token")

    def _fetch_web_token(self) -> None:
        with self.holder.use() as engine:
            token = engine.operator_token()
        self.post(WebTokenReady(token))

    def revoke(self, identity: str) -> None:
        """Stop accepting ``identity`` (in a worker; the backup follows)."""
        self._spawn(lambda: self._revoke(identity), "window-revoke")

    def _revoke(self, identity: str) -> None:
        with self.holder.use() as engine:
            revoked = engine.revoke_client(identity)
        self.post(ClientRevoked(identity, revoked))
        self.on_change()

    # Snapshots (the poller's thread) -----------------------------------------------------------------------

    def snapshot(self) -> MainSnapshot:
        """What the window shows now; reads SQLite, so never call it on the Tk thread."""
        with self._lock:
            state, address, started_at = self._state, self._address, self._started_at
        uptime = time.monotonic() - started_at if started_at is not None else None
        with self.holder.try_use() as engine:
            if engine is None:  # stopping: the table keeps what it shows until the new engine is in place
                return MainSnapshot(state, address, uptime, rows=None)
            entries, _ = engine.catalog.list_files(limit=MAX_TABLE_ROWS)
            count, total_bytes = engine.catalog.count_files()
            backup = engine.backup_link()
            holds = engine.backup_holds()
            metrics = engine.metrics.snapshot(top_files=0)
            role, epoch = engine.node.role.value, engine.node.epoch
            data_dir = str(engine.catalog.data_dir)
            paired, access = self._paired(engine), engine.config.server.access
        if holds is not None:
            self._last_holds = holds  # while the link is down, show what the backup held when last seen
        rows = file_rows(entries, self._last_holds, backup)
        return MainSnapshot(state, address, uptime, role, epoch, rows, count, total_bytes, backup, metrics, data_dir,
                            paired, access)

    def _paired(self, engine: Any) -> list[tuple[str, float]]:
        """The paired clients, read again only when the list changed (a poll every half second reads one number)."""
        version = engine.access.version()
        if version != self._paired_version:
            self._paired_version, self._paired_list = version, engine.paired_clients()
        return self._paired_list

    # Closing ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel the imports, wait for the workers, stop the engine. Blocks: call it after the window is gone."""
        self._cancel.set()
        self._imports.put(None)
        self._import_thread.join(WORKER_JOIN_TIMEOUT_S)
        with self._lock:
            workers = list(self._workers)
        for thread in workers:
            thread.join(WORKER_JOIN_TIMEOUT_S)
        with self.holder.use() as engine:
            engine.stop()


def _stop_and_renew(engine: Any) -> Any:
    """Stop ``engine`` for good and return a fresh, unstarted one on the same config."""
    engine.stop()
    return type(engine)(engine.config)


# The window ---------------------------------------------------------------------------------------------------------


class MainWindow(ServerWindow):
    """The main server's window. Build it on the Tk thread with an unstarted ``MainServer``.

    ``start`` starts serving at once; ``add_paths`` are imported as Add Files
    would. ``close`` (also the window's close button) stops everything.
    """

    def __init__(self, root: tk.Tk, engine: Any, settings_file: Path | None = None,
                 add_paths: Sequence[str] = (), start: bool = True) -> None:
        super().__init__(root, "main", settings_file)
        self.controller = MainController(engine, self.pump.post)
        self._state_error = ""
        self._role = ""
        self._build(engine.identity.id)
        self.root.bind("<Delete>", lambda _event: self.remove_selected())
        self.open(self.controller.snapshot)
        self.controller.on_change = self.poller.poll_now
        if start:
            self.controller.start()
        if add_paths:
            self.controller.add_files(add_paths)

    def _build(self, identity: str) -> None:
        self.add_button = self.header.add_button("Add Files…", self.add_files, style="Accent.TButton")
        self.add_folder_button = self.header.add_button("Add Folder…", self.add_folder)
        self.serve_button = self.header.add_button("Start Server", self.toggle_server, width=12)
        self.header.show_identity(identity)  # what clients pin (server.main.id) and check on first use
        ttk.Separator(self).grid(row=1, column=0, sticky="ew", pady=(10, 0))
        self.tiles = TileStrip(self, TILES)
        self.tiles.grid(row=2, column=0, sticky="ew", pady=2)
        ttk.Separator(self).grid(row=3, column=0, sticky="ew", pady=(0, 8))
        self.build_banner(row=4)
        self.import_strip = ProgressStrip(self)
        self.import_strip.place_at(row=5)
        self.build_panes(6, "Shared files", COLUMNS, "No files shared yet. Click Add Files… to share some.")
        self.table.tree.bind("<<TreeviewSelect>>", lambda _event: self._update_buttons())
        # Near the rows they act on (the header has no room for them in a half-screen window).
        self.rename_button = ttk.Button(self.table_actions, text="Rename…", command=self.rename_selected,
                                        state="disabled")
        self.rename_button.grid(row=0, column=0, padx=(0, 6))
        self.remove_button = ttk.Button(self.table_actions, text="Remove", command=self.remove_selected,
                                        state="disabled")
        self.remove_button.grid(row=0, column=1)
        self.clients = ClientsPanel(self.panes, self.controller.offer_code, self.revoke_selected,
                                    self.controller.fetch_web_token)
        self.panes.insert(1, self.clients, weight=1)
        self._code = ""  # the code shown, whose outcome the panel waits for

    # Actions (Tk thread) ------------------------------------------------------------------------------------

    def add_files(self) -> None:
        """Ask for files (multi-select) and import them in the background."""
        paths = filedialog.askopenfilenames(parent=self.root, title="Add files to share")
        if paths:
            self.controller.add_files(self.root.tk.splitlist(paths) if isinstance(paths, str) else list(paths))

    def add_folder(self) -> None:
        """Ask for a folder and share its whole tree in the background (each file under its relative path)."""
        path = filedialog.askdirectory(parent=self.root, title="Add a folder to share", mustexist=True)
        if path:
            self.controller.add_files([path])

    def rename_selected(self) -> None:
        """Rename the selected file, or its folder: the path typed says which (``photos/2024`` renames a folder)."""
        names = self.table.selected()
        if not names:
            return
        old = simpledialog.askstring("Rename", "File or folder to rename (edit to a folder part to rename "
                                     "the folder):", initialvalue=names[0], parent=self.root)
        if not old:
            return
        new = simpledialog.askstring("Rename", f"New name for “{old}”:", initialvalue=old, parent=self.root)
        if new and new != old:
            self.controller.rename(old.strip(), new.strip())

    def remove_selected(self) -> None:
        """Stop sharing the selected files, after a confirmation."""
        names = self.table.selected()
        if not names:
            return
        what = f"“{names[0]}”" if len(names) == 1 else f"these {len(names)} files"
        if not messagebox.askyesno("Remove files", f"Stop sharing {what}?\n\nThe server's copy is deleted; "
                                   "the originals on your disk are not touched.", parent=self.root):
            return
        self.controller.remove_files(names)

    def revoke_selected(self) -> None:
        """Stop accepting the selected client, after a confirmation."""
        identity = self.clients.selected()
        if identity and messagebox.askyesno(
                "Revoke client", f"Stop accepting the client\n{identity}?\n\nIt can no longer list or download "
                "(server.access: paired) until it pairs again with a new code.", parent=self.root):
            self.controller.revoke(identity)

    def toggle_server(self) -> None:
        """Start Server when stopped, Stop Server when serving."""
        if self.controller.state is ServerState.SERVING:
            self.controller.stop()
        else:
            self.controller.start()

    def request_close(self) -> None:
        """The window's close button: confirm if imports would be cut short, then close."""
        if self.controller.importing and not messagebox.askyesno(
                "Imports running", "Files are still being added. Stop adding them and close?", parent=self.root):
            return
        self.close()

    def stop_engine(self) -> None:
        self.controller.close()

    # Drawing (Tk thread) ------------------------------------------------------------------------------------

    def handle(self, event: Any) -> None:
        if isinstance(event, MainSnapshot):
            self._show_snapshot(event)
        elif isinstance(event, (ImportStarted, ImportProgressed, ImportFinished)):
            self._show_import(event)
        elif isinstance(event, ServerStateChanged):
            self._state_error = event.error
            if event.error:
                self.show_error(event.error)
            self.show_headline(*headline(event.state, event.address, self._role, event.error))
            self._update_buttons()
        elif isinstance(event, FilesRemoved):
            for error in event.errors:
                self.show_error(error)
        elif isinstance(event, (PairingCodeOffered, PairingEnded, ClientRevoked)):
            self._show_pairing(event)
        elif isinstance(event, WebTokenReady):
            self.root.clipboard_clear()
            self.root.clipboard_append(event.token)
            self.clients.show_outcome(WEB_TOKEN_COPIED, "info")

    def _show_pairing(self, event: Any) -> None:
        if isinstance(event, PairingCodeOffered):
            self._code = event.code
            self.clients.show_code(event.code, event.expires_at)
        elif isinstance(event, PairingEnded) and event.code == self._code:  # an older code's end is old news
            self._code = ""
            self.clients.show_outcome(*pairing_ended_text(event))
        elif isinstance(event, ClientRevoked):
            self.clients.show_outcome(f"Revoked {event.identity}" if event.revoked else
                                      f"{event.identity} was not paired any more", "info")

    def _show_snapshot(self, snapshot: MainSnapshot) -> None:
        if snapshot.rows is None:  # the engine is being replaced: keep showing what was there
            return
        self._role = snapshot.role
        self.show_rows(snapshot.rows)
        self.tiles.show(status_tiles(snapshot))
        self.show_headline(*headline(snapshot.state, snapshot.address, snapshot.role, self._state_error))
        self.status.configure(text=summary_line(snapshot.file_count, snapshot.total_bytes, len(snapshot.rows),
                                                snapshot.data_dir))
        self.clients.show(snapshot.paired, snapshot.access)
        self._update_buttons()

    def _show_import(self, event: Any) -> None:
        if isinstance(event, ImportStarted):
            self.import_strip.show(import_text(event.path, 0, event.size, event.queued), 0.0)
        elif isinstance(event, ImportProgressed):
            self.import_strip.show(import_text(event.path, event.done, event.total,
                                               max(0, self.controller.importing - 1)),
                                   event.done / event.total if event.total else 1.0)
        else:
            if event.error:
                self.show_error(import_error_text(event.path, event.error))
            if not event.queued:
                self.import_strip.hide()

    def _update_buttons(self) -> None:
        state = self.controller.state
        selected = "normal" if self.table.selected() else "disabled"
        self.remove_button.configure(state=selected)
        self.rename_button.configure(state=selected)
        if state is ServerState.SERVING:
            self.serve_button.configure(text="Stop Server", state="normal")
        elif state is ServerState.STOPPED:
            self.serve_button.configure(text="Start Server", state="normal")
        else:
            self.serve_button.configure(state="disabled")


def run(engine: Any, root: tk.Tk, settings_file: Path | None, add_paths: Sequence[str] = ()) -> int:
    """Show the main server's window until it is closed; the exit status."""
    return run_window(MainWindow(root, engine, settings_file, add_paths))
