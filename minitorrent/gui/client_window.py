"""The client window: connection, catalog, transfers, seeding, limits, log.

The window holds a ``ClientEngine`` and never waits on it. Four kinds of
thread feed it through one ``EventPump`` queue, drained on the Tk thread:

- the ``Poller`` asks the active server for its status (one try, no retries)
  and the seeder for its figures: a ``ClientSnapshot`` every second, or, when
  no server answers, after a growing delay that the window counts down;
- download threads (one per transfer, ``gui.transfers.TransferManager``) and
  the engine's ``on_progress`` callback post transfer events;
- short workers fetch the catalog, start the seeder, save settings, open a
  folder, and post what came of it;
- logging posts ``LogLine``s to the log tab.

The module's plain functions (filtering, row formatting, limit parsing, the
connection line) need no widget; the panels are small ``ttk.Frame``s with one
job each, composed by ``ClientWindow``.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import tkinter as tk
from dataclasses import dataclass
from pathlib import Path
from tkinter import filedialog, ttk
from tkinter import font as tkfont
from typing import TYPE_CHECKING, Any, Callable

from database import fold  # the server's search rule, so both filter alike
from error_handler import ConnectionFailed, MiniTorrentError
from minitorrent.common.units import human_size
from minitorrent.gui.base import (
    EventPump,
    LogLine,
    LogPane,
    Poller,
    QueueLogHandler,
    SortableTable,
    apply_theme,
    entry_row,
    load_settings,
    save_settings,
)
from minitorrent.gui.transfers import (
    Action,
    DownloadProgressed,
    Transfer,
    TransferEvent,
    TransferFailed,
    TransferFinished,
    TransferManager,
    TransferState,
    TransferStopped,
    TransferView,
    allowed_actions,
    transfer_view,
)
from minitorrent.gui.widgets import (
    TONES,
    Banner,
    PulseDot,
    TileStrip,
    background,
    current_theme,
    install_fonts_and_styles,
    theme_button_text,
)

if TYPE_CHECKING:
    from minitorrent.client.engine import ClientEngine

log = logging.getLogger(__name__)

TITLE = "MiniTorrent — Client"
GEOMETRY = "1280x820"
CONNECTED_POLL_S = 1.0  # status of the server in use, once a second: the indicator follows a failover quickly
RECONNECT_DELAYS_S = (1, 2, 3, 5)  # then every 5 s: no server answers, ask again with backoff
TICK_MS = 250  # countdown and speed refresh
REDRAW_MS = 100  # progress rows are redrawn at most this often, however many chunks arrive
WORKER_JOIN_S = 5.0  # closing waits this long for short workers
KIB = 1024
MAX_LIMIT_KIB = 10 * 1024 * 1024  # 10 GiB/s: anything above is a typo, not a limit
NAME_CHARS = 90  # a longer file name is shown shortened in the middle
DARK_TONES = {"ok": "#6ccb5f", "info": "#60b4ff", "warn": "#fcb04a", "error": "#ff99a4"}  # readable on #1c1c1c
OPEN_FOLDER_COMMAND = {"darwin": ["open"], "win32": ["explorer"]}.get(sys.platform, ["xdg-open"])
OPEN_FOLDER_WAIT_S = 5.0  # a file manager that fails says so quickly; one that works may keep running


# Plain functions (no widget) ------------------------------------------------------------------------------


def filter_entries(entries: list[dict], search: str) -> list[dict]:
    """The catalog entries whose name contains ``search`` (any case, any accent form); all if empty."""
    wanted = fold(search.strip())
    return [entry for entry in entries if wanted in fold(entry["name"])] if wanted else list(entries)


def catalog_row(entry: dict) -> tuple[tuple, dict]:
    """A catalog entry as table values (human units) and sort keys (raw numbers)."""
    return entry_row(entry, CATALOG_KEYS)


def count_text(shown: int, total: int) -> str:
    """``"3 of 12 files"``, or ``"12 files"`` when nothing is filtered out."""
    noun = "file" if total == 1 else "files"
    return f"{total} {noun}" if shown == total else f"{shown} of {total} {noun}"


def elide(text: str, limit: int = NAME_CHARS) -> str:
    """``text`` shortened in the middle with an ellipsis to at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def parse_limit_kib(text: str, what: str) -> int:
    """A limit typed in KiB/s as bytes/s; empty or 0 is unlimited.

    Raises ``ValueError`` with a message for the user (naming ``what``) when
    the text is not a number from 0 to ``MAX_LIMIT_KIB``.
    """
    cleaned = text.strip().replace(",", ".")
    if cleaned == "":
        return 0
    hint = f"{what}: enter a number of KiB/s from 0 to {MAX_LIMIT_KIB} (0 = unlimited), not {text.strip()!r}"
    try:
        kib = float(cleaned)
    except ValueError:
        raise ValueError(hint) from None
    if not 0 <= kib <= MAX_LIMIT_KIB:  # also refuses nan and inf
        raise ValueError(hint)
    return round(kib * KIB)


def format_limit_kib(rate_bps: int) -> str:
    """A limit in bytes/s as the KiB/s text its field shows (``"512"``, ``"0.5"``, ``"0"``)."""
    kib = rate_bps / KIB
    return str(int(kib)) if kib == int(kib) else f"{kib:.2f}".rstrip("0").rstrip(".")


def describe_limit(rate_bps: int) -> str:
    """``"512 KiB/s"`` or ``"unlimited"``."""
    return f"{format_limit_kib(rate_bps)} KiB/s" if rate_bps else "unlimited"


def reconnect_delay(failures: int) -> float:
    """Seconds before the next try after ``failures`` polls in a row found no server (>= 1)."""
    return float(RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S)) - 1])


@dataclass(frozen=True)
class ConnectionView:
    """What the connection indicator shows."""

    title: str
    detail: str
    tone: str  # "ok" (main), "warn" (the backup, after a failover), "error" (no server)
    connected: bool


