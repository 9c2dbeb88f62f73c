"""Small widgets the server windows share: fonts, tones, a pulsing dot, stat tiles, a badge, a banner.

Every class here is drawn on the Tk thread only; none of them reads an
engine. A window hands them plain values (already formatted by the pure
functions of its module) and they show them.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
import tkinter as tk
from pathlib import Path
from tkinter import font as tkfont
from tkinter import ttk
from typing import Any, Callable

from minitorrent.gui.base import (
    EventPump,
    LogLine,
    LogPane,
    Poller,
    QueueLogHandler,
    SortableTable,
    apply_theme,
    load_settings,
    save_settings,
)

# Tones: one colour per meaning, readable with white text and on both the light and the dark theme.
TONES = {
    "ok": "#0f7b0f",  # serving, in sync
    "info": "#005fb8",  # standby, syncing
    "warn": "#b35900",  # lagging, no contact
    "error": "#c42b1c",  # failed, stopped unexpectedly
    "idle": "#767676",  # stopped, unknown
}
CAPTION_FOREGROUND = {"light": "#5f5f5f", "dark": "#a8a8a8"}
PULSE_PERIOD_S = 1.6  # one gentle breath of the "serving" dot
PULSE_FRAME_MS = 60  # about 16 frames a second: smooth enough, nearly free


def current_theme(root: tk.Misc) -> str:
    """``dark`` or ``light``: which sv-ttk theme is in use (light for any other ttk theme)."""
    return "dark" if "dark" in ttk.Style(root).theme_use() else "light"


def install_fonts_and_styles(root: tk.Misc) -> None:
    """Create the windows' named fonts and ttk styles for the theme in use (call again after a theme change)."""
    family = tkfont.nametofont("TkDefaultFont", root).actual("family")
    fonts = {"MTTitle": (16, "bold"), "MTValue": (13, "bold"), "MTBadge": (20, "bold"), "MTCaption": (9, "normal"),
             "MTBody": (10, "normal")}
    kept = root.__dict__.setdefault("_minitorrent_fonts", {})  # a Font deletes its named font when collected
    for name, (size, weight) in fonts.items():
        if name not in kept:
            kept[name] = tkfont.Font(root, name=name, family=family, size=size, weight=weight)
    style = ttk.Style(root)
    caption = CAPTION_FOREGROUND[current_theme(root)]
    style.configure("Title.TLabel", font="MTTitle")
    style.configure("Value.TLabel", font="MTValue")
    style.configure("Caption.TLabel", font="MTCaption", foreground=caption)
    style.configure("Subtitle.TLabel", font="MTBody", foreground=caption)
    for tone, colour in TONES.items():
        style.configure(f"{tone}.Value.TLabel", font="MTValue", foreground=colour if tone != "idle" else caption)
    style.configure("Tile.TFrame", padding=(12, 6))


