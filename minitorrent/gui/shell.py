"""The window shell the three windows share: title, header, theme, event pump, poller, log, closing.

A window is a ``WindowShell`` subclass that builds its panels, then calls
``open(snapshot, interval_s)``. From then on, as in every MiniTorrent
window (DESIGN principle 1):

- the ``Poller`` takes ``snapshot()`` off the Tk thread and posts it;
- worker threads and logging post events; the ``EventPump`` drains them on
  the Tk thread, hands log lines to the window's ``log_pane`` and every other
  event to ``handle``;
- ``every(ms, callback)`` runs a repeating timer on the Tk thread.

``close`` is one sequence for every window: cancel the timers, stop the
pump, the poller and the log handler, take the window off the screen, stop
the engine (``stop_engine``, which may block while threads wind down), then
destroy the root. The theme toggle switches the theme, restyles the window
(``theme_changed``) and remembers the choice in the settings file from a
worker thread.
"""
from __future__ import annotations

import logging
import signal
import threading
import tkinter as tk
from pathlib import Path
from tkinter import ttk
from typing import Any, Callable

from minitorrent.gui.base import (
    EventPump,
    LogLine,
    LogPane,
    Poller,
    QueueLogHandler,
    apply_theme,
    load_settings,
    save_settings,
)
from minitorrent.gui.widgets import (
    ErrorBanner,
    PulseDot,
    current_theme,
    install_fonts_and_styles,
    restyle_tree,
    theme_button_text,
)

log = logging.getLogger(__name__)

# One form for every window: the title bar and the heading inside say the same.
TITLES = {"main": "MiniTorrent — Main server", "backup": "MiniTorrent — Backup server", "client": "MiniTorrent — Client"}

_settings_lock = threading.Lock()  # two quick saves (theme, folder): each keeps the other's key, the last wins


def remember_setting(settings_file: Path, key: str, value: Any) -> None:
    """Save one window setting beside the others (a worker thread's job: it writes a file); a failure is logged."""
    try:
        with _settings_lock:
            save_settings(settings_file, {**load_settings(settings_file), key: value})
    except OSError as error:
        log.warning("could not remember the %s in %s: %s", key, settings_file, error)


class Header(ttk.Frame):
    """A window's top row: a state dot, the title with a headline under it, its buttons, the theme toggle."""

    def __init__(self, master: tk.Misc, title: str, on_theme: Callable[[], None]) -> None:
        super().__init__(master)
        self.dot = PulseDot(self)
        self.dot.grid(row=0, column=0, rowspan=2, padx=(0, 10))
        self.title = ttk.Label(self, text=title, style="Title.TLabel")
        self.title.grid(row=0, column=1, sticky="w")
        self.headline = ttk.Label(self, text="Starting…", style="Subtitle.TLabel")
        self.headline.grid(row=1, column=1, sticky="w")
        self.columnconfigure(1, weight=1)
        self.bar = ttk.Frame(self)
        self.bar.grid(row=0, column=2, rowspan=2, sticky="e", padx=(12, 0))
        ttk.Separator(self.bar, orient="vertical").grid(row=0, column=50, sticky="ns", padx=(4, 10))
        self.theme_button = ttk.Button(self.bar, width=8, command=on_theme,
                                       text=theme_button_text(current_theme(self)))
        self.theme_button.grid(row=0, column=51)
        self._buttons = 0

    def show_identity(self, identity: str) -> None:
        """This program's identity under the headline, as selectable text with a Copy button."""
        self.identity = IdentityLine(self, identity)
        self.identity.grid(row=2, column=1, columnspan=2, sticky="w", pady=(4, 0))

    def add_button(self, text: str, command: Callable[[], None], **options: Any) -> ttk.Button:
        """A button in the header's bar, after those already there (and before the theme toggle)."""
        button = ttk.Button(self.bar, text=text, command=command, **options)
        button.grid(row=0, column=self._buttons, padx=(0, 6))
        self._buttons += 1
        return button

    def show(self, text: str, tone: str, pulsing: bool) -> None:
        """The headline and the dot beside the title."""
        if self.headline.cget("text") != text:
            self.headline.configure(text=text)
        self.dot.show(tone, pulsing)

    def refresh_theme(self, theme: str) -> None:
        """Match a new theme."""
        self.dot.refresh_theme()
        self.theme_button.configure(text=theme_button_text(theme))


class IdentityLine(ttk.Frame):
    """The caption IDENTITY, the whole ID (read-only, selectable: people compare it group by group), a Copy button."""

    def __init__(self, master: tk.Misc, identity: str) -> None:
        super().__init__(master)
        self.identity = identity
        ttk.Label(self, text="IDENTITY", style="Caption.TLabel").grid(row=0, column=0, padx=(0, 6))
        self.text = tk.StringVar(self, identity)
        self.field = ttk.Entry(self, textvariable=self.text, state="readonly", width=len(identity) + 1,
                               font="TkFixedFont")
        self.field.grid(row=0, column=1)
        self.copy_button = ttk.Button(self, text="Copy", width=7, command=self.copy)
        self.copy_button.grid(row=0, column=2, padx=(6, 0))

    def copy(self) -> None:
        """Put the whole ID on the clipboard (to paste into a config's ``server.main.id``, or a message)."""
        self.clipboard_clear()
        self.clipboard_append(self.identity)
        self.copy_button.configure(text="Copied")