def connection_view(status: dict | None, reason: str = "", next_try_s: float | None = None) -> ConnectionView:
    """The indicator for a status snapshot (server, role, epoch, address), or for no server at all."""
    if status is None:
        countdown = "trying now…" if next_try_s is None or next_try_s <= 0.05 else \
            f"next try in {max(1, round(next_try_s))} s"
        detail = f"{elide(reason, 110)} · {countdown}" if reason else countdown
        return ConnectionView("Reconnecting…", detail, "error", False)
    server = status.get("server") or "server"
    detail = f"{status.get('address', '')} · role {status.get('role', '?')} · epoch {status.get('epoch', '?')}"
    if server == "backup":
        return ConnectionView("Backup server (failover)", detail, "warn", True)
    return ConnectionView(f"{server.capitalize()} server", detail, "ok", True)


def server_changed(previous: dict | None, current: dict | None) -> bool:
    """True when a server answers now and it is not the one (or the epoch) of the previous snapshot."""
    if current is None:
        return False
    return previous is None or (previous.get("server"), previous.get("epoch")) != (current.get("server"),
                                                                                   current.get("epoch"))


def seeding_tiles(seeding: dict | None, enabled: bool, error: str = "") -> dict[str, tuple[str, str, str]]:
    """The seeding strip's tiles, (value, detail, tone) per key, from ``ClientEngine.seeding_status``.

    ``error`` is why the seeder could not start, if it could not.
    """
    if not enabled or seeding is None:
        off = ("off", "client.seeding is false", "idle") if not enabled else ("…", "", "idle")
        return {"status": off, "files": ("—", "", "idle"), "uploaded": ("—", "", "idle"),
                "peers": ("—", "", "idle")}
    if seeding["running"]:
        status = ("on", f"peers reach us at {seeding['address']}", "ok")
    else:
        status = ("failed", elide(error, 60), "error") if error else ("starting…", "", "info")
    whole = len(seeding["files"])
    partial = f"+ {seeding['partial']} in part" if seeding["partial"] else "whole files"
    speed = f"{human_size(seeding['upload_bps'])}/s now"
    limit = seeding["upload_limit_bps"]
    if limit:
        speed += f" · limit {describe_limit(limit)}"
    now = seeding["active_connections"]
    return {
        "status": status,
        "files": (str(whole), partial, ""),
        "uploaded": (human_size(seeding["bytes_sent"]), speed, ""),
        "peers": (str(seeding["connections_total"]), f"{now} connected now", ""),
    }


def transfers_summary(counts: dict[TransferState, int]) -> str:
    """``"2 downloading · 1 queued · 3 done"`` (states with none left out), or ``"no transfers"``."""
    order = [TransferState.DOWNLOADING, TransferState.QUEUED, TransferState.PAUSED, TransferState.FAILED,
             TransferState.DONE, TransferState.CANCELLED]
    parts = [f"{counts[state]} {state.value}" for state in order if counts.get(state)]
    return " · ".join(parts) if parts else "no transfers"


# Events the window's workers post --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSnapshot:
    """Event: the poller's look at the server in use and the seeder."""

    status: dict | None  # None: no server answered
    reason: str  # why not, when status is None
    seeding: dict | None
    next_poll_s: float
    taken_at: float


@dataclass(frozen=True)
class CatalogFetched:
    """Event: a catalog refresh ended, with the entries or a one-line error."""

    entries: list[dict] | None
    error: str = ""


@dataclass(frozen=True)
class Notice:
    """Event: something for the user to read in the status line (``tone``: ok, info, warn, error)."""

    text: str
    tone: str = "info"


@dataclass(frozen=True)
class SeedingFailed:
    """Event: the seeder could not start (downloads still work; peers cannot fetch from us)."""

    reason: str


@dataclass(frozen=True)
class UnfinishedFound:
    """Event: downloads an earlier run left unfinished (name, folder, size, verified bytes)."""

    downloads: list[tuple[str, Path, int, int]]


# Panels ----------------------------------------------------------------------------------------------------


class ConnectionBar(ttk.Frame):
    """Which server the client talks to (main or backup), its role and epoch; a countdown when none answers."""

    def __init__(self, master: tk.Misc, on_retry: Callable[[], None], on_theme: Callable[[], None]) -> None:
        super().__init__(master, padding=(14, 10, 14, 6))
        self.dot = PulseDot(self)
        self.title = ttk.Label(self, text="Connecting…", style="Title.TLabel")
        self.detail = ttk.Label(self, text="asking the configured servers", style="Subtitle.TLabel")
        self.retry_button = ttk.Button(self, text="Retry now", command=on_retry)
        self.theme_button = ttk.Button(self, command=on_theme, width=9)
        self.dot.grid(row=0, column=0, rowspan=2, padx=(0, 10))
        self.title.grid(row=0, column=1, sticky="w")
        self.detail.grid(row=1, column=1, sticky="w")
        self.retry_button.grid(row=0, column=2, rowspan=2, padx=8)
        self.retry_button.grid_remove()
        self.theme_button.grid(row=0, column=3, rowspan=2, sticky="e")
        self.columnconfigure(1, weight=1)
        self.view: ConnectionView | None = None

    def show(self, view: ConnectionView) -> None:
        """Display ``view``."""
        self.view = view
        self.title.configure(text=view.title)
        self.detail.configure(text=view.detail)
        self.dot.show(view.tone, pulsing=view.connected)
        if view.connected:
            self.retry_button.grid_remove()
        else:
            self.retry_button.grid()


CATALOG_COLUMNS = [("name", "Name", 360, "w"), ("size", "Size", 100, "e"), ("chunks", "Chunks", 80, "e"),
                   ("downloads", "Downloads", 100, "e"), ("sha256", "SHA-256", 140, "w")]