def background(widget: tk.Misc) -> str:
    """The theme's window background as ``#rrggbb`` (for the few plain Tk widgets drawn among ttk ones)."""
    colour = str(ttk.Style(widget).lookup("TFrame", "background") or widget.winfo_toplevel().cget("background"))
    red, green, blue = (value // 257 for value in widget.winfo_rgb(colour))
    return f"#{red:02x}{green:02x}{blue:02x}"


def mix(colour_a: str, colour_b: str, share_b: float) -> str:
    """The colour ``share_b`` (0..1) of the way from ``colour_a`` to ``colour_b`` (both ``#rrggbb``)."""
    a = [int(colour_a[i:i + 2], 16) for i in (1, 3, 5)]
    b = [int(colour_b[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * share_b):02x}" for x, y in zip(a, b))


class PulseDot(tk.Canvas):
    """A small round indicator: it breathes gently in ``tone`` while ``pulsing``, else it is still."""

    def __init__(self, master: tk.Misc, size: int = 14) -> None:
        super().__init__(master, width=size + 6, height=size + 6, highlightthickness=0, borderwidth=0)
        self._halo = self.create_oval(0, 0, size + 6, size + 6, outline="", fill="")
        self._dot = self.create_oval(3, 3, size + 3, size + 3, outline="", fill=TONES["idle"])
        self._tone = "idle"
        self._pulsing = False
        self._after_id: str | None = None
        self.refresh_theme()

    def show(self, tone: str, pulsing: bool) -> None:
        """Colour the dot with ``tone``; breathe while ``pulsing``."""
        if (tone, pulsing) == (self._tone, self._pulsing):
            return
        self._tone, self._pulsing = tone, pulsing
        if pulsing and self._after_id is None:
            self._frame()
        elif not pulsing:
            self._cancel()
            self._draw(0.0)

    def refresh_theme(self) -> None:
        """Match the theme's background (after a theme change)."""
        self._background = background(self)
        self.configure(background=self._background)
        self._draw(0.0)

    def destroy(self) -> None:
        self._cancel()
        super().destroy()

    def _cancel(self) -> None:
        if self._after_id is not None:
            self.after_cancel(self._after_id)
            self._after_id = None

    def _frame(self) -> None:
        phase = (time.monotonic() % PULSE_PERIOD_S) / PULSE_PERIOD_S
        self._draw((1 - math.cos(2 * math.pi * phase)) / 2)
        self._after_id = self.after(PULSE_FRAME_MS, self._frame)

    def _draw(self, breath: float) -> None:
        colour = TONES[self._tone]
        back = self._background
        self.itemconfigure(self._dot, fill=mix(colour, back, 0.35 * breath))
        self.itemconfigure(self._halo, fill=mix(back, colour, 0.25 * breath) if self._pulsing else "")


class StatTile(ttk.Frame):
    """One figure of a status strip: a small caption, a bold value, a detail line under it."""

    def __init__(self, master: tk.Misc, caption: str) -> None:
        super().__init__(master, style="Tile.TFrame")
        self.caption = ttk.Label(self, text=caption.upper(), style="Caption.TLabel")
        self.value = ttk.Label(self, text="—", style="Value.TLabel")
        self.detail = ttk.Label(self, text="", style="Caption.TLabel")
        self.caption.grid(row=0, column=0, sticky="w")
        self.value.grid(row=1, column=0, sticky="w", pady=(2, 0))
        self.detail.grid(row=2, column=0, sticky="w")

    def show(self, value: str, detail: str = "", tone: str = "") -> None:
        """Display ``value`` (coloured by ``tone`` if given) and ``detail``."""
        style = f"{tone}.Value.TLabel" if tone in TONES else "Value.TLabel"
        if self.value.cget("text") != value or str(self.value.cget("style")) != style:
            self.value.configure(text=value, style=style)
        if self.detail.cget("text") != detail:
            self.detail.configure(text=detail)


class TileStrip(ttk.Frame):
    """A row of ``StatTile``s sharing the width equally, separated by thin rules."""

    def __init__(self, master: tk.Misc, captions: dict[str, str]) -> None:
        super().__init__(master)
        self.tiles: dict[str, StatTile] = {}
        for column, (key, caption) in enumerate(captions.items()):
            if column:
                ttk.Separator(self, orient="vertical").grid(row=0, column=2 * column - 1, sticky="ns", pady=6)
            tile = self.tiles[key] = StatTile(self, caption)
            tile.grid(row=0, column=2 * column, sticky="nsew")
            self.columnconfigure(2 * column, weight=1, uniform="tile")

    def show(self, values: dict[str, tuple[str, str, str]]) -> None:
        """``values`` maps a tile's key to (value, detail, tone)."""
        for key, (value, detail, tone) in values.items():
            if key in self.tiles:
                self.tiles[key].show(value, detail, tone)


class ProgressStrip(ttk.Frame):
    """A line of text over a progress bar, shown only while there is something to report."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master)
        self.label = ttk.Label(self, text="", anchor="w")
        self.bar = ttk.Progressbar(self, mode="determinate", maximum=1.0)
        self.label.grid(row=0, column=0, sticky="ew")
        self.bar.grid(row=1, column=0, sticky="ew", pady=(4, 0))
        self.columnconfigure(0, weight=1)

    def place_at(self, row: int) -> None:
        """Grid the strip in its window's column at ``row``, hidden until ``show``."""
        self.grid(row=row, column=0, sticky="ew", pady=(0, 8))
        self.grid_remove()

    def show(self, text: str, fraction: float | None = None) -> None:
        """Show ``text`` and, if given, the bar at ``fraction`` (0..1)."""
        self.label.configure(text=text)
        if fraction is not None:
            self.bar.configure(value=fraction)
        self.grid()

    def hide(self) -> None:
        """Take the strip off the window (its grid place is kept)."""
        self.grid_remove()


class Badge(tk.Label):
    """A large coloured label stating a role: white text on the tone's colour."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master, text="…", font="MTBadge", foreground="#ffffff", background=TONES["idle"],
                         padx=22, pady=10, anchor="center")

    def show(self, text: str, tone: str) -> None:
        """Display ``text`` on the colour of ``tone``."""
        colour = TONES.get(tone, TONES["idle"])
        if self.cget("text") != text or self.cget("background") != colour:
            self.configure(text=text, background=colour)


class Banner(tk.Frame):
    """A dismissible message across the window for errors and notices.

    Grid it where it belongs, then ``hide()`` it: ``show`` puts it back there.
    """

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master, background=TONES["error"])
        self.label = tk.Label(self, text="", foreground="#ffffff", background=TONES["error"], anchor="w",
                              justify="left", padx=10, pady=6, font="MTBody")
        self.close = tk.Label(self, text="✕", foreground="#ffffff", background=TONES["error"], padx=10,
                              cursor="hand2", font="MTBody")
        self.label.pack(side="left", fill="x", expand=True)
        self.close.pack(side="right")
        self.close.bind("<Button-1>", lambda _event: self.hide())
        self.label.bind("<Configure>", lambda event: self.label.configure(wraplength=max(200, event.width - 20)))
        self._shown = True

    @property
    def text(self) -> str:
        """The message shown ('' when hidden)."""
        return self.label.cget("text") if self._shown else ""

    def show(self, text: str, tone: str = "error") -> None:
        """Show ``text`` on the tone's colour (replacing any message shown)."""
        colour = TONES.get(tone, TONES["error"])
        for widget in (self, self.label, self.close):
            widget.configure(background=colour)
        self.label.configure(text=text)
        if not self._shown:
            self.grid()
            self._shown = True

    def hide(self) -> None:
        """Hide the banner."""
        if self._shown:
            self.grid_remove()
            self._shown = False


def errors_text(errors: list[str]) -> str:
    """The banner for the errors not yet dismissed: the latest, and how many more."""
    if not errors:
        return ""
    more = len(errors) - 1
    return errors[-1] + (f"  (and {more} more: see the log)" if more else "")


def theme_button_text(theme: str) -> str:
    """The label of the theme toggle: what a click switches to."""
    return "☀  Light" if theme == "dark" else "☾  Dark"


def close_on_signal(root: tk.Tk, close: Callable[[], None]) -> None:
    """SIGTERM (and SIGINT) close the window as its close button would: the engine stops cleanly.

    The handler runs on the main thread, which is the Tk thread; it only
    schedules ``close`` for the event loop.
    """
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: root.after(0, close))


class ServerWindow(ttk.Frame):
    """What both server windows share: header, status strip, banner, table and log panes, theme, closing.

    A subclass builds its controller (which posts to ``self.pump``), lays out
    its parts with the ``build_*`` helpers, then calls ``open(snapshot)``:
    from then on the poller posts ``snapshot()`` (taken off the Tk thread)
    and ``handle`` draws every event other than log lines. ``close`` stops
    drawing and polling, destroys the window, then calls ``stop_engine``.
    """

    def __init__(self, root: tk.Tk, settings_file: Path | None) -> None:
        super().__init__(root, padding=(16, 12, 16, 8))
        self.root = root
        self.settings_file = settings_file
        self.closed = False
        self.errors: list[str] = []
        install_fonts_and_styles(root)
        self.pump = EventPump(root, self._dispatch)
        self.poller: Poller | None = None
        self.columnconfigure(0, weight=1)

    # Building ---------------------------------------------------------------------------------------------

    def build_header(self, title: str, buttons: list[ttk.Button]) -> ttk.Frame:
        """The title row: a pulsing dot, the title and a headline under it, ``buttons`` and the theme toggle."""
        header = ttk.Frame(self)
        self.dot = PulseDot(header)
        self.dot.grid(row=0, column=0, rowspan=2, padx=(0, 10))
        ttk.Label(header, text=title, style="Title.TLabel").grid(row=0, column=1, sticky="w")
        self.headline = ttk.Label(header, text="Starting…", style="Subtitle.TLabel")
        self.headline.grid(row=1, column=1, sticky="w")
        header.columnconfigure(1, weight=1)
        bar = ttk.Frame(header)
        bar.grid(row=0, column=2, rowspan=2, sticky="e", padx=(12, 0))
        for column, button in enumerate(buttons):
            button.grid(in_=bar, row=0, column=column, padx=(0, 6))
            button.lift(bar)  # made before the bar, they would be drawn under it
        ttk.Separator(bar, orient="vertical").grid(row=0, column=len(buttons), sticky="ns", padx=(4, 10))
        self.theme_button = ttk.Button(header, text=theme_button_text(current_theme(self.root)), width=8,
                                       command=self.toggle_theme)
        self.theme_button.grid(in_=bar, row=0, column=len(buttons) + 1)
        return header

    def build_banner(self, row: int) -> None:
        """The error banner at ``row``, hidden until an error comes."""
        self.banner = Banner(self)
        self.banner.grid(row=row, column=0, sticky="ew", pady=(0, 8))
        self.banner.hide()
        self.banner.close.bind("<Button-1>", lambda _event: self.errors.clear(), add="+")

    def build_panes(self, row: int, caption: str, columns: list[tuple[str, str, int, str]], empty_text: str) -> None:
        """The files table above the log, split by a draggable sash; the status line under them."""
        panes = ttk.PanedWindow(self, orient="vertical")
        panes.grid(row=row, column=0, sticky="nsew")
        self.rowconfigure(row, weight=1)
        table_frame = ttk.Frame(panes)
        ttk.Label(table_frame, text=caption.upper(), style="Caption.TLabel").grid(row=0, column=0, sticky="w",
                                                                                  pady=(0, 4))
        self.table = SortableTable(table_frame, columns, height=6)
        self.table.grid(row=1, column=0, sticky="nsew")
        self.empty_hint = ttk.Label(table_frame, text=empty_text, style="Subtitle.TLabel")
        table_frame.columnconfigure(0, weight=1)
        table_frame.rowconfigure(1, weight=1)
        log_frame = ttk.Frame(panes)
        ttk.Label(log_frame, text="LOG", style="Caption.TLabel").grid(row=0, column=0, sticky="w", pady=(8, 4))
        self.log_pane = LogPane(log_frame, height=5)
        self.log_pane.grid(row=1, column=0, sticky="nsew")
        log_frame.columnconfigure(0, weight=1)
        log_frame.rowconfigure(1, weight=1)
        panes.add(table_frame, weight=3)
        panes.add(log_frame, weight=1)
        self.status = ttk.Label(self, text="", style="Caption.TLabel", anchor="w")
        self.status.grid(row=row + 1, column=0, sticky="ew", pady=(6, 0))
        self._rows: list | None = None
        self.show_rows([])

    def open(self, snapshot: Callable[[], Any]) -> None:
        """Show the window and start drawing, polling ``snapshot`` and showing the log."""
        self.grid(row=0, column=0, sticky="nsew")
        self.root.columnconfigure(0, weight=1)
        self.root.rowconfigure(0, weight=1)
        self.root.protocol("WM_DELETE_WINDOW", self.request_close)
        for sequence in ("<Control-a>", "<Control-A>"):
            self.root.bind(sequence, self._select_all)
        self.log_handler = QueueLogHandler(self.pump.post)
        logging.getLogger().addHandler(self.log_handler)
        self.poller = Poller(snapshot, self.pump.post)
        self.pump.start()
        self.poller.start()

    # Drawing (Tk thread) ------------------------------------------------------------------------------------

    def handle(self, event: Any) -> None:
        """Draw one event of the subclass's own kinds."""

    def show_rows(self, rows: list) -> None:
        """Show the table's rows (only when they changed: a large table is not redrawn for nothing)."""
        if rows == self._rows:
            return
        self.table.set_rows(rows)
        self._rows = rows
        if rows:
            self.empty_hint.place_forget()
        else:
            self.empty_hint.place(in_=self.table, relx=0.5, rely=0.5, anchor="center")

    def show_headline(self, text: str, tone: str, pulsing: bool) -> None:
        """The line under the title and the dot beside it."""
        if self.headline.cget("text") != text:
            self.headline.configure(text=text)
        self.dot.show(tone, pulsing)

    def show_error(self, text: str) -> None:
        """Add an error to the banner (the latest is shown, with how many more)."""
        self.errors.append(text)
        self.banner.show(errors_text(self.errors), "error")

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, LogLine):
            self.log_pane.append(event)
        elif isinstance(event, Exception):  # the poller could not take a snapshot
            self.status.configure(text=f"Status unavailable: {event}")
        else:
            self.handle(event)

    def _select_all(self, _event: tk.Event) -> str:
        self.table.select_all()
        return "break"

    # Theme and closing ----------------------------------------------------------------------------------------

    def toggle_theme(self) -> None:
        """Switch between the light and the dark theme, and remember the choice."""
        theme = apply_theme(self.root, "light" if current_theme(self.root) == "dark" else "dark")
        install_fonts_and_styles(self.root)
        self.dot.refresh_theme()
        self.theme_button.configure(text=theme_button_text(theme))
        if self.settings_file is not None:
            threading.Thread(target=remember_theme, args=(self.settings_file, theme), daemon=True).start()

    def request_close(self) -> None:
        """The window's close button (a subclass may ask first)."""
        self.close()

    def close(self) -> None:
        """Stop drawing, polling and logging here, close the window, then stop the engine (blocks)."""
        if self.closed:
            return
        self.closed = True
        self.pump.stop()
        if self.poller is not None:
            self.poller.stop()
            logging.getLogger().removeHandler(self.log_handler)
        self.root.destroy()
        self.stop_engine()

    def stop_engine(self) -> None:
        """Stop the subclass's engine and workers (the window is gone by then)."""


def remember_theme(settings_file: Path, theme: str) -> None:
    """Save the theme choice beside the other window settings (from a worker thread: it writes a file)."""
    try:
        save_settings(settings_file, {**load_settings(settings_file), "theme": theme})
    except OSError as error:
        logging.getLogger(__name__).warning("could not remember the theme in %s: %s", settings_file, error)
