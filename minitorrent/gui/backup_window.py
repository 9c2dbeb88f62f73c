"""The backup server's window: its role at a glance, the countdown to failover, the replica, the log.

As in the main window, pure functions (``badge_state``, ``countdown``,
``backup_tiles``...) decide what is shown from a ``BackupSnapshot``; the
``BackupController`` does the engine work (start, promote, approve a
hand-back, stop) in worker threads; ``BackupWindow`` only draws.

The badge reads NO CONTACT WITH MAIN when the backup is on standby and no
heartbeat has come for one interval plus a grace (another interval, and at
least ``NO_CONTACT_GRACE_S``): the main waits ``interval`` *after* each
answer, and a busy machine delays a beat by some tenths of a second, which
must not flash the warning.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
import tkinter as tk
from dataclasses import dataclass, field
from pathlib import Path
from tkinter import messagebox, ttk
from typing import Any, Callable

from error_handler import MiniTorrentError
from minitorrent.common.units import human_duration, human_size
from minitorrent.gui.base import entry_row
from minitorrent.gui.main_window import age_text
from minitorrent.gui.server_window import ServerWindow
from minitorrent.gui.shell import run_window
from minitorrent.gui.widgets import Badge, FittedLabel, ProgressStrip, TileStrip

log = logging.getLogger(__name__)

DEFAULT_GEOMETRY = "1080x720"
NO_CONTACT_GRACE_S = 1.0
COUNTDOWN_FRAME_MS = 100  # the failover bar moves smoothly between two snapshots
WORKER_JOIN_TIMEOUT_S = 30.0
MAX_TABLE_ROWS = 20_000

COLUMNS = [  # key, heading, width, anchor
    ("name", "Name", 280, "w"),
    ("size", "Size", 90, "e"),
    ("chunks", "Chunks", 70, "e"),
    ("sha256", "SHA-256", 120, "w"),
    ("downloads", "Downloads", 90, "e"),
    ("added", "Added", 140, "w"),
]
COLUMN_KEYS = [key for key, *_ in COLUMNS]
TILES = {"files": "Replica", "connections": "Connections", "uptime": "Uptime", "sent": "Sent",
         "speed": "Upload speed", "received": "Received"}


class BadgeState(str, enum.Enum):
    """What the role badge says."""

    STARTING = "STARTING"
    NOT_RUNNING = "NOT RUNNING"
    STANDBY = "STANDBY"
    NO_CONTACT = "NO CONTACT WITH MAIN"
    ACTIVE = "ACTIVE"


BADGE_TONES = {BadgeState.STARTING: "idle", BadgeState.NOT_RUNNING: "error", BadgeState.STANDBY: "info",
               BadgeState.NO_CONTACT: "warn", BadgeState.ACTIVE: "ok"}


# Events ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupStarted:
    """The engine listens on ``address``, or could not start (``error``)."""

    address: str = ""
    error: str = ""


@dataclass(frozen=True)
class ActionFailed:
    """Promote now or Hand back failed: a readable line."""

    text: str


@dataclass(frozen=True)
class BackupSnapshot:
    """Everything the backup window shows, read off the Tk thread; ``taken_at`` is ``time.monotonic()``."""

    taken_at: float
    running: bool
    address: str = ""
    role: str = "standby"
    epoch: int = 0
    seconds_since_heartbeat: float = 0.0
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 6.0
    main_address: str = ""
    failback: str = "auto"
    handback_approved: bool = False
    handback_asked_age_s: float | None = None
    rows: list = field(default_factory=list)
    file_count: int = 0
    total_bytes: int = 0
    receiving: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    data_dir: str = ""


# Pure functions ---------------------------------------------------------------------------------------------


def badge_state(running: bool, role: str, seconds_since_heartbeat: float, heartbeat_interval_s: float,
                started: bool = True) -> BadgeState:
    """The badge for a role and the silence of the main."""
    if not running:
        return BadgeState.STARTING if not started else BadgeState.NOT_RUNNING
    if role == "active":
        return BadgeState.ACTIVE
    if seconds_since_heartbeat > heartbeat_interval_s + max(heartbeat_interval_s, NO_CONTACT_GRACE_S):
        return BadgeState.NO_CONTACT
    return BadgeState.STANDBY


def countdown(seconds_since_heartbeat: float, heartbeat_timeout_s: float) -> tuple[float, float]:
    """(seconds left before the backup takes over, the share of the timeout left, 0..1)."""
    left = max(0.0, heartbeat_timeout_s - seconds_since_heartbeat)
    return left, (left / heartbeat_timeout_s if heartbeat_timeout_s > 0 else 0.0)


def explanation(snapshot: BackupSnapshot, state: BadgeState, since: float) -> str:
    """The sentence under the badge: what the backup is doing and what comes next."""
    main = snapshot.main_address or "the main"
    if state is BadgeState.STANDBY:
        return (f"Receiving heartbeats from the main at {main}. Clients are sent to it; the replica follows it. "
                f"If the heartbeats stop for {snapshot.heartbeat_timeout_s:g} s, the backup takes over.")
    if state is BadgeState.NO_CONTACT:
        left, _ = countdown(since, snapshot.heartbeat_timeout_s)
        return (f"No heartbeat from the main at {main} for {since:.1f} s. "
                f"The backup takes over in {left:.1f} s unless it answers.")
    if state is BadgeState.ACTIVE:
        text = f"Serving clients with epoch {snapshot.epoch}."
        if snapshot.handback_approved:
            return text + " Hand-back approved: the main takes the role back once it has caught up."
        asked = snapshot.handback_asked_age_s
        if snapshot.failback == "manual" and asked is not None and asked < 3 * snapshot.heartbeat_timeout_s:
            return text + " The main is back and asks for its role: click Hand back to main when ready."
        if snapshot.failback == "manual":
            return text + " Failback is manual: when the main is back, hand the role back from here."
        return text + " The main takes the role back by itself when it returns (failback: auto)."
    if state is BadgeState.STARTING:
        return "Starting…"
    return "The backup is not running: see the message above."


def heartbeat_line(snapshot: BackupSnapshot, state: BadgeState, since: float) -> tuple[str, str, str]:
    """(last heartbeat, failover, failover's tone) as shown beside the badge.

    While heartbeats come the failover is only armed (the explanation says
    after how much silence it would happen) and the figure stays still. It counts down, in the warning
    tone, only once the main has gone quiet (NO CONTACT).
    """
    if state is BadgeState.ACTIVE:
        return age_text(since), "taken over", ""
    if state in (BadgeState.STARTING, BadgeState.NOT_RUNNING):
        return "—", "—", ""
    if state is BadgeState.STANDBY:
        return age_text(since), "armed", ""
    left, _ = countdown(since, snapshot.heartbeat_timeout_s)
    return age_text(since), f"in {left:.1f} s" if left > 0 else "now", "warn"


def promote_enabled(snapshot: BackupSnapshot | None) -> bool:
    """Promote now makes sense on a running standby backup."""
    return bool(snapshot and snapshot.running and snapshot.role == "standby")


def handback_enabled(snapshot: BackupSnapshot | None) -> bool:
    """Hand back to main: an active backup with manual failback whose operator has not approved yet."""
    return bool(snapshot and snapshot.running and snapshot.role == "active" and snapshot.failback == "manual"
                and not snapshot.handback_approved)


def replica_rows(entries: list[dict]) -> list[tuple[str, tuple, dict]]:
    """The replicated files table: (iid, shown values, raw sort keys)."""
    return [(entry["name"], *entry_row(entry, COLUMN_KEYS)) for entry in entries]


def receiving_line(receiving: list[dict], live: bool = True) -> tuple[str, float]:
    """(text, fraction done) of the files being replicated; ("", 1.0) when none is.

    ``live`` is False when the main is silent or this backup is active: the
    partial files then wait for the main to replicate again.
    """
    if not receiving:
        return "", 1.0
    chunks = sum(item["chunks"] for item in receiving)
    done = sum(item["chunks_done"] for item in receiving)
    first = receiving[0]
    more = f" and {len(receiving) - 1} more" if len(receiving) > 1 else ""
    size = sum(item["size"] for item in receiving)
    fraction = done / chunks if chunks else 1.0
    progress = f"{int(100 * fraction)}% ({done} of {chunks} chunks, {human_size(size)})"
    if not live:
        return f"Paused: {first['name']}{more} {progress} received; resumes when the main replicates again", fraction
    return f"Receiving {first['name']}{more} from the main: {progress}", fraction


def backup_tiles(snapshot: BackupSnapshot) -> dict[str, tuple[str, str, str]]:
    """The status strip: key -> (value, detail, tone)."""
    metrics = snapshot.metrics
    files = f"{snapshot.file_count} file{'s' if snapshot.file_count != 1 else ''}"
    return {
        "files": (files, human_size(snapshot.total_bytes), ""),
        "connections": (str(metrics.get("active_connections", 0)),
                        f"{metrics.get('connections_total', 0)} since start", ""),
        "uptime": (human_duration(metrics.get("uptime_s")) if snapshot.running else "—",
                   f"since {time.strftime('%H:%M', time.localtime(time.time() - metrics['uptime_s']))}"
                   if snapshot.running and "uptime_s" in metrics else "", ""),
        "sent": (human_size(metrics.get("bytes_sent", 0)), f"{metrics.get('requests_total', 0)} requests", ""),
        "speed": (f"{human_size(metrics.get('upload_bps', 0))}/s",
                  f"average {human_size(metrics.get('average_upload_bps', 0))}/s", ""),
        "received": (human_size(metrics.get("bytes_received", 0)), "", ""),
    }


def headline(snapshot: BackupSnapshot, state: BadgeState) -> tuple[str, str, bool]:
    """(text under the title, dot tone, pulsing): the dot breathes while the backup serves clients."""
    if not snapshot.running:
        return ("Starting…" if state is BadgeState.STARTING else "Not running"), BADGE_TONES[state], False
    text = f"Listening on {snapshot.address}  ·  main at {snapshot.main_address}"  # failback: in the explanation
    return text, BADGE_TONES[state], state is BadgeState.ACTIVE


# The controller ---------------------------------------------------------------------------------------------


class BackupController:
    """Starts the backup's engine and runs the operator's actions in worker threads; reports with events."""

    def __init__(self, engine: Any, post: Callable[[Any], None]) -> None:
        self.engine = engine
        self.post = post
        self.on_change: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._address = ""
        self._running = False
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        """Start listening and watching heartbeats (in a worker thread)."""
        self._spawn(self._start, "window-start")

    def promote(self) -> None:
        """Manual failover (in a worker thread: the new epoch is written to disk first)."""
        self._spawn(lambda: self._act(self.engine.promote_now, "could not promote the backup"), "window-promote")

    def approve_handback(self) -> None:
        """Let the main take the active role back (failback: manual)."""
        self._spawn(lambda: self._act(self.engine.approve_handback, "could not approve the hand-back"),
                    "window-handback")

    def _start(self) -> None:
        try:
            host, port = self.engine.start()
        except MiniTorrentError as error:
            log.error("could not start the backup server: %s", error)
            self.post(BackupStarted(error=str(error)))
            return
        with self._lock:
            self._address, self._running = f"{host}:{port}", True
        self.post(BackupStarted(f"{host}:{port}"))
        self.on_change()

    def _act(self, action: Callable[[], Any], failure: str) -> None:
        try:
            action()
        except Exception as error:
            log.exception(failure)
            self.post(ActionFailed(f"{failure}: {error}"))
        self.on_change()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self._lock:
            self._workers = [t for t in self._workers if t.is_alive()] + [thread]
        thread.start()

    def snapshot(self) -> BackupSnapshot:
        """What the window shows now; reads SQLite, so never call it on the Tk thread."""
        engine = self.engine
        with self._lock:
            running, address = self._running, self._address
        taken_at = time.monotonic()
        entries, _ = engine.catalog.list_files(limit=MAX_TABLE_ROWS)
        count, total_bytes = engine.catalog.count_files()
        main = engine.main_link()
        return BackupSnapshot(
            taken_at=taken_at, running=running, address=address, role=engine.node.role.value,
            epoch=engine.node.epoch, seconds_since_heartbeat=engine.seconds_since_heartbeat(),
            heartbeat_interval_s=engine.heartbeat_interval_s, heartbeat_timeout_s=engine.heartbeat_timeout_s,
            main_address=main["address"], failback=main["failback"],
            handback_approved=engine.receiver.handback_approved.is_set(),
            handback_asked_age_s=engine.seconds_since_handback_request(), rows=replica_rows(entries),
            file_count=count, total_bytes=total_bytes, receiving=engine.replication_in_progress(),
            metrics=engine.metrics.snapshot(top_files=0), data_dir=str(engine.catalog.data_dir))

    def close(self) -> None:
        """Wait for the workers, then stop the engine. Blocks: call it after the window is gone."""
        with self._lock:
            workers = list(self._workers)
        for thread in workers:
            thread.join(WORKER_JOIN_TIMEOUT_S)
        self.engine.stop()


# The window ----------------------------------------------------------------------------------------------------


class BackupWindow(ServerWindow):
    """The backup server's window. Build it on the Tk thread with an unstarted ``BackupServer``."""

    def __init__(self, root: tk.Tk, engine: Any, settings_file: Path | None = None, start: bool = True) -> None:
        super().__init__(root, "backup", settings_file)
        self.controller = BackupController(engine, self.pump.post)
        self.snapshot: BackupSnapshot | None = None
        self.badge_state = BadgeState.STARTING
        self._started = False
        self._build()
        self.open(self.controller.snapshot)
        self.controller.on_change = self.poller.poll_now
        self.every(COUNTDOWN_FRAME_MS, self._countdown_frame)
        if start:
            self.controller.start()

    def _build(self) -> None:
        self.promote_button = self.header.add_button("Promote now", self.promote_now, state="disabled")
        self.handback_button = self.header.add_button("Hand back to main", self.hand_back, state="disabled")
        self.header.show_identity(self.controller.engine.identity.id)  # the main pins it as server.backup.id
        ttk.Separator(self).grid(row=1, column=0, sticky="ew", pady=(10, 10))
        self._build_role_panel().grid(row=2, column=0, sticky="ew")
        ttk.Separator(self).grid(row=3, column=0, sticky="ew", pady=(10, 0))
        self.tiles = TileStrip(self, TILES)
        self.tiles.grid(row=4, column=0, sticky="ew", pady=2)
        ttk.Separator(self).grid(row=5, column=0, sticky="ew", pady=(0, 8))
        self.build_banner(row=6)
        self.receiving = ProgressStrip(self)
        self.receiving.place_at(row=7)
        self.build_panes(8, "Replicated files", COLUMNS,
                         "No files replicated yet: they arrive as the main shares them.")

    def _build_role_panel(self) -> ttk.Frame:
        panel = ttk.Frame(self)
        self.badge = Badge(panel)
        self.badge.configure(width=20)
        self.badge.grid(row=0, column=0, rowspan=3, sticky="nsw", padx=(0, 18))
        figures = ttk.Frame(panel)
        figures.grid(row=0, column=1, sticky="ew")
        self.figures: dict[str, ttk.Label] = {}
        for column, (key, caption) in enumerate((("heartbeat", "Last heartbeat"), ("failover", "Failover"),
                                                 ("epoch", "Epoch"))):
            ttk.Label(figures, text=caption.upper(), style="Caption.TLabel").grid(row=0, column=column, sticky="w")
            self.figures[key] = FittedLabel(figures, "—", style="Value.TLabel")
            self.figures[key].grid(row=1, column=column, sticky="ew", padx=(0, 12))
            figures.columnconfigure(column, weight=1, uniform="figure")
        self.countdown_bar = ttk.Progressbar(panel, mode="determinate", maximum=1.0, value=1.0)
        self.countdown_bar.grid(row=1, column=1, sticky="ew", pady=(6, 4))
        panel.rowconfigure(1, minsize=self.countdown_bar.winfo_reqheight() + 10)  # no jump when it shows
        self.explanation = ttk.Label(panel, text="", anchor="w", justify="left")
        self.explanation.grid(row=2, column=1, sticky="ew")
        self.explanation.bind("<Configure>", lambda e: self.explanation.configure(wraplength=max(200, e.width - 4)))
        panel.columnconfigure(1, weight=1)
        return panel

    # Actions (Tk thread) ------------------------------------------------------------------------------------

    def promote_now(self) -> None:
        """Manual failover, after a confirmation."""
        if not messagebox.askyesno(
                "Promote the backup now?",
                "The backup becomes ACTIVE with a new epoch and serves clients at once.\n\n"
                "If the main server is still running, it learns of the higher epoch, stops serving and "
                "catches up from the backup; this backup then keeps the role until you click Hand back to "
                "main, even with failback auto. Promote now?", parent=self.root):
            return
        self.promote_button.configure(state="disabled")
        self.controller.promote()

    def hand_back(self) -> None:
        """Let the main take the active role back (failback: manual)."""
        if not messagebox.askyesno(
                "Hand back to the main?",
                "The main server takes the active role back once it has fetched what changed here; "
                "this backup then returns to standby. Hand back now?", parent=self.root):
            return
        self.handback_button.configure(state="disabled")
        self.controller.approve_handback()

    def stop_engine(self) -> None:
        self.controller.close()

    # Drawing (Tk thread) ------------------------------------------------------------------------------------

    def handle(self, event: Any) -> None:
        if isinstance(event, BackupSnapshot):
            self._show_snapshot(event)
        elif isinstance(event, BackupStarted):
            self._started = True
            if event.error:
                self.show_error(f"The backup could not start: {event.error}")
            self.poller.poll_now()
        elif isinstance(event, ActionFailed):
            self.show_error(event.text)

    def _show_snapshot(self, snapshot: BackupSnapshot) -> None:
        self.snapshot = snapshot
        self.show_rows(snapshot.rows)
        self.tiles.show(backup_tiles(snapshot))
        live = badge_state(snapshot.running, snapshot.role, snapshot.seconds_since_heartbeat,
                           snapshot.heartbeat_interval_s, self._started) is BadgeState.STANDBY
        text, fraction = receiving_line(snapshot.receiving, live)
        if text:
            self.receiving.show(text, fraction)
        else:
            self.receiving.hide()
        shown = len(snapshot.rows)
        files = f"{snapshot.file_count} file{'s' if snapshot.file_count != 1 else ''}"
        more = f" (the first {shown} shown)" if shown < snapshot.file_count else ""
        self.status.configure(text=f"{files} replicated, {human_size(snapshot.total_bytes)}{more}  ·  "
                                   f"store: {snapshot.data_dir}")
        self.promote_button.configure(state="normal" if promote_enabled(snapshot) else "disabled")
        self.handback_button.configure(state="normal" if handback_enabled(snapshot) else "disabled")
        self._show_role()

    def _countdown_frame(self) -> None:
        """Advance the heartbeat age and the failover bar between snapshots (time arithmetic only)."""
        if self.snapshot is not None:
            self._show_role()

    def _show_role(self) -> None:
        snapshot = self.snapshot
        if snapshot is None:
            return
        since = snapshot.seconds_since_heartbeat
        if snapshot.running:
            since += time.monotonic() - snapshot.taken_at
        state = badge_state(snapshot.running, snapshot.role, since, snapshot.heartbeat_interval_s, self._started)
        self.badge_state = state
        self.badge.show(state.value, BADGE_TONES[state])
        heartbeat, failover, tone = heartbeat_line(snapshot, state, since)
        for key, text in (("heartbeat", heartbeat), ("failover", failover), ("epoch", str(snapshot.epoch))):
            style = f"{tone}.Value.TLabel" if key == "failover" and tone else "Value.TLabel"
            if (self.figures[key].full_text, str(self.figures[key].cget("style"))) != (text, style):
                self.figures[key].show(text, style=style)
        _, left = countdown(since, snapshot.heartbeat_timeout_s)
        if state is BadgeState.NO_CONTACT:  # the bar runs down only when a failover is really coming
            self.countdown_bar.configure(value=left)
            self.countdown_bar.grid()
        else:
            self.countdown_bar.grid_remove()
        self._set(self.explanation, explanation(snapshot, state, since))
        self.show_headline(*headline(snapshot, state))

    @staticmethod
    def _set(label: ttk.Label, text: str) -> None:
        if label.cget("text") != text:
            label.configure(text=text)


def run(engine: Any, root: tk.Tk, settings_file: Path | None) -> int:
    """Show the backup server's window until it is closed; the exit status."""
    return run_window(BackupWindow(root, engine, settings_file))
