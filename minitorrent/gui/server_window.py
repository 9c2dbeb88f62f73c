"""What both server windows add to the shell: a status strip, the files table above the log, a status line.

A subclass builds its controller (which posts to ``self.pump``), lays out
its parts with the ``build_*`` helpers, then calls ``open(snapshot)``.
"""
from __future__ import annotations

import tkinter as tk
from pathlib import Path
from tkinter import ttk
from typing import Any, Callable

from minitorrent.gui.base import POLL_INTERVAL_S, LogPane, SortableTable
from minitorrent.gui.shell import WindowShell
from minitorrent.gui.widgets import ErrorBanner


class ServerWindow(WindowShell):
    """A server's window: header, banner, files table and log panes, status line; see ``WindowShell``."""

    def __init__(self, root: tk.Tk, kind: str, settings_file: Path | None) -> None:
        super().__init__(root, kind, settings_file)
        self.header.grid(row=0, column=0, sticky="ew")
        self._rows: list | None = None

    # Building ---------------------------------------------------------------------------------------------

    def build_banner(self, row: int) -> None:
        """The error banner at ``row``, hidden until an error comes."""
        self.banner = ErrorBanner(self)
        self.banner.grid(row=row, column=0, sticky="ew", pady=(0, 8))
        self.banner.hide()

    def build_panes(self, row: int, caption: str, columns: list[tuple[str, str, int, str]], empty_text: str) -> None:
        """The files table above the log, split by a draggable sash; the status line under them."""
        self.panes = panes = ttk.PanedWindow(self, orient="vertical")  # a window may insert a pane of its own
        panes.grid(row=row, column=0, sticky="nsew")
        self.rowconfigure(row, weight=1)
        table_frame = ttk.Frame(panes)
        ttk.Label(table_frame, text=caption.upper(), style="Caption.TLabel").grid(row=0, column=0, sticky="w",
                                                                                  pady=(0, 4))
        self.table_actions = ttk.Frame(table_frame)  # buttons acting on the selected rows, beside the caption
        self.table_actions.grid(row=0, column=1, sticky="e", pady=(0, 4))
        self.table = SortableTable(table_frame, columns, height=6)
        self.table.grid(row=1, column=0, columnspan=2, sticky="nsew")
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
        self.show_rows([])

    def open(self, snapshot: Callable[[], Any], interval_s: float = POLL_INTERVAL_S) -> None:
        """Show the window and start polling ``snapshot`` (see ``WindowShell.open``); Ctrl+A selects all rows."""
        for sequence in ("<Control-a>", "<Control-A>"):
            self.root.bind(sequence, self._select_all)
        super().open(snapshot, interval_s)

    # Drawing (Tk thread) ------------------------------------------------------------------------------------

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
        self.header.show(text, tone, pulsing)

    def _select_all(self, _event: tk.Event) -> str:
        self.table.select_all()
        return "break"