CATALOG_KEYS = [key for key, *_ in CATALOG_COLUMNS]
SEEDED_COLUMNS = [("name", "Seeded file", 300, "w"), ("size", "Size", 100, "e"), ("sha256", "SHA-256", 140, "w")]


class CatalogPanel(ttk.Frame):
    """The shared files: a search box that filters as you type, a sortable multi-select table."""

    def __init__(self, master: tk.Misc, on_refresh: Callable[[], None], on_download: Callable[[], None]) -> None:
        super().__init__(master, padding=(14, 4, 14, 8))
        bar = ttk.Frame(self)
        bar.grid(row=0, column=0, sticky="ew", pady=(0, 6))
        ttk.Label(bar, text="Catalog", style="Value.TLabel").pack(side="left", padx=(0, 14))
        self.search_var = tk.StringVar(self)
        ttk.Label(bar, text="Search", style="Subtitle.TLabel").pack(side="left", padx=(0, 6))
        self.search = ttk.Entry(bar, textvariable=self.search_var, width=28)
        self.search.pack(side="left")
        self.refresh_button = ttk.Button(bar, text="Refresh", command=on_refresh)  # F5
        self.refresh_button.pack(side="left", padx=(8, 0))
        self.count = ttk.Label(bar, text="", style="Subtitle.TLabel")
        self.count.pack(side="left", padx=12)
        self.download_button = ttk.Button(bar, text="Download Selected", style="Accent.TButton",
                                          command=on_download)
        self.download_button.pack(side="right")
        self.table = SortableTable(self, CATALOG_COLUMNS, height=6)
        self.table.grid(row=1, column=0, sticky="nsew")
        self.columnconfigure(0, weight=1)
        self.rowconfigure(1, weight=1)
        self.entries: list[dict] = []
        self._names: dict[str, str] = {}  # iid -> file name (names are never used as Tk item ids)
        self._iids: dict[str, str] = {}
        self.search_var.trace_add("write", lambda *_: self.apply_filter())
        self.search.bind("<Return>", lambda _e: on_refresh())
        self.search.bind("<KP_Enter>", lambda _e: on_refresh())
        self.search.bind("<Escape>", lambda _e: self.search_var.set(""))
        self.table.tree.bind("<Control-a>", self._select_all)
        self.table.tree.bind("<Control-A>", self._select_all)
        self.table.tree.bind("<Return>", lambda _e: on_download())
        self.table.tree.bind("<Double-1>", lambda _e: on_download())
        self.table.tree.bind("<<TreeviewSelect>>", lambda _e: self._update_button())
        self._update_button()

    def set_entries(self, entries: list[dict]) -> None:
        """Show a freshly fetched catalog (filtered by the search box, selection kept)."""
        self.entries = entries
        self.apply_filter()

    def apply_filter(self) -> None:
        """Show the entries matching the search box."""
        shown = filter_entries(self.entries, self.search_var.get())
        rows = []
        for entry in shown:
            iid = self._iids.get(entry["name"])
            if iid is None:
                iid = self._iids[entry["name"]] = f"f{len(self._iids) + 1}"
                self._names[iid] = entry["name"]
            values, keys = catalog_row(entry)
            rows.append((iid, values, keys))
        self.table.set_rows(rows)
        self.count.configure(text=count_text(len(shown), len(self.entries)))
        self._update_button()

    def selected_entries(self) -> list[dict]:
        """The selected catalog entries, in table order."""
        by_name = {entry["name"]: entry for entry in self.entries}
        order = self.table.tree.get_children()
        chosen = [iid for iid in order if iid in set(self.table.selected())]
        return [by_name[self._names[iid]] for iid in chosen if self._names[iid] in by_name]

    def iid_of(self, name: str) -> str:
        """The table row id showing ``name`` (for tests and selection)."""
        return self._iids[name]

    def visible_names(self) -> list[str]:
        """The names shown now, in table order."""
        return [self._names[iid] for iid in self.table.tree.get_children()]

    def _select_all(self, _event: Any = None) -> str:
        self.table.select_all()
        self._update_button()
        return "break"

    def _update_button(self) -> None:
        count = len(self.table.selected())
        self.download_button.configure(text=f"Download Selected ({count})" if count > 1 else "Download Selected")


TONE_STYLES = {"active": "info.State.TLabel", "ok": "ok.State.TLabel", "error": "error.State.TLabel",
               "muted": "idle.State.TLabel"}


