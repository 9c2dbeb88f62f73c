"""The client window's panels, each a small ``ttk.Frame`` with one job (Thonny/IDLE style).

They are drawn on the Tk thread only, read no engine, and show what the
plain functions of client_logic.py and transfers.py make of the window's
state. The window (client_window.py) composes them.
"""
from __future__ import annotations

import time
import tkinter as tk
from pathlib import Path
from tkinter import font as tkfont
from tkinter import ttk
from typing import Any, Callable

from minitorrent.gui.base import SortableTable, entry_row
from minitorrent.gui.client_logic import (
    ALL_FOLDERS,
    CATALOG_COLUMNS,
    MAX_LIMIT_KIB,
    SEEDED_COLUMNS,
    catalog_row,
    count_text,
    elide,
    filter_entries,
    folder_choices,
    format_limit_kib,
    found_server_row,
    in_folder,
    parse_limit_kib,
    seeding_tiles,
    transfers_summary,
)
from minitorrent.gui.transfers import (
    Action,
    FileProgress,
    Transfer,
    TransferManager,
    TransferState,
    TransferView,
    allowed_actions,
    file_row,
    files_summary,
    transfer_view,
)
from minitorrent.gui.widgets import (
    TONES,
    FittedLabel,
    TileStrip,
    background,
    restyle_tree,
    set_style,
    text_tones,
)
from minitorrent.net.discovery import FoundServer

FOUND_COLUMNS = [("name", "Server", 120, "w"), ("address", "Address", 140, "w"), ("role", "Role", 70, "w"),
                 ("epoch", "Epoch", 60, "e"), ("identity", "Identity", 600, "w")]  # 63 characters
TONE_STYLES = {"active": "info.State.TLabel", "ok": "ok.State.TLabel", "error": "error.State.TLabel",
               "muted": "idle.State.TLabel"}


def configure_client_styles(root: tk.Misc) -> None:
    """The client's own styles (ttk styles belong to a theme: set again after a theme change)."""
    kept = root.__dict__.setdefault("_minitorrent_fonts", {})  # a Font deletes its named font when collected
    if "MTStrong" not in kept:
        body = tkfont.nametofont("MTBody", root).actual()
        kept["MTStrong"] = tkfont.Font(root, name="MTStrong", family=body["family"], size=body["size"],
                                       weight="bold")
    style = ttk.Style(root)
    style.configure("Strong.TLabel", font="MTStrong")
    caption = style.lookup("Caption.TLabel", "foreground")
    for tone, colour in text_tones(root).items():
        style.configure(f"{tone}.State.TLabel", font="MTStrong", foreground=caption if tone == "idle" else colour)
        style.configure(f"{tone}.Message.TLabel", font="MTCaption", foreground=colour)


