"""What every MiniTorrent window shares: the Tk root, themes, the event pump, the poller.

The rule (DESIGN principle 1): no socket, disk or hashing work on the Tk
thread. Engines and worker threads never touch a widget; they put events on a
``queue.Queue`` and the window's ``EventPump`` drains a bounded batch every
tick with ``after()``. A ``Poller`` thread asks the engine for a snapshot
(which may read SQLite or the network) every half second and posts it as an
event, so the window only ever draws what it is handed.
"""
from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import tkinter as tk
from pathlib import Path
from tkinter import font as tkfont
from tkinter import ttk
from typing import Any, Callable

from minitorrent.common.units import human_size

log = logging.getLogger(__name__)

PUMP_INTERVAL_MS = 50  # 20 ticks a second: smooth progress bars, idle CPU near zero
PUMP_BATCH = 200  # events drawn per tick at most, so a flood cannot freeze the window
POLL_INTERVAL_S = 0.5
POLLER_STOP_TIMEOUT_S = 1.0
THEMES = ("light", "dark")
MIN_WINDOW_SIZE = (900, 520)  # below this the tables and status strips start to cut text


class NoDisplay(Exception):
    """Tk could not open a display."""


def open_root(title: str, geometry: str, settings_file: Path | None = None) -> tk.Tk:
    """Create the Tk root with the remembered theme; ``NoDisplay`` if there is no screen."""
    try:
        root = tk.Tk(className="MiniTorrent")
    except tk.TclError as error:
        raise NoDisplay(str(error)) from error
    root.title(title)
    root.geometry(geometry)
    root.minsize(*MIN_WINDOW_SIZE)
    apply_theme(root, load_settings(settings_file).get("theme", "light"))
    return root


def no_display_hint(program: str, instead: str = "--headless") -> int:
    """Print the one-line hint for a machine without a screen; the exit status.

    ``instead`` is what to run without a screen (the client has commands, not ``--headless``).
    """
    print(f"error: cannot open a window (no display); run `python {program} {instead}` instead",
          file=sys.stderr)
    return 2


def apply_theme(root: tk.Tk, theme: str) -> str:
    """Switch to the sv-ttk ``light`` or ``dark`` theme (falls back to ttk's own); returns it."""
    theme = theme if theme in THEMES else "light"
    try:
        import sv_ttk  # a well-kept theme package; the windows still work with plain ttk without it

        sv_ttk.set_theme(theme, root)
    except (ImportError, tk.TclError) as error:
        log.info("sv-ttk theme unavailable (%s); using the default ttk theme", error)
    return theme