class TransferRow(ttk.Frame):
    """One transfer: name, state, percent, a progress bar, sizes/speed/ETA/sources, and its buttons."""

    def __init__(self, master: tk.Misc, tid: int, name: str, on_action: Callable[[int, str], None]) -> None:
        super().__init__(master, padding=(12, 8, 12, 8))
        self.tid = tid
        self.name_label = ttk.Label(self, text=elide(name), style="Strong.TLabel", width=1)
        self.state_label = ttk.Label(self, text="", style="idle.State.TLabel")
        self.percent_label = ttk.Label(self, text="0.0%", style="Strong.TLabel", width=7, anchor="e")
        self.bar = ttk.Progressbar(self, orient="horizontal", mode="determinate", maximum=100.0)
        self.detail_label = ttk.Label(self, text="", style="Caption.TLabel", width=1)
        self.detail_label.bind("<Configure>", lambda e: self.detail_label.configure(wraplength=max(100, e.width)))
        buttons = ttk.Frame(self)
        self.pause_button = ttk.Button(buttons, text="Pause", width=7, command=lambda: on_action(tid, "pause"))
        self.resume_button = ttk.Button(buttons, text="Resume", width=7, command=lambda: on_action(tid, "resume"))
        self.cancel_button = ttk.Button(buttons, text="Cancel", width=7, command=lambda: on_action(tid, "cancel"))
        self.open_button = ttk.Button(buttons, text="Open folder", command=lambda: on_action(tid, "open"))
        for column, button in ((0, self.pause_button), (0, self.resume_button), (1, self.cancel_button),
                               (2, self.open_button)):  # Pause and Resume share a place: one shows at a time
            button.grid(row=0, column=column, padx=(6, 0), sticky="ew")
        self.name_label.grid(row=0, column=0, sticky="ew")
        self.state_label.grid(row=0, column=1, sticky="e", padx=(10, 0))
        self.percent_label.grid(row=0, column=2, sticky="e")
        self.bar.grid(row=1, column=0, columnspan=3, sticky="ew", pady=(4, 3))
        self.detail_label.grid(row=2, column=0, columnspan=3, sticky="ew")
        buttons.grid(row=0, column=3, rowspan=3, padx=(16, 0), sticky="e")
        buttons.update_idletasks()  # the width with every place filled: rows keep it, so their bars line up
        self.columnconfigure(3, minsize=buttons.winfo_reqwidth() + 16)
        self.columnconfigure(0, weight=1)
        self.view: TransferView | None = None

    def show(self, view: TransferView, state: TransferState) -> None:
        """Display ``view``; enable the buttons that make sense in ``state``."""
        if view == self.view:
            return
        self.view = view
        self.state_label.configure(text=view.state_text, style=TONE_STYLES[view.tone])
        self.percent_label.configure(text=view.percent_text)
        self.bar.configure(value=view.percent)
        self.detail_label.configure(text=view.detail)
        allowed = allowed_actions(state)
        for button, action in ((self.pause_button, Action.PAUSE), (self.resume_button, Action.RESUME),
                               (self.cancel_button, Action.CANCEL)):
            if action in allowed:  # only the buttons that can act are shown: a finished row keeps Open folder
                button.grid()
            else:
                button.grid_remove()


class TransferList(ttk.Frame):
    """The transfers, newest last, in a scrolling list; Pause all, Resume all, Clear finished."""

    def __init__(self, master: tk.Misc, on_action: Callable[[int, str], None],
                 on_bulk: Callable[[str], None]) -> None:
        super().__init__(master, padding=(0, 6, 0, 0))
        bar = ttk.Frame(self, padding=(12, 0, 12, 6))
        bar.grid(row=0, column=0, columnspan=2, sticky="ew")
        self.summary = ttk.Label(bar, text="no transfers", style="Subtitle.TLabel")
        self.summary.pack(side="left")
        self.clear_button = ttk.Button(bar, text="Clear finished", command=lambda: on_bulk("clear"))
        self.clear_button.pack(side="right")
        self.resume_all_button = ttk.Button(bar, text="Resume all", command=lambda: on_bulk("resume"))
        self.resume_all_button.pack(side="right", padx=6)
        self.pause_all_button = ttk.Button(bar, text="Pause all", command=lambda: on_bulk("pause"))
        self.pause_all_button.pack(side="right")
        self.canvas = tk.Canvas(self, highlightthickness=0, borderwidth=0, height=180)
        self.scroll = ttk.Scrollbar(self, orient="vertical", command=self.canvas.yview)
        self.canvas.configure(yscrollcommand=self.scroll.set)
        self.inner = ttk.Frame(self.canvas)
        self._window = self.canvas.create_window(0, 0, window=self.inner, anchor="nw")
        self.canvas.grid(row=1, column=0, sticky="nsew")
        self.scroll.grid(row=1, column=1, sticky="ns")
        self.columnconfigure(0, weight=1)
        self.rowconfigure(1, weight=1)
        self.inner.columnconfigure(0, weight=1)
        self.empty = ttk.Label(self.inner, style="Subtitle.TLabel", padding=(12, 16),
                               text="No downloads yet. Select files in the catalog and click Download Selected.")
        self.empty.grid(row=0, column=0, sticky="w")
        self.rows: dict[int, TransferRow] = {}
        self._separators: dict[int, ttk.Separator] = {}
        self._on_action = on_action
        self.inner.bind("<Configure>", lambda _e: self.canvas.configure(scrollregion=self.canvas.bbox("all")))
        self.canvas.bind("<Configure>", lambda e: self.canvas.itemconfigure(self._window, width=e.width))
        self.canvas.bind("<Enter>", lambda _e: self._wheel(True))
        self.canvas.bind("<Leave>", lambda _e: self._wheel(False))
        self.refresh_theme()

    def refresh_theme(self) -> None:
        """Match the canvas to the theme's background."""
        self.canvas.configure(background=background(self))

    def add(self, transfer: Transfer) -> TransferRow:
        """A row for a new transfer, at the bottom; scrolled into view."""
        self.empty.grid_remove()
        row = self.rows[transfer.tid] = TransferRow(self.inner, transfer.tid, transfer.name, self._on_action)
        separator = self._separators[transfer.tid] = ttk.Separator(self.inner, orient="horizontal")
        index = 2 * transfer.tid
        separator.grid(row=index, column=0, sticky="ew", padx=12)
        row.grid(row=index + 1, column=0, sticky="ew")
        self.canvas.after_idle(lambda: self.canvas.yview_moveto(1.0))
        return row

    def remove(self, tid: int) -> None:
        """Drop a transfer's row."""
        row = self.rows.pop(tid, None)
        if row is not None:
            row.destroy()
            self._separators.pop(tid).destroy()
        if not self.rows:
            self.empty.grid()

    def _wheel(self, bound: bool) -> None:
        events = ("<MouseWheel>", "<Button-4>", "<Button-5>")
        for event in events:
            if bound:
                self.canvas.bind_all(event, self._on_wheel)
            else:
                self.canvas.unbind_all(event)

    def _on_wheel(self, event: tk.Event) -> None:
        if self.canvas.yview() == (0.0, 1.0):
            return
        step = -1 if getattr(event, "num", 0) == 4 or getattr(event, "delta", 0) > 0 else 1
        self.canvas.yview_scroll(step * 2, "units")