class StatusLine(ttk.Label):
    """The line at the bottom: the latest news, stamped with the time, coloured by its tone."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master, text="Connecting…", style="Caption.TLabel", padding=(14, 4, 14, 6))

    def say(self, text: str, tone: str = "info") -> None:
        """Show ``text`` (``tone``: ok, info, warn, error)."""
        set_style(self, f"{tone}.Message.TLabel" if tone in TONES else "Caption.TLabel")
        self.configure(text=f"{time.strftime('%H:%M:%S')}  {text}")


class ServerChooser(ttk.LabelFrame):
    """The servers heard on the LAN, offered when no configured server answers: pick one and use it."""

    def __init__(self, master: tk.Misc, on_use: Callable[[FoundServer], None], on_listen: Callable[[], None]) -> None:
        super().__init__(master, text="Servers found on this network", padding=(10, 4, 10, 6))
        self.servers: list[FoundServer] = []
        self._on_use = on_use
        self.message = ttk.Label(self, text="", style="Caption.TLabel")
        self.message.grid(row=0, column=0, sticky="w")
        self.table = SortableTable(self, FOUND_COLUMNS, height=3)
        self.table.grid(row=1, column=0, rowspan=2, sticky="nsew", pady=(4, 0))
        self.use_button = ttk.Button(self, text="Use this server", command=self._use, style="Accent.TButton")
        self.use_button.grid(row=1, column=1, sticky="new", padx=(10, 0), pady=(4, 4))
        self.listen_button = ttk.Button(self, text="Search again", command=on_listen)
        self.listen_button.grid(row=2, column=1, sticky="new", padx=(10, 0))
        self.table.tree.configure(selectmode="browse")
        self.table.tree.bind("<Double-1>", lambda _e: self._use())
        self.columnconfigure(0, weight=1)

    def listening(self) -> None:
        """Say that the window is listening (the button waits meanwhile)."""
        self.message.configure(text="Listening for servers on this network…")
        self.listen_button.state(["disabled"])

    def show(self, servers: list[FoundServer], error: str = "") -> None:
        """List ``servers`` (the first selected) or say why none is listed."""
        self.servers = list(servers)
        keys = [key for key, *_ in FOUND_COLUMNS]
        self.table.set_rows([(f"f{index}", found_server_row(server),
                              {**dict(zip(keys, found_server_row(server))), "epoch": server.epoch})
                             for index, server in enumerate(self.servers)])
        if self.servers:
            self.table.tree.selection_set("f0")
        heard = f"{len(self.servers)} heard: choose one, its identity is pinned" if self.servers else \
            "none heard (servers announce themselves only with 'discovery: true' in their config)"
        self.message.configure(text=error or f"No configured server answers. Servers on this network: {heard}")
        self.listen_button.state(["!disabled"])
        self.use_button.state(["!disabled"] if self.servers else ["disabled"])

    def chosen(self) -> FoundServer | None:
        """The server selected in the table, if any."""
        selected = self.table.selected()
        return self.servers[int(selected[0][1:])] if selected else None

    def _use(self) -> None:
        server = self.chosen()
        if server is not None:
            self.use_button.state(["disabled"])
            self._on_use(server)


class CatalogPanel(ttk.Frame):
    """The shared files: a search box that filters as you type, a sortable multi-select table (by name at first)."""

    def __init__(self, master: tk.Misc, on_refresh: Callable[[], None], on_download: Callable[[], None],
                 on_download_folder: Callable[[str], None] | None = None) -> None:
        super().__init__(master, padding=(14, 4, 14, 8))
        bar = ttk.Frame(self)
        bar.grid(row=0, column=0, sticky="ew", pady=(0, 6))
        ttk.Label(bar, text="Catalog", style="Value.TLabel").pack(side="left", padx=(0, 14))
        self.search_var = tk.StringVar(self)
        ttk.Label(bar, text="Search", style="Subtitle.TLabel").pack(side="left", padx=(0, 6))
        self.search = ttk.Entry(bar, textvariable=self.search_var, width=24)
        self.search.pack(side="left")
        self.folder_var = tk.StringVar(self, value=ALL_FOLDERS)
        ttk.Label(bar, text="Folder", style="Subtitle.TLabel").pack(side="left", padx=(12, 6))
        self.folder = ttk.Combobox(bar, textvariable=self.folder_var, values=[ALL_FOLDERS], state="readonly",
                                   width=22)
        self.folder.pack(side="left")
        self.refresh_button = ttk.Button(bar, text="Refresh", command=on_refresh)  # F5
        self.refresh_button.pack(side="left", padx=(8, 0))
        self.count = ttk.Label(bar, text="", style="Subtitle.TLabel")
        self.count.pack(side="left", padx=12)
        self.download_button = ttk.Button(bar, text="Download Selected", style="Accent.TButton",
                                          command=on_download)
        self.download_button.pack(side="right")
        self.download_folder_button = ttk.Button(bar, text="Download Folder", state="disabled",
                                                 command=lambda: on_download_folder and on_download_folder(
                                                     self.folder_var.get()))
        self.download_folder_button.pack(side="right", padx=(0, 8))
        self.table = SortableTable(self, CATALOG_COLUMNS, height=4)
        self.table.grid(row=1, column=0, sticky="nsew")
        self.table.sort_by("name")
        self.columnconfigure(0, weight=1)
        self.rowconfigure(1, weight=1)
        self.entries: list[dict] = []
        self._names: dict[str, str] = {}  # iid -> file name (names are never used as Tk item ids)
        self._iids: dict[str, str] = {}
        self._bind_keys(on_refresh, on_download)
        self._update_button()

    def _bind_keys(self, on_refresh: Callable[[], None], on_download: Callable[[], None]) -> None:
        self.search_var.trace_add("write", lambda *_: self.apply_filter())
        self.folder_var.trace_add("write", lambda *_: self.apply_filter())
        for sequence in ("<Return>", "<KP_Enter>"):
            self.search.bind(sequence, lambda _e: on_refresh())
        self.search.bind("<Escape>", lambda _e: self.search_var.set(""))
        tree = self.table.tree
        for sequence in ("<Control-a>", "<Control-A>"):
            tree.bind(sequence, self._select_all)
        tree.bind("<Return>", lambda _e: on_download())
        tree.bind("<Double-1>", lambda _e: on_download())
        tree.bind("<<TreeviewSelect>>", lambda _e: self._update_button())

    def set_entries(self, entries: list[dict]) -> None:
        """Show a freshly fetched catalog (filtered by the search box, sorted, selection kept)."""
        if entries != self.entries:
            self.entries = entries
            choices = folder_choices(entries)
            self.folder.configure(values=choices)
            if self.folder_var.get() not in choices:
                self.folder_var.set(ALL_FOLDERS)  # the folder went (removed or renamed on the server)
            self.apply_filter()

    def apply_filter(self) -> None:
        """Show the entries matching the search box."""
        shown = in_folder(filter_entries(self.entries, self.search_var.get()), self.folder_var.get())
        rows = []
        for entry in shown:
            iid = self._iids.get(entry["name"])
            if iid is None:
                iid = self._iids[entry["name"]] = f"f{len(self._iids) + 1}"
                self._names[iid] = entry["name"]
            rows.append((iid, *catalog_row(entry)))
        self.table.set_rows(rows)
        self.count.configure(text=count_text(len(shown), len(self.entries)))
        self._update_button()

    def selected_entries(self) -> list[dict]:
        """The selected catalog entries, in table order."""
        by_name = {entry["name"]: entry for entry in self.entries}
        chosen = set(self.table.selected())
        return [by_name[self._names[iid]] for iid in self.table.tree.get_children()
                if iid in chosen and self._names[iid] in by_name]

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
        folder = self.folder_var.get()
        self.download_folder_button.configure(state="disabled" if folder == ALL_FOLDERS else "normal",
                                              text="Download Folder" if folder == ALL_FOLDERS else
                                              f"Download {elide(folder, 24)}")


class TransferRow(ttk.Frame):
    """One transfer: name, state, percent, a progress bar, sizes/speed/ETA/sources, and its buttons."""

    def __init__(self, master: tk.Misc, tid: int, name: str, on_action: Callable[[int, str], None]) -> None:
        super().__init__(master, padding=(12, 6, 12, 6))
        self.tid = tid
        self.name_label = FittedLabel(self, name, style="Strong.TLabel")
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
        self.files: FileList | None = None  # a folder's files, made by show_files
        buttons.grid(row=0, column=3, rowspan=3, padx=(16, 0), sticky="e")
        buttons.update_idletasks()  # the width with every place filled: rows keep it, so their bars line up
        self.columnconfigure(3, minsize=buttons.winfo_reqwidth() + 16)
        self.columnconfigure(0, weight=1)
        self.view: TransferView | None = None

    def show_files(self, files: dict[str, FileProgress], folder: str) -> None:
        """A folder transfer: its files' list under the bar, drawn from ``files``."""
        if self.files is None:
            self.files = FileList(self)
            self.files.grid(row=3, column=0, columnspan=4, sticky="ew", pady=(6, 0))
            self.files.colour(text_tones(self))
            restyle_tree(self.files)
        self.files.show(files, folder)

    def show(self, view: TransferView, allowed: frozenset[Action]) -> None:
        """Display ``view``; show the buttons of the ``allowed`` actions (a finished row keeps Open folder)."""
        if view == self.view:
            return
        self.view = view
        set_style(self.state_label, TONE_STYLES[view.tone])
        self.state_label.configure(text=view.state_text)
        self.percent_label.configure(text=view.percent_text)
        self.bar.configure(value=view.percent)
        self.detail_label.configure(text=view.detail)
        for button, action in ((self.pause_button, Action.PAUSE), (self.resume_button, Action.RESUME),
                               (self.cancel_button, Action.CANCEL)):
            if action in allowed:
                button.grid()
            else:
                button.grid_remove()