class WindowShell(ttk.Frame):
    """What every MiniTorrent window is: see the module's docstring. Built and used on the Tk thread only."""

    log_pane: LogPane  # built by the subclass, with the error banner
    banner: ErrorBanner

    def __init__(self, root: tk.Tk, kind: str, settings_file: Path | None,
                 padding: int | tuple[int, ...] = (16, 12, 16, 8)) -> None:
        super().__init__(root, padding=padding)
        self.root = root
        self.settings_file = settings_file
        self.closed = False
        self.theme = current_theme(root)
        root.title(TITLES[kind])
        install_fonts_and_styles(root)
        self.header = Header(self, TITLES[kind], self.toggle_theme)
        self.pump = EventPump(root, self._dispatch)
        self.poller: Poller | None = None
        self.log_handler: QueueLogHandler | None = None
        self._timers: dict[Callable[[], None], str] = {}
        self.columnconfigure(0, weight=1)

    def open(self, snapshot: Callable[[], Any], interval_s: float) -> None:
        """Show the window and start drawing, polling ``snapshot`` every ``interval_s`` and showing the log."""
        self.grid(row=0, column=0, sticky="nsew")
        self.root.columnconfigure(0, weight=1)
        self.root.rowconfigure(0, weight=1)
        self.root.protocol("WM_DELETE_WINDOW", self.request_close)
        self.root.report_callback_exception = self._report_callback_exception
        restyle_tree(self)
        self.log_pane.set_theme(self.theme)
        self.log_handler = QueueLogHandler(self.pump.post)
        logging.getLogger().addHandler(self.log_handler)
        self.poller = Poller(snapshot, self.pump.post, interval_s)
        self.pump.start()
        self.poller.start()

    def every(self, interval_ms: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the Tk thread every ``interval_ms`` until the window closes."""
        def tick() -> None:
            self._timers[callback] = self.root.after(interval_ms, tick)
            callback()

        self._timers[callback] = self.root.after(interval_ms, tick)

    # Drawing (Tk thread) ------------------------------------------------------------------------------------

    def handle(self, event: Any) -> None:
        """Draw one event of the subclass's own kinds."""

    def show_error(self, text: str) -> None:
        """Show ``text`` in the error banner."""
        self.banner.add(text)

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, LogLine):
            self.log_pane.append(event)
        elif isinstance(event, Exception):  # the poller's snapshot raised: a bug, but the window carries on
            self.show_error(f"could not read the state to show: {event} (details in the log)")
        else:
            self.handle(event)

    def _report_callback_exception(self, kind: type, error: BaseException, tb: Any) -> None:
        log.error("unexpected error in the window", exc_info=(kind, error, tb))
        self.show_error(f"unexpected error: {error!r} (details in the log)")

    # Theme ------------------------------------------------------------------------------------------------

    def toggle_theme(self) -> None:
        """Switch between the light and the dark theme, and remember the choice."""
        self.set_theme("light" if self.theme == "dark" else "dark")

    def set_theme(self, theme: str) -> None:
        """Use ``theme`` ("light" or "dark") now and in later runs."""
        self.theme = apply_theme(self.root, theme)
        install_fonts_and_styles(self.root)
        self.header.refresh_theme(self.theme)
        self.theme_changed(self.theme)
        restyle_tree(self)
        self.log_pane.set_theme(self.theme)
        if self.settings_file is not None:
            threading.Thread(target=remember_setting, args=(self.settings_file, "theme", self.theme),
                             name="window-settings", daemon=True).start()

    def theme_changed(self, theme: str) -> None:
        """Restyle what the subclass drew itself (plain Tk widgets, its own ttk styles)."""

    # Closing ----------------------------------------------------------------------------------------------

    def request_close(self) -> None:
        """The window's close button (a subclass may ask first)."""
        self.close()

    def close(self) -> None:
        """Stop drawing, polling and logging here, hide the window, stop the engine (blocks), destroy the root."""
        if self.closed:
            return
        self.closed = True
        for after_id in self._timers.values():
            self.root.after_cancel(after_id)
        self._timers.clear()
        self.pump.stop()
        if self.log_handler is not None:
            logging.getLogger().removeHandler(self.log_handler)
        self.root.withdraw()  # gone from the screen at once, while the threads wind down
        if self.poller is not None:
            self.poller.stop()
        self.stop_engine()
        self.root.destroy()

    def stop_engine(self) -> None:
        """Stop the subclass's engine and workers (the window is hidden by then)."""


def run_window(window: WindowShell) -> int:
    """Show ``window`` until it is closed (its button, SIGTERM or Ctrl+C: the same clean close); exit status 0."""
    root = window.root
    for number in (signal.SIGTERM, signal.SIGINT):  # the handler runs on the Tk thread: it only schedules
        signal.signal(number, lambda *_: root.after(0, window.close))
    try:
        root.mainloop()
    except KeyboardInterrupt:  # a Ctrl+C that came before the handler above could run
        pass
    finally:
        window.close()
    return 0