class SeedingPanel(ttk.Frame):
    """Seeding figures, the files seeded, and the upload/download limits (editable, validated)."""

    def __init__(self, master: tk.Misc, seeding_enabled: bool, on_apply: Callable[[], None]) -> None:
        super().__init__(master, padding=(12, 10, 12, 8))
        self.strip = TileStrip(self, {"status": "Seeding", "files": "Files seeded", "uploaded": "Uploaded",
                                      "peers": "Peers served"})
        self.strip.grid(row=0, column=0, columnspan=2, sticky="ew", pady=(0, 8))
        self.files = SortableTable(self, SEEDED_COLUMNS, height=4)
        self.files.grid(row=1, column=0, sticky="nsew", padx=(0, 14))
        limits = ttk.LabelFrame(self, text="Speed limits", padding=(12, 8))
        limits.grid(row=1, column=1, sticky="nsew")
        self.upload_var = tk.StringVar(self)
        self.download_var = tk.StringVar(self)
        self.upload_box = self._limit_field(limits, 0, "Upload", self.upload_var, on_apply)
        self.download_box = self._limit_field(limits, 1, "Download", self.download_var, on_apply)
        ttk.Label(limits, text="0 = unlimited", style="Caption.TLabel").grid(row=2, column=1, columnspan=2,
                                                                          sticky="w")
        self.apply_button = ttk.Button(limits, text="Apply", command=on_apply)
        self.apply_button.grid(row=3, column=1, sticky="w", pady=(6, 0))
        self.message = ttk.Label(limits, text="", style="Caption.TLabel", wraplength=260, justify="left")
        self.message.grid(row=4, column=0, columnspan=3, sticky="w", pady=(6, 0))
        if not seeding_enabled:
            self.upload_box.state(["disabled"])
        self.columnconfigure(0, weight=1)
        self.rowconfigure(1, weight=1)

    @staticmethod
    def _limit_field(master: tk.Misc, row: int, label: str, variable: tk.StringVar,
                     on_apply: Callable[[], None]) -> ttk.Spinbox:
        ttk.Label(master, text=label).grid(row=row, column=0, sticky="w", padx=(0, 8), pady=2)
        box = ttk.Spinbox(master, from_=0, to=MAX_LIMIT_KIB, increment=64, textvariable=variable, width=10)
        box.grid(row=row, column=1, sticky="w", pady=2)
        ttk.Label(master, text="KiB/s").grid(row=row, column=2, sticky="w", padx=(6, 0))
        box.bind("<Return>", lambda _e: on_apply())
        return box

    def show(self, seeding: dict | None, enabled: bool, error: str = "") -> None:
        """Display the seeder's figures and files (``error``: why it could not start)."""
        self.strip.show(seeding_tiles(seeding, enabled, error))
        files = seeding["files"] if seeding else []
        keys = [key for key, *_ in SEEDED_COLUMNS]
        self.files.set_rows([(f"s{index}", *entry_row(entry, keys)) for index, entry in enumerate(files)])

    def say(self, text: str, tone: str) -> None:
        """A message under the limits (``tone`` ok or error)."""
        self.message.configure(text=text, style=f"{tone}.Message.TLabel")


# The window ------------------------------------------------------------------------------------------------