REDRAW_MS = 100  # progress rows are redrawn at most this often, however many chunks arrive
FILE_ROWS_SHOWN = 1000  # a folder's file list shows this many rows (Tk slows with more); the bar counts them all
FILE_ORDER = {"downloading": 0, "failed": 1, "verified": 2, "waiting": 3, "done": 4}  # what is under way first
FILE_BAR_CELLS = 10  # a file's progress as a text bar in its row: ten cells of 10 %
FILE_COLUMNS = [("file", "File", 420, "w"), ("size", "Size", 90, "e"), ("progress", "Progress", 190, "w"),
                ("state", "State", 110, "w")]


def text_bar(percent_done: float) -> str:
    """``"██████░░░░  60.0%"``: a progress bar a table cell can hold."""
    full = int(percent_done // (100 / FILE_BAR_CELLS))
    return "█" * full + "░" * (FILE_BAR_CELLS - full) + f" {percent_done:5.1f}%"


class FileList(ttk.Frame):
    """A folder transfer's files, one row each with its size, progress and state. Tk thread only."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master)
        self.summary = ttk.Label(self, text="", style="Caption.TLabel")
        self.summary.grid(row=0, column=0, sticky="w")
        self.toggle = ttk.Button(self, text="Hide files", command=self._toggle)
        self.toggle.grid(row=0, column=1, sticky="e")
        self.tree = ttk.Treeview(self, columns=[key for key, *_ in FILE_COLUMNS], show="headings", height=6,
                                 selectmode="none")
        for key, heading, width, anchor in FILE_COLUMNS:
            self.tree.heading(key, text=heading)
            self.tree.column(key, width=width, anchor=anchor, stretch=key == "file")
        self.scroll = ttk.Scrollbar(self, orient="vertical", command=self.tree.yview)
        self.tree.configure(yscrollcommand=self.scroll.set)
        self.tree.grid(row=1, column=0, columnspan=2, sticky="nsew", pady=(4, 0))
        self.scroll.grid(row=1, column=2, sticky="ns", pady=(4, 0))
        self.columnconfigure(0, weight=1)
        self._shown: dict[str, tuple] = {}  # iid -> the values drawn, so a redraw touches only what changed
        self._order: list[str] = []  # the iids in the order drawn
        self._iids: dict[str, str] = {}  # file name -> iid

    def show(self, files: dict[str, FileProgress], folder: str) -> None:
        """Draw each file's progress and state: the ones under way first, then by name (at most ``FILE_ROWS_SHOWN``)."""
        more = len(files) - FILE_ROWS_SHOWN
        self.summary.configure(text=files_summary(files) + (f" · the list shows {FILE_ROWS_SHOWN}, those under "
                                                            "way first" if more > 0 else ""))
        ranked = sorted(files.values(), key=lambda f: (FILE_ORDER.get(f.state, len(FILE_ORDER)), f.name))
        order = [self._iid(file.name) for file in ranked[:FILE_ROWS_SHOWN]]
        for iid in set(self._shown) - set(order):
            self.tree.delete(iid)
            del self._shown[iid]
        for iid, file in zip(order, ranked):
            inside, size, _, state = file_row(file, folder)
            values = (inside, size, text_bar(file.percent), state)
            if self._shown.get(iid) == values:
                continue
            if iid in self._shown:
                self.tree.item(iid, values=values, tags=(state,))
            else:
                self.tree.insert("", "end", iid=iid, values=values, tags=(state,))
            self._shown[iid] = values
        if order != self._order:
            for position, iid in enumerate(order):
                self.tree.move(iid, "", position)
            self._order = order

    def _iid(self, name: str) -> str:
        """A plain item id per file name (a name may hold anything a Tcl list would mangle)."""
        return self._iids.setdefault(name, f"f{len(self._iids)}")

    def colour(self, tones: dict[str, str]) -> None:
        """Colour the rows by state with the theme's text tones."""
        for state, tone in (("failed", "error"), ("downloading", "info"), ("done", "ok")):
            if tone in tones:
                self.tree.tag_configure(state, foreground=tones[tone])

    def _toggle(self) -> None:
        shown = bool(self.tree.winfo_ismapped())
        for widget in (self.tree, self.scroll):
            if shown:
                widget.grid_remove()
            else:
                widget.grid()
        self.toggle.configure(text="Show files" if shown else "Hide files")



class TransferList(ttk.Frame):
    """The transfers of a ``TransferManager``, newest last, in a scrolling list, with their buttons.

    Its buttons act on the manager (Pause, Resume, Cancel, Pause all, Resume
    all, Clear finished); ``open_folder`` opens a finished one's folder,
    ``notify`` says what could not be done, ``server`` names the server
    sending now. Tk thread only.
    """

    def __init__(self, master: tk.Misc, manager: TransferManager, open_folder: Callable[[Path], None],
                 notify: Callable[[str, str], None], server: Callable[[], str]) -> None:
        super().__init__(master, padding=(0, 6, 0, 0))
        self.manager = manager
        self._open_folder, self._notify, self._server = open_folder, notify, server
        self._dirty: set[int] = set()
        self._redraw_id: str | None = None
        bar = ttk.Frame(self, padding=(12, 0, 12, 6))
        bar.grid(row=0, column=0, columnspan=2, sticky="ew")
        self.summary = ttk.Label(bar, text="no transfers", style="Subtitle.TLabel")
        self.summary.pack(side="left")
        self.clear_button = ttk.Button(bar, text="Clear finished", command=lambda: self.bulk_action("clear"))
        self.clear_button.pack(side="right")
        self.resume_all_button = ttk.Button(bar, text="Resume all", command=lambda: self.bulk_action("resume"))
        self.resume_all_button.pack(side="right", padx=6)
        self.pause_all_button = ttk.Button(bar, text="Pause all", command=lambda: self.bulk_action("pause"))
        self.pause_all_button.pack(side="right")
        self.canvas = tk.Canvas(self, highlightthickness=0, borderwidth=0, height=90)
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
        self.inner.bind("<Configure>", lambda _e: self.canvas.configure(scrollregion=self.canvas.bbox("all")))
        self.canvas.bind("<Configure>", lambda e: self.canvas.itemconfigure(self._window, width=e.width))
        self.canvas.bind("<Enter>", lambda _e: self._wheel(True))
        self.canvas.bind("<Leave>", lambda _e: self._wheel(False))
        self.refresh_theme()

    def refresh_theme(self) -> None:
        """Match the canvas to the theme's background; every row is drawn again."""
        self.canvas.configure(background=background(self))
        for row in self.rows.values():
            row.view = None
            if row.files is not None:
                row.files.colour(text_tones(self))

    def add(self, transfers: list[Transfer], scroll: bool = True) -> None:
        """Rows for new transfers, at the bottom, drawn; ``scroll``: show the first of them, whole, at the top."""
        for transfer in transfers:
            self._add_row(transfer)
        if transfers and scroll:
            self.scroll_to(transfers[0].tid)
        self.redraw_all()

    def _add_row(self, transfer: Transfer) -> TransferRow:
        self.empty.grid_remove()
        row = self.rows[transfer.tid] = TransferRow(self.inner, transfer.tid, transfer.name, self.row_action)
        separator = self._separators[transfer.tid] = ttk.Separator(self.inner, orient="horizontal")
        index = 2 * transfer.tid
        separator.grid(row=index, column=0, sticky="ew", padx=12)
        row.grid(row=index + 1, column=0, sticky="ew")
        restyle_tree(row)
        return row

    def scroll_to(self, tid: int) -> None:
        """Scroll so that transfer ``tid``'s row is the top one, whole (the first of a batch just added)."""
        def scroll() -> None:
            self.inner.update_idletasks()
            height = self.inner.winfo_reqheight()
            if tid in self.rows and height > 0:
                self.canvas.configure(scrollregion=(0, 0, self.inner.winfo_reqwidth(), height))
                self.canvas.yview_moveto(self._separators[tid].winfo_y() / height)

        self.canvas.after_idle(scroll)

    def top_row(self) -> int | None:
        """The id of the transfer whose row starts at the top of the view, if any (for tests)."""
        top = self.canvas.canvasy(0)
        starts = {tid: row.winfo_y() for tid, row in self.rows.items()}
        whole = [tid for tid, y in starts.items() if y >= top - 2]
        return min(whole, key=starts.__getitem__) if whole else None

    def _remove(self, tid: int) -> None:
        row = self.rows.pop(tid, None)
        if row is not None:
            row.destroy()
            self._separators.pop(tid).destroy()
        if not self.rows:
            self.empty.grid()

    def progressed(self, tid: int) -> None:
        """Transfer ``tid`` moved on: its row is redrawn soon (at most every ``REDRAW_MS``)."""
        self._dirty.add(tid)
        if self._redraw_id is None:
            self._redraw_id = self.after(REDRAW_MS, self.redraw_dirty)

    def redraw_dirty(self) -> None:
        """Redraw the rows that moved on, and every downloading one (its speed and ETA change with time)."""
        self._redraw_id = None
        manager = self.manager
        self._dirty.update(t.tid for t in manager.transfers.values() if t.state is TransferState.DOWNLOADING)
        self._redraw(self._dirty)
        self._dirty.clear()

    def redraw_all(self) -> None:
        """Redraw every row and the summary."""
        self._redraw(set(self.manager.transfers))

    def _redraw(self, tids: set[int]) -> None:
        manager, server = self.manager, self._server()
        for tid in tids:
            transfer = manager.transfers.get(tid)
            row = self.rows.get(tid)
            if transfer is not None and row is not None:
                view = transfer_view(transfer, manager.speed(transfer), server, manager.max_active)
                row.show(view, allowed_actions(transfer.state))
                if transfer.files:
                    row.show_files(transfer.files, transfer.name)
        self.summary.configure(text=transfers_summary(manager.counts()))

    def row_action(self, tid: int, action: str) -> None:
        """A row's button: pause, resume, cancel, open (the folder)."""
        transfer = self.manager.transfers.get(tid)
        if transfer is None:
            return
        if action == "open":
            self._open_folder(transfer.folder)
            return
        act = {"pause": self.manager.pause, "resume": self.manager.resume, "cancel": self.manager.cancel}[action]
        if not act(tid):
            self._notify(f"{transfer.name}: cannot {action} a transfer that is {transfer.state.value}", "warn")
        self.redraw_all()

    def bulk_action(self, action: str) -> None:
        """Pause all, Resume all, Clear finished."""
        if action == "clear":
            for tid in self.manager.clear_finished():
                self._remove(tid)
        else:
            act = self.manager.pause if action == "pause" else self.manager.resume
            wanted = Action.PAUSE if action == "pause" else Action.RESUME
            for tid, transfer in list(self.manager.transfers.items()):
                if wanted in allowed_actions(transfer.state):
                    act(tid)
        self.redraw_all()

    def stop(self) -> None:
        """Draw no more (the window closes)."""
        if self._redraw_id is not None:
            self.after_cancel(self._redraw_id)
            self._redraw_id = None

    def _wheel(self, bound: bool) -> None:
        for event in ("<MouseWheel>", "<Button-4>", "<Button-5>"):
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
        super().__init__(master, padding=(12, 8, 12, 6))
        self.seeding_enabled = seeding_enabled
        self.strip = TileStrip(self, {"status": "Seeding", "files": "Files seeded", "uploaded": "Uploaded",
                                      "peers": "Peers served"})
        self.strip.grid(row=0, column=0, columnspan=2, sticky="ew", pady=(0, 6))
        self.files = SortableTable(self, SEEDED_COLUMNS, height=2)
        self.files.grid(row=1, column=0, sticky="nsew", padx=(0, 14))
        limits = ttk.LabelFrame(self, text="Speed limits (KiB/s, 0 = unlimited)", padding=(10, 4, 10, 6))
        limits.grid(row=1, column=1, sticky="nsew")
        self.upload_var = tk.StringVar(self)
        self.download_var = tk.StringVar(self)
        self.upload_box = self._limit_field(limits, 0, "Upload", self.upload_var, on_apply)
        self.download_box = self._limit_field(limits, 1, "Download", self.download_var, on_apply)
        self.apply_button = ttk.Button(limits, text="Apply", command=on_apply)
        self.apply_button.grid(row=0, column=2, rowspan=2, sticky="ns", padx=(10, 0), pady=2)
        self.message = ttk.Label(limits, text="", style="Caption.TLabel", wraplength=280, justify="left")
        self.message.grid(row=2, column=0, columnspan=3, sticky="w", pady=(4, 0))
        if not seeding_enabled:
            self.upload_box.state(["disabled"])
        self.columnconfigure(0, weight=1)
        self.rowconfigure(1, weight=1)

    @staticmethod
    def _limit_field(master: tk.Misc, row: int, label: str, variable: tk.StringVar,
                     on_apply: Callable[[], None]) -> ttk.Spinbox:
        ttk.Label(master, text=label).grid(row=row, column=0, sticky="w", padx=(0, 8), pady=2)
        box = ttk.Spinbox(master, from_=0, to=MAX_LIMIT_KIB, increment=64, textvariable=variable, width=9)
        box.grid(row=row, column=1, sticky="w", pady=2)
        box.bind("<Return>", lambda _e: on_apply())
        return box

    def set_limits(self, upload_bps: int, download_bps: int) -> None:
        """Show the limits in force."""
        self.upload_var.set(format_limit_kib(upload_bps))
        self.download_var.set(format_limit_kib(download_bps))

    def read_limits(self) -> tuple[int, int]:
        """The limits typed, in bytes/s (upload 0 when not seeding); ``ValueError`` with a message if one is bad."""
        upload = parse_limit_kib(self.upload_var.get(), "Upload limit") if self.seeding_enabled else 0
        return upload, parse_limit_kib(self.download_var.get(), "Download limit")

    def show(self, seeding: dict | None, error: str = "") -> None:
        """Display the seeder's figures and files (``error``: why it could not start)."""
        self.strip.show(seeding_tiles(seeding, self.seeding_enabled, error))
        files = seeding["files"] if seeding else []
        keys = [key for key, *_ in SEEDED_COLUMNS]
        self.files.set_rows([(f"s{index}", *entry_row(entry, keys)) for index, entry in enumerate(files)])

    def say(self, text: str, tone: str) -> None:
        """A message under the limits (``tone`` ok or error)."""
        set_style(self.message, f"{tone}.Message.TLabel")
        self.message.configure(text=text)