def load_settings(path: Path | None) -> dict:
    """The window settings remembered in ``path`` (theme...), {} if none or unreadable."""
    if path is None:
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def save_settings(path: Path, settings: dict) -> None:
    """Remember window settings (atomically: a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    temp.replace(path)


class EventPump:
    """Drains ``events`` on the Tk thread every tick and hands each to ``handle``.

    Any thread may ``post``; only the Tk thread runs ``handle``. ``stop``
    cancels the pending ``after`` so nothing runs on a destroyed window.
    """

    def __init__(self, root: tk.Misc, handle: Callable[[Any], None]) -> None:
        self.root = root
        self.events: queue.Queue = queue.Queue()
        self._handle = handle
        self._after_id: str | None = None

    def post(self, event: Any) -> None:
        """Queue an event for the window (any thread)."""
        self.events.put(event)

    def start(self) -> None:
        """Begin draining (Tk thread)."""
        self._after_id = self.root.after(PUMP_INTERVAL_MS, self._tick)

    def stop(self) -> None:
        """Stop draining (Tk thread)."""
        if self._after_id is not None:
            self.root.after_cancel(self._after_id)
            self._after_id = None

    def _tick(self) -> None:
        for _ in range(PUMP_BATCH):
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            try:
                self._handle(event)
            except Exception:  # one bad event must not stop the window from updating
                log.exception("the window could not show %r", event)
        self._after_id = self.root.after(PUMP_INTERVAL_MS, self._tick)


class Poller:
    """A background thread that posts ``snapshot()`` every ``interval_s`` (never on the Tk thread)."""

    def __init__(self, snapshot: Callable[[], Any], post: Callable[[Any], None],
                 interval_s: float = POLL_INTERVAL_S) -> None:
        self._snapshot = snapshot
        self._post = post
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._now = threading.Event()
        self.thread = threading.Thread(target=self._run, name="window-poller", daemon=True)

    def start(self) -> None:
        """Start polling."""
        self.thread.start()

    def poll_now(self) -> None:
        """Take the next snapshot at once (after a user action)."""
        self._now.set()

    def set_interval(self, interval_s: float) -> None:
        """Wait ``interval_s`` before each following snapshot (any thread; e.g. back off while a server is down)."""
        self._interval_s = interval_s

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        self._now.set()
        self.thread.join(POLLER_STOP_TIMEOUT_S)  # a snapshot stuck on a dead server must not freeze the window

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._post(self._snapshot())
            except Exception as error:  # shown in the window; the traceback goes to the log
                log.exception("the window's snapshot failed")
                self._post(error)
            self._now.wait(self._interval_s)
            self._now.clear()


class QueueLogHandler(logging.Handler):
    """A logging handler that posts records to a window (any thread may log)."""

    def __init__(self, post: Callable[[Any], None]) -> None:
        super().__init__(logging.INFO)
        self._post = post
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self._post(LogLine(record.levelname, self.format(record)))


class LogLine:
    """Event: one formatted log line and its level."""

    __slots__ = ("level", "text")

    def __init__(self, level: str, text: str) -> None:
        self.level = level
        self.text = text


LEVEL_COLOURS = {  # per theme: the light theme's orange and red are too dark to read on the dark background
    "light": {"DEBUG": "#767676", "WARNING": "#a35200", "ERROR": "#c42b1c", "CRITICAL": "#c42b1c"},
    "dark": {"DEBUG": "#a8a8a8", "WARNING": "#fcb04a", "ERROR": "#ff99a4", "CRITICAL": "#ff99a4"},
}
MAX_LOG_LINES = 2000


class LogPane(ttk.Frame):
    """A read-only log view with coloured levels that follows new lines until the user scrolls up.

    Whether it follows is decided only when the user scrolls (scrollbar,
    wheel, keys): the view's position while lines pour in, or while the pane
    sits in a hidden tab, says nothing about what the user wants.
    """

    def __init__(self, master: tk.Misc, height: int = 8) -> None:
        super().__init__(master)
        # ("TkFixedFont", 9) would name a family that does not exist: a proportional font. Copy the named one.
        self.font = tkfont.nametofont("TkFixedFont", self).copy()
        self.font.configure(size=9)
        self.text = tk.Text(self, height=height, wrap="word", state="disabled", borderwidth=0, font=self.font)
        # A long line wraps under its message, not under its time: "HH:MM:SS LEVEL   " is 17 characters.
        self.text.tag_configure("line", lmargin2=self.font.measure("0" * 17))
        scroll = ttk.Scrollbar(self, orient="vertical", command=self.scroll_view)
        self.text.configure(yscrollcommand=scroll.set)
        self.text.grid(row=0, column=0, sticky="nsew")
        scroll.grid(row=0, column=1, sticky="ns")
        self.columnconfigure(0, weight=1)
        self.rowconfigure(0, weight=1)
        self.set_theme("light")
        self.following = True
        for sequence in ("<MouseWheel>", "<Button-4>", "<Button-5>", "<Prior>", "<Next>", "<Up>", "<Down>",
                         "<Home>", "<End>", "<Control-Home>", "<Control-End>"):
            self.text.bind(sequence, lambda _event: self.after_idle(self._user_scrolled), add="+")
        # Shown again, or shrunk (a strip appearing above it): the newest line would be cut off.
        self.text.bind("<Configure>", lambda _event: self.following and self.text.see("end"), add="+")
        self.text.bind("<Map>", lambda _event: self.following and self.text.see("end"), add="+")

    def set_theme(self, theme: str) -> None:
        """Colour the levels for ``theme`` ("light" or "dark")."""
        for level, colour in LEVEL_COLOURS[theme].items():
            self.text.tag_configure(level, foreground=colour)

    def append(self, line: LogLine) -> None:
        """Add a line; bring it into view unless the user scrolled away from the end."""
        self.text.configure(state="normal")
        self.text.insert("end", line.text + "\n", (line.level, "line"))
        surplus = int(self.text.index("end-1c").split(".")[0]) - MAX_LOG_LINES
        if surplus > 0:
            self.text.delete("1.0", f"{surplus + 1}.0")
        self.text.configure(state="disabled")
        if self.following:
            self.text.see("end")

    def scroll_view(self, *args: Any) -> None:
        """Scroll as the user asked (the scrollbar's command): following resumes at the end, stops above it."""
        self.text.yview(*args)
        self._user_scrolled()

    def last_line_visible(self) -> bool:
        """True if the newest line is on screen."""
        self.text.update_idletasks()
        return self.text.bbox("end-2c") is not None

    def _user_scrolled(self) -> None:
        self.following = self.last_line_visible()


def fit_text(text: str, width_px: int, measure: Callable[[str], int]) -> str:
    """``text``, or its longest middle-elided form (``"start…end.bin"``) that ``measure`` says fits ``width_px``.

    The end is kept because it holds the extension; a middle cut keeps two
    names that differ only at the end apart.
    """
    if measure(text) <= width_px:
        return text
    low, high = 0, len(text) - 1  # how many characters to keep around the ellipsis
    while low < high:
        keep = (low + high + 1) // 2
        if measure(_cut(text, keep)) <= width_px:
            low = keep
        else:
            high = keep - 1
    return _cut(text, low)


def _cut(text: str, keep: int) -> str:
    head = (keep + 1) // 2
    return text[:head] + "…" + (text[len(text) - (keep - head):] if keep - head else "")


CELL_PADDING_PX = 12  # a Treeview cell's text starts a few pixels in and must end before the next column


class SortableTable(ttk.Frame):
    """A ``ttk.Treeview`` whose columns sort when their heading is clicked.

    ``columns`` is a list of (key, heading, width, anchor). Rows are given as
    (iid, values, sort_keys): ``sort_keys`` holds the raw values (bytes, not
    "1.5 MiB") so sizes and dates sort as numbers. Until a column is chosen
    the rows keep the order they are given in. The first column (the name)
    is shortened in the middle with an ellipsis when it does not fit.
    """

    def __init__(self, master: tk.Misc, columns: list[tuple[str, str, int, str]], height: int = 10) -> None:
        super().__init__(master)
        self.keys = [key for key, *_ in columns]
        self.tree = ttk.Treeview(self, columns=self.keys, show="headings", height=height, selectmode="extended")
        for key, heading, width, anchor in columns:
            self.tree.heading(key, text=heading, command=lambda k=key: self.sort_by(k))
            self.tree.column(key, width=width, anchor=anchor, stretch=key == self.keys[0])
        scroll = ttk.Scrollbar(self, orient="vertical", command=self.tree.yview)
        self.tree.configure(yscrollcommand=scroll.set)
        self.tree.grid(row=0, column=0, sticky="nsew")
        scroll.grid(row=0, column=1, sticky="ns")
        self.columnconfigure(0, weight=1)
        self.rowconfigure(0, weight=1)
        self._sort_values: dict[str, dict[str, Any]] = {}
        self._names: dict[str, str] = {}  # iid -> the first column's whole text
        self._sorted_by: tuple[str, bool] | None = None
        self._widths: dict[str, int] = {}  # text -> pixels, measured once
        self._name_width = 0
        self.tree.bind("<Configure>", lambda _event: self.after_idle(self._fit_names), add="+")

    def set_rows(self, rows: list[tuple[str, tuple, dict[str, Any]]]) -> None:
        """Show exactly ``rows``, keeping the selection and the chosen sort order (else the given order)."""
        wanted = {iid for iid, _, _ in rows}
        for iid in set(self.tree.get_children()) - wanted:
            self.tree.delete(iid)
            self._names.pop(iid, None)
        for iid, values, sort_keys in rows:
            self._names[iid] = str(values[0])
            values = (self._fitted(str(values[0])), *values[1:])
            if self.tree.exists(iid):
                self.tree.item(iid, values=values)
            else:
                self.tree.insert("", "end", iid=iid, values=values)
            self._sort_values[iid] = sort_keys
        if self._sorted_by:
            self._apply_sort(*self._sorted_by)
        else:  # a row that arrives later goes where it was given, not at the bottom
            for position, (iid, _, _) in enumerate(rows):
                self.tree.move(iid, "", position)

    def full_name(self, iid: str) -> str:
        """The first column's whole text for row ``iid`` (the cell may show it shortened)."""
        return self._names[iid]

    def selected(self) -> list[str]:
        """The iids of the selected rows."""
        return list(self.tree.selection())

    def select_all(self) -> None:
        """Select every row."""
        self.tree.selection_set(self.tree.get_children())

    def sort_by(self, key: str) -> None:
        """Sort by ``key``; a second click on the same column reverses the order."""
        descending = self._sorted_by == (key, False)
        self._sorted_by = (key, descending)
        self._apply_sort(key, descending)

    def _apply_sort(self, key: str, descending: bool) -> None:
        rows = list(self.tree.get_children())
        rows.sort(key=lambda iid: _sortable(self._sort_values.get(iid, {}).get(key)), reverse=descending)
        for position, iid in enumerate(rows):
            self.tree.move(iid, "", position)
        for column in self.keys:
            heading = self.tree.heading(column, "text").rstrip(" ▲▼")
            arrow = (" ▼" if descending else " ▲") if column == key else ""
            self.tree.heading(column, text=heading + arrow)

    def _fitted(self, text: str) -> str:
        return fit_text(text, self._name_width, self._measure) if self._name_width > 0 else text

    def _measure(self, text: str) -> int:
        if text not in self._widths:
            if len(self._widths) > 50_000:  # names come and go: the cache must not grow for ever
                self._widths.clear()
            self._widths[text] = tkfont.nametofont(_table_font(self.tree)).measure(text)
        return self._widths[text]

    def _fit_names(self) -> None:
        """The name column changed width: shorten (or restore) the names shown in it."""
        width = int(self.tree.column(self.keys[0], "width")) - CELL_PADDING_PX
        if width == self._name_width or not self.winfo_exists():
            return
        self._name_width = width
        for iid, name in self._names.items():
            self.tree.set(iid, self.keys[0], self._fitted(name))


def _table_font(tree: ttk.Treeview) -> str:
    """The named font a Treeview draws its rows in."""
    font = str(ttk.Style(tree).lookup("Treeview", "font") or "")
    return font if font in tkfont.names(tree) else "TkDefaultFont"


SHORT_SHA_LENGTH = 12


def short_sha(sha256: str) -> str:
    """The first hex digits of a SHA-256, enough to tell files apart at a glance."""
    return sha256[:SHORT_SHA_LENGTH]


def format_added(timestamp: float) -> str:
    """A catalog date as local ``YYYY-MM-DD HH:MM``."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


# How each catalog field is shown in a table, and what it sorts by.
_CATALOG_CELLS: dict[str, tuple[Callable[[dict], Any], Callable[[dict], Any]]] = {
    "name": (lambda e: e["name"], lambda e: e["name"]),
    "size": (lambda e: human_size(e["size"]), lambda e: e["size"]),
    "chunks": (lambda e: e["chunks"], lambda e: e["chunks"]),
    "downloads": (lambda e: e["downloads"], lambda e: e["downloads"]),
    "sha256": (lambda e: short_sha(e["sha256"]), lambda e: e["sha256"]),
    "added": (lambda e: format_added(e["added_at"]), lambda e: e["added_at"]),
}


def entry_row(entry: dict, keys: list[str], extra: dict[str, tuple[Any, Any]] | None = None) -> tuple[tuple, dict]:
    """A catalog entry as the cells of the columns ``keys``: (shown values, raw sort keys).

    Every window's file table goes through here, so a size or a date looks
    the same everywhere. ``extra`` supplies cells that are not catalog fields:
    key -> (shown, sort key).
    """
    extra = extra or {}
    values, sort_keys = [], {}
    for key in keys:
        if key in extra:
            shown, raw = extra[key]
        else:
            show, sort_by = _CATALOG_CELLS[key]
            shown, raw = show(entry), sort_by(entry)
        values.append(shown)
        sort_keys[key] = raw
    return tuple(values), sort_keys


def _sortable(value: Any) -> tuple:
    """Numbers before text, text without case: a key that never compares str with int."""
    if isinstance(value, (int, float)):
        return (0, value, "")
    return (1, 0, str(value or "").casefold())