class ClientWindow:
    """The client's window over a ``ClientEngine``. Built and used on the Tk thread only.

    ``close()`` (also the window manager's close button) stops the pump, the
    poller and every download (a pause: they resume next time), waits for
    the threads, closes the engine and destroys the root.
    """

    def __init__(self, root: tk.Tk, engine: ClientEngine, settings_file: Path | None = None,
                 max_active: int | None = None) -> None:
        self.root = root
        self.engine = engine
        self.config = engine.config
        self.settings_file = settings_file or self.config.client.data_dir / "window.json"
        self.settings = load_settings(self.settings_file)
        self.theme = current_theme(root)
        self.seeding_enabled = engine.seeder is not None
        self.pump = EventPump(root, self._handle)
        self.manager = TransferManager(engine.download, engine.discard_partial, self.pump.post,
                                       **({"max_active": max_active} if max_active else {}))
        engine.on_progress = lambda progress: self.pump.post(DownloadProgressed(time.monotonic(), progress))
        self.poller = Poller(self._snapshot, self.pump.post, interval_s=CONNECTED_POLL_S)
        self.status: dict | None = None
        self.seeding: dict | None = None
        self.seeding_error = ""
        self._failures = 0  # polls in a row that found no server (poller thread only)
        self._next_poll_at: float | None = None
        self._last_snapshot: ClientSnapshot | None = None
        self._workers: list[threading.Thread] = []
        self._settings_lock = threading.Lock()
        self._refreshing = False
        self._refresh_again = False
        self._dirty: set[int] = set()
        self._redraw_id: str | None = None
        self._tick_id: str | None = None
        self._closed = False
        self._build()
        self._log_handler = QueueLogHandler(self.pump.post)
        logging.getLogger().addHandler(self._log_handler)
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.report_callback_exception = self._report_callback_exception
        self.pump.start()
        self.poller.start()
        self._tick_id = root.after(TICK_MS, self._tick)
        self._in_background(self._find_unfinished, "unfinished")
        self._in_background(self._make_download_dir, "download-dir")
        if self.seeding_enabled:
            self._in_background(self._start_seeding, "seed-start")

    # Layout -----------------------------------------------------------------------------------------------

    def _build(self) -> None:
        root = self.root
        root.title(TITLE)
        install_fonts_and_styles(root)
        self._configure_styles()
        frame = ttk.Frame(root)
        frame.pack(fill="both", expand=True)
        frame.columnconfigure(0, weight=1)
        frame.rowconfigure(3, weight=1)
        self.connection = ConnectionBar(frame, self.retry_now, self.toggle_theme)
        self.connection.grid(row=0, column=0, sticky="ew")
        self.connection.theme_button.configure(text=theme_button_text(self.theme))
        self.banner = Banner(frame)
        self.banner.grid(row=1, column=0, sticky="ew", padx=14, pady=(0, 6))
        self.banner.hide()
        ttk.Separator(frame, orient="horizontal").grid(row=2, column=0, sticky="ew")
        panes = ttk.PanedWindow(frame, orient="vertical")
        panes.grid(row=3, column=0, sticky="nsew")
        self.catalog = CatalogPanel(panes, self.refresh_catalog, self.download_selected)
        self.tabs = ttk.Notebook(panes, padding=(10, 0, 10, 0))
        panes.add(self.catalog, weight=1)
        panes.add(self.tabs, weight=2)
        self.transfers = TransferList(self.tabs, self.transfer_action, self.bulk_action)
        self.seeding_panel = SeedingPanel(self.tabs, self.seeding_enabled, self.apply_limits)
        self.log_pane = LogPane(self.tabs, height=6)
        self.tabs.add(self.transfers, text="Transfers")
        self.tabs.add(self.seeding_panel, text="Seeding & limits")
        self.tabs.add(self.log_pane, text="Log")
        self.status_line = ttk.Label(frame, text="Ready.", style="Caption.TLabel", padding=(14, 4, 14, 6))
        self.status_line.grid(row=4, column=0, sticky="ew")
        self.seeding_panel.upload_var.set(format_limit_kib(self._upload_limit()))
        self.seeding_panel.download_var.set(format_limit_kib(self.engine.download_limit.rate_bps))
        self.seeding_panel.show(None, self.seeding_enabled)
        self.catalog.search.focus_set()
        root.bind("<Control-f>", lambda _e: self.catalog.search.focus_set())
        root.bind("<F5>", lambda _e: self.refresh_catalog())

    def _configure_styles(self) -> None:
        """This window's styles (ttk styles belong to a theme: set again after a theme change)."""
        if "MTStrong" not in tkfont.names(self.root):
            body = tkfont.nametofont("MTBody", self.root).actual()
            # held by the window: a tkinter Font deletes its named font when it is garbage collected
            self._strong_font = tkfont.Font(self.root, name="MTStrong", family=body["family"], size=body["size"],
                                            weight="bold")
        style = ttk.Style(self.root)
        style.configure("Strong.TLabel", font="MTStrong")
        caption = style.lookup("Caption.TLabel", "foreground")
        lifted = DARK_TONES if self.theme == "dark" else {}
        for tone, colour in TONES.items():
            colour = lifted.get(tone, colour)
            style.configure(f"{tone}.State.TLabel", font="MTStrong", foreground=caption if tone == "idle" else colour)
            style.configure(f"{tone}.Message.TLabel", font="MTCaption", foreground=colour)

    def _upload_limit(self) -> int:
        return self.engine.seeder.upload_limit.rate_bps if self.engine.seeder else 0

    # Events (Tk thread) -----------------------------------------------------------------------------------

    def _handle(self, event: Any) -> None:
        if isinstance(event, (DownloadProgressed, TransferFinished, TransferFailed, TransferStopped)):
            self._on_transfer_event(event)
        elif isinstance(event, ClientSnapshot):
            self._on_snapshot(event)
        elif isinstance(event, CatalogFetched):
            self._on_catalog(event)
        elif isinstance(event, LogLine):
            self.log_pane.append(event)
        elif isinstance(event, Notice):
            self.notify(event.text, event.tone)
        elif isinstance(event, UnfinishedFound):
            self._on_unfinished(event)
        elif isinstance(event, SeedingFailed):
            self.seeding_error = event.reason
            self.notify(f"seeding could not start: {event.reason}", "error")
        elif isinstance(event, BaseException):  # a snapshot that raised: a bug, but the window carries on
            self.notify(f"could not read the client's state: {event}", "error")

    def _on_transfer_event(self, event: TransferEvent) -> None:
        transfer = self.manager.handle(event)
        if transfer is None:
            return
        if isinstance(event, DownloadProgressed):
            self._dirty.add(transfer.tid)
            if self._redraw_id is None:
                self._redraw_id = self.root.after(REDRAW_MS, self._redraw_dirty)
            return
        self._redraw_all()
        if isinstance(event, TransferFinished):
            self.notify(f"{transfer.name}: downloaded and verified ({human_size(event.result.size)}) "
                        f"into {transfer.folder}", "ok")
            self.refresh_catalog(quiet=True)  # its download count went up
        elif isinstance(event, TransferFailed):
            if self.status is None:  # no server answers: most likely why; try again when one does
                transfer.resume_on_reconnect = True
                self.notify(f"{transfer.name}: {transfer.reason}; it resumes when a server answers", "warn")
            else:
                self.notify(f"{transfer.name}: {transfer.reason}", "error")

    def _on_snapshot(self, snapshot: ClientSnapshot) -> None:
        previous, current = self.status, snapshot.status
        first = self._last_snapshot is None  # the indicator says it; the status line keeps older news
        self._last_snapshot = snapshot
        self.status = current
        self._next_poll_at = time.monotonic() + snapshot.next_poll_s
        self._show_connection()
        if server_changed(previous, current):
            if not first:
                self.notify(f"connected to the {current.get('server', '')} server at {current.get('address', '')} "
                            f"(epoch {current.get('epoch', '?')})", "ok")
            self.refresh_catalog(quiet=True)
            if self.manager.resume_after_outage():
                self._redraw_all()
        elif current is None and previous is not None:
            self.notify("lost the server; downloads wait and resume when a server answers", "warn")
        self.seeding = snapshot.seeding
        self.seeding_panel.show(snapshot.seeding, self.seeding_enabled, self.seeding_error)

    def _on_catalog(self, event: CatalogFetched) -> None:
        self._refreshing = False
        if event.entries is not None:
            self.catalog.set_entries(event.entries)
            if self.status_line.cget("text").startswith("Refreshing"):
                self.notify(f"catalog refreshed: {count_text(len(event.entries), len(event.entries))}")
        else:
            self.notify(f"could not refresh the catalog: {event.error}", "error")
        if self._refresh_again:
            self._refresh_again = False
            self.refresh_catalog(quiet=True)

    def _on_unfinished(self, event: UnfinishedFound) -> None:
        added = 0
        for name, folder, size, done in event.downloads:
            transfer = self.manager.add_paused(name, folder, size, done)
            if transfer is not None:
                self.transfers.add(transfer)
                added += 1
        if added:
            self._redraw_all()
            self.notify(f"{added} unfinished download{'s' if added > 1 else ''} from last time: "
                        "paused, press Resume to continue", "info")

    def notify(self, text: str, tone: str = "info") -> None:
        """Show ``text`` in the status line; an error also in the banner at the top."""
        stamp = time.strftime("%H:%M:%S")
        self.status_line.configure(text=f"{stamp}  {text}", style=f"{tone}.Message.TLabel" if tone in TONES
                                   else "Caption.TLabel")
        if tone == "error":
            self.banner.show(text, "error")

    def _report_callback_exception(self, kind: type, error: BaseException, tb: Any) -> None:
        log.error("unexpected error in the window", exc_info=(kind, error, tb))
        self.notify(f"unexpected error: {error!r} (details in the Log tab)", "error")

    # Drawing ----------------------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._tick_id = self.root.after(TICK_MS, self._tick)
        if self.status is None and self._last_snapshot is not None:
            self._show_connection()
        for transfer in self.manager.transfers.values():
            if transfer.state is TransferState.DOWNLOADING:
                self._dirty.add(transfer.tid)
        self._redraw_rows(self._dirty)
        self._dirty.clear()

    def _show_connection(self) -> None:
        snapshot = self._last_snapshot
        if snapshot is None:
            return
        next_try = None if self._next_poll_at is None else self._next_poll_at - time.monotonic()
        self.connection.show(connection_view(snapshot.status, snapshot.reason, next_try))

    def _redraw_dirty(self) -> None:
        self._redraw_id = None
        self._redraw_rows(self._dirty)
        self._dirty.clear()

    def _redraw_all(self) -> None:
        self._redraw_rows(set(self.manager.transfers))

    def _redraw_rows(self, tids: set[int]) -> None:
        server = (self.status or {}).get("server", "")
        for tid in tids:
            transfer = self.manager.transfers.get(tid)
            row = self.transfers.rows.get(tid)
            if transfer is not None and row is not None:
                speed = self.manager.speed(transfer)
                row.show(transfer_view(transfer, speed, server, self.manager.max_active), transfer.state)
        self.transfers.summary.configure(text=transfers_summary(self.manager.counts()))

    # User actions -----------------------------------------------------------------------------------------

    def refresh_catalog(self, quiet: bool = False) -> None:
        """Fetch the catalog in a worker (one refresh at a time; a second request runs after it)."""
        if self._closed:
            return
        if self._refreshing:
            self._refresh_again = True
            return
        self._refreshing = True
        if not quiet:
            self.notify("Refreshing the catalog…")
        self._in_background(self._fetch_catalog, "catalog")

    def download_selected(self) -> None:
        """Ask for a folder and queue a transfer for each selected file."""
        entries = self.catalog.selected_entries()
        if not entries:
            self.notify("Select one or more files in the catalog first (Ctrl+A selects all).", "warn")
            return
        folder = filedialog.askdirectory(parent=self.root, title="Download into folder",
                                         initialdir=str(self.config.client.download_dir), mustexist=False)
        if not folder:
            return
        added, skipped = [], []
        for entry in entries:
            transfer = self.manager.add(entry["name"], Path(folder), entry["size"])
            if transfer is None:
                skipped.append(entry["name"])
                continue
            self.transfers.add(transfer)
            added.append(transfer)
        self._redraw_all()
        self.tabs.select(self.transfers)
        message = f"downloading {len(added)} file{'s' if len(added) != 1 else ''} into {folder}"
        if skipped:
            message += f"; already in the list: {', '.join(elide(n, 40) for n in skipped)}"
        self.notify(message, "warn" if skipped else "info")

    def transfer_action(self, tid: int, action: str) -> None:
        """A row's button: pause, resume, cancel, open (the folder)."""
        transfer = self.manager.transfers.get(tid)
        if transfer is None:
            return
        if action == "open":
            self.open_folder(transfer.folder)
            return
        done = {"pause": self.manager.pause, "resume": self.manager.resume, "cancel": self.manager.cancel}[action](tid)
        if not done:
            self.notify(f"{transfer.name}: cannot {action} a transfer that is {transfer.state.value}", "warn")
        self._redraw_all()

    def bulk_action(self, action: str) -> None:
        """Pause all, Resume all, Clear finished."""
        if action == "clear":
            for tid in self.manager.clear_finished():
                self.transfers.remove(tid)
        else:
            act = self.manager.pause if action == "pause" else self.manager.resume
            wanted = Action.PAUSE if action == "pause" else Action.RESUME
            for tid, transfer in list(self.manager.transfers.items()):
                if wanted in allowed_actions(transfer.state):
                    act(tid)
        self._redraw_all()

    def open_folder(self, folder: Path) -> None:
        """Open ``folder`` in the file manager (in a worker; a failure is shown here)."""
        self._in_background(lambda: self._run_opener(folder), "open-folder", join=False)

    def apply_limits(self) -> None:
        """Validate both limit fields, then apply them; a bad value changes nothing."""
        panel = self.seeding_panel
        try:
            upload = parse_limit_kib(panel.upload_var.get(), "Upload limit") if self.seeding_enabled else 0
            download = parse_limit_kib(panel.download_var.get(), "Download limit")
        except ValueError as error:
            panel.say(str(error), "error")
            self.notify(str(error), "error")
            return
        self.engine.set_limits(upload, download)
        panel.upload_var.set(format_limit_kib(upload))
        panel.download_var.set(format_limit_kib(download))
        text = (f"Limits applied: upload {describe_limit(upload) if self.seeding_enabled else 'n/a (not seeding)'}"
                f", download {describe_limit(download)}.")
        panel.say(text, "ok")
        self.notify(text, "ok")

    def toggle_theme(self) -> None:
        """Switch between the light and the dark theme and remember the choice."""
        self.set_theme("light" if self.theme == "dark" else "dark")

    def set_theme(self, theme: str) -> None:
        """Use ``theme`` ("light" or "dark") now and in later runs."""
        self.theme = apply_theme(self.root, theme)
        install_fonts_and_styles(self.root)
        self._configure_styles()
        self.connection.dot.refresh_theme()
        self.connection.theme_button.configure(text=theme_button_text(self.theme))
        self.transfers.refresh_theme()
        for row in self.transfers.rows.values():
            row.view = None
        self._redraw_all()
        self.settings["theme"] = self.theme
        settings = dict(self.settings)
        self._in_background(lambda: self._save_settings(settings), "settings")

    def retry_now(self) -> None:
        """Ask the servers again at once (the Retry now button)."""
        self._next_poll_at = None
        self.poller.poll_now()

    # Workers (never touch a widget; they post) ------------------------------------------------------------

    def _in_background(self, work: Callable[[], None], name: str, join: bool = True) -> None:
        thread = threading.Thread(target=self._guarded, args=(work, name), name=f"client-{name}", daemon=True)
        if join:
            self._workers = [t for t in self._workers if t.is_alive()] + [thread]
        thread.start()

    def _guarded(self, work: Callable[[], None], name: str) -> None:
        try:
            work()
        except MiniTorrentError as error:
            self.pump.post(Notice(str(error), "error"))
        except Exception as error:  # a bug: readable here, the traceback in the log
            log.exception("background task %s failed", name)
            self.pump.post(Notice(f"{name} failed unexpectedly: {error!r}", "error"))

    def _snapshot(self) -> ClientSnapshot:
        """The poller's work (poller thread): one status try, the seeder's figures, when to ask next."""
        status, reason = None, ""
        try:
            status = self.engine.probe_status()
        except ConnectionFailed as error:
            reason = str(error)
        except MiniTorrentError as error:
            reason = f"the server answered with an error: {error}"
        self._failures = 0 if status is not None else self._failures + 1
        next_poll_s = CONNECTED_POLL_S if status is not None else reconnect_delay(self._failures)
        self.poller.set_interval(next_poll_s)
        return ClientSnapshot(status, reason, self.engine.seeding_status(), next_poll_s, time.monotonic())

    def _fetch_catalog(self) -> None:
        try:
            entries = self.engine.list_files("")
        except MiniTorrentError as error:
            self.pump.post(CatalogFetched(None, str(error)))
        else:
            self.pump.post(CatalogFetched(entries))

    def _start_seeding(self) -> None:
        try:
            self.engine.start_seeding()
        except MiniTorrentError as error:
            self.pump.post(SeedingFailed(str(error)))

    def _make_download_dir(self) -> None:
        """The folder dialog opens in client.download_dir: make sure it exists."""
        try:
            self.config.client.download_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self.pump.post(Notice(f"cannot create the download folder {self.config.client.download_dir}: "
                                  f"{error.strerror or error}", "warn"))

    def _find_unfinished(self) -> None:
        unfinished = self.engine.unfinished_downloads()
        if unfinished:
            self.pump.post(UnfinishedFound(unfinished))

    def _save_settings(self, settings: dict) -> None:
        try:
            with self._settings_lock:  # two quick toggles: the last one wins, the file is never mixed
                save_settings(self.settings_file, settings)
        except OSError as error:
            self.pump.post(Notice(f"could not remember the theme in {self.settings_file}: {error}", "warn"))

    def _run_opener(self, folder: Path) -> None:
        if not folder.is_dir():
            self.pump.post(Notice(f"cannot open {folder}: the folder does not exist yet", "error"))
            return
        command = [*OPEN_FOLDER_COMMAND, str(folder)]
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as error:
            self.pump.post(Notice(f"cannot open {folder}: {command[0]} could not run ({error.strerror or error}); "
                                  "open the folder yourself", "error"))
            return
        try:
            _, stderr = process.communicate(timeout=OPEN_FOLDER_WAIT_S)
        except subprocess.TimeoutExpired:
            return  # still running: the file manager is open
        if process.returncode != 0:
            why = (stderr or b"").decode(errors="replace").strip().splitlines()
            self.pump.post(Notice(f"cannot open {folder}: {command[0]} exited with status {process.returncode}"
                                  + (f" ({why[-1]})" if why else ""), "error"))

    # Closing ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything cleanly (downloads pause; they are offered again next time) and destroy the window."""
        if self._closed:
            return
        self._closed = True
        for after_id in (self._tick_id, self._redraw_id):
            if after_id is not None:
                self.root.after_cancel(after_id)
        self.pump.stop()
        logging.getLogger().removeHandler(self._log_handler)
        self.root.withdraw()  # gone from the screen at once, while the threads wind down
        self.engine.interrupt()
        still_running = self.manager.stop_all()
        self.poller.stop()
        deadline = time.monotonic() + WORKER_JOIN_S
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        if still_running:
            log.warning("downloads still stopping at exit: %s", ", ".join(still_running))
        self.engine.close()
        self.root.destroy()
