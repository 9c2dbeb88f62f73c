"""The client window: connection, catalog, transfers, seeding, limits, log.

Three layers, as in every MiniTorrent window (DESIGN principle 1):

- plain functions and events (client_logic.py, transfers.py) decide what is
  shown; tests call them without Tk;
- ``ClientController`` does the engine work on other threads and posts what
  came of it: the poller's ``ClientSnapshot`` (the server in use, one try, no
  retries; every second, or after a growing delay when no server answers),
  catalog fetches, the seeder's start, unfinished downloads, the folder
  opener, listening for servers on the LAN (when no configured server
  answers, unless ``discovery: false``) and pinning the one the user
  chooses. Download threads (``TransferManager``) and the engine's
  ``on_progress`` post transfer events; logging posts ``LogLine``s;
- ``ClientWindow``, a ``WindowShell``, composes the panels (client_panels.py)
  and draws each event the pump hands it on the Tk thread.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time
import tkinter as tk
from pathlib import Path
from tkinter import filedialog, ttk
from typing import TYPE_CHECKING, Any, Callable

from error_handler import ConnectionFailed, DownloadError, MiniTorrentError
from minitorrent.common.units import human_size
from minitorrent.gui.base import LogPane, load_settings
from minitorrent.gui.client_logic import (
    CONNECTED_POLL_S,
    CatalogFetched,
    ClientSnapshot,
    Notice,
    SeedingFailed,
    ServerChosen,
    ServersFound,
    UnfinishedFound,
    catalog_due,
    connection_news,
    connection_view,
    discovery_wanted,
    download_folder,
    elide,
    in_folder,
    limits_text,
    plural,
    reconnect_delay,
    saved_limits,
    saved_server,
)
from minitorrent.gui.client_panels import (
    CatalogPanel,
    SeedingPanel,
    ServerChooser,
    StatusLine,
    TransferList,
    configure_client_styles,
)
from minitorrent.gui.pairing import HOW_TO_PAIR, PairDialog, PairingResult, is_not_paired, pairing_failure
from minitorrent.gui.shell import WindowShell, remember_setting, run_window
from minitorrent.gui.transfers import (
    DownloadProgressed,
    TransferEvent,
    TransferFailed,
    TransferFinished,
    TransferManager,
    TransferStopped,
)
from minitorrent.gui.widgets import ErrorBanner
from minitorrent.net.discovery import LISTEN_S, FoundServer, browse

if TYPE_CHECKING:
    from minitorrent.client.engine import ClientEngine

log = logging.getLogger(__name__)

GEOMETRY = "1280x820"
TICK_MS = 250  # countdown and speed refresh
WORKER_JOIN_S = 5.0  # closing waits this long for short workers
OPEN_FOLDER_COMMAND = {"darwin": ["open"], "win32": ["explorer"]}.get(sys.platform, ["xdg-open"])
NOTIFY_TIMEOUT_S = 5.0  # notify-send returns at once; a hung notification daemon must not hold a worker
OPEN_FOLDER_WAIT_S = 5.0  # a file manager that fails says so quickly; one that works may keep running
TRANSFER_EVENTS = (DownloadProgressed, TransferFinished, TransferFailed, TransferStopped)


class ClientController:
    """The client window's engine work, on worker threads; it never touches a widget, it posts events.

    Public methods may be called from the Tk thread: none of them blocks it, except ``close``.
    """

    def __init__(self, engine: ClientEngine, post: Callable[[Any], None]) -> None:
        self.engine = engine
        self.post = post
        self.set_poll_interval: Callable[[float], None] = lambda _seconds: None  # the poller's, once it exists
        self._failures = 0  # polls in a row that found no server (poller thread only)
        self._refreshing = False  # Tk thread only, as is _refresh_again
        self._refresh_again = False
        self._workers: list[threading.Thread] = []

    def in_background(self, work: Callable[[], None], name: str, join: bool = True) -> None:
        """Run ``work`` on a worker thread; a failure is posted as a ``Notice``."""
        thread = threading.Thread(target=self._guarded, args=(work, name), name=f"client-{name}", daemon=True)
        if join:
            self._workers = [t for t in self._workers if t.is_alive()] + [thread]
        thread.start()

    def _guarded(self, work: Callable[[], None], name: str) -> None:
        try:
            work()
        except MiniTorrentError as error:
            self.post(Notice(str(error), "error"))
        except Exception as error:  # a bug: readable here, the traceback in the log
            log.exception("background task %s failed", name)
            self.post(Notice(f"{name} failed unexpectedly: {error!r}", "error"))

    def snapshot(self) -> ClientSnapshot:
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
        self.set_poll_interval(next_poll_s)
        return ClientSnapshot(status, reason, self.engine.seeding_status(), next_poll_s, time.monotonic())

    def refresh_catalog(self, announce: bool) -> None:
        """Fetch the catalog (Tk thread; one fetch at a time, a second request runs after it)."""
        if self._refreshing:
            self._refresh_again = True
            return
        self._refreshing = True
        self.in_background(lambda: self._fetch_catalog(announce), "catalog")

    def catalog_arrived(self) -> bool:
        """A fetch ended (Tk thread); True if another was asked for meanwhile and should run now."""
        self._refreshing = False
        again, self._refresh_again = self._refresh_again, False
        return again

    def _fetch_catalog(self, announce: bool) -> None:
        try:
            entries = self.engine.list_files("")
        except MiniTorrentError as error:
            self.post(CatalogFetched(None, str(error), announce, is_not_paired(error)))
        else:
            self.post(CatalogFetched(entries, announce=announce))

    def pair(self, code: str) -> None:
        """Pair with the server using the operator's code (in a worker); a ``PairingResult`` says how it went."""
        self.in_background(lambda: self._pair(code), "pair")

    def _pair(self, code: str) -> None:
        try:
            server_identity = self.engine.pair(code)
        except MiniTorrentError as error:
            self.post(PairingResult(error=pairing_failure(error)))
        else:
            self.post(PairingResult(server_identity))

    def start(self, seeding: bool) -> None:
        """What a new window asks of the engine: unfinished downloads, the download folder, the seeder."""
        self.in_background(self._find_unfinished, "unfinished")
        self.in_background(self._make_download_dir, "download-dir")
        if seeding:
            self.in_background(self._start_seeding, "seed-start")

    def _start_seeding(self) -> None:
        try:
            self.engine.start_seeding()
        except MiniTorrentError as error:
            self.post(SeedingFailed(str(error)))

    def _make_download_dir(self) -> None:
        """The folder dialog opens in client.download_dir: make sure it exists."""
        folder = self.engine.config.client.download_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self.post(Notice(f"cannot create the download folder {folder}: {error.strerror or error}", "warn"))

    def _find_unfinished(self) -> None:
        unfinished = self.engine.unfinished_downloads()
        if unfinished:
            self.post(UnfinishedFound(unfinished))

    def listen_for_servers(self) -> None:
        """Listen for servers announced on the LAN for ``LISTEN_S`` (in a worker); posts ``ServersFound``."""
        self.in_background(self._listen, "discovery")

    def _listen(self) -> None:
        try:
            found = browse(LISTEN_S)
        except OSError as error:  # no multicast route, no interface: say so, the configured servers still count
            self.post(ServersFound([], f"cannot listen for servers on this network: {error.strerror or error}"))
        else:
            self.post(ServersFound(found))

    def use_server(self, server: FoundServer, settings_file: Path) -> None:
        """Pin ``server``'s identity, ask it from now on and remember it (in a worker); posts ``ServerChosen``."""
        self.in_background(lambda: self._use_server(server, settings_file), "use-server")

    def _use_server(self, server: FoundServer, settings_file: Path) -> None:
        try:
            self.engine.use_server(server.host, server.port, server.identity)
        except MiniTorrentError as error:  # another identity is pinned for that address: refused
            self.post(ServerChosen(server, str(error)))
            return
        remember_setting(settings_file, "server", vars(server))
        self.post(ServerChosen(server))

    def remember(self, settings_file: Path, key: str, value: Any) -> None:
        """Save one window setting (in a worker: it writes a file)."""
        self.in_background(lambda: remember_setting(settings_file, key, value), "settings")

    def open_folder(self, folder: Path) -> None:
        """Open ``folder`` in the file manager (in a worker; a failure is posted)."""
        self.in_background(lambda: self._run_opener(folder), "open-folder", join=False)

    def _run_opener(self, folder: Path) -> None:
        if not folder.is_dir():
            self.post(Notice(f"cannot open {folder}: the folder does not exist yet", "error"))
            return
        command = [*OPEN_FOLDER_COMMAND, str(folder)]
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, start_new_session=True)
        except OSError as error:
            self.post(Notice(f"cannot open {folder}: {command[0]} could not run ({error.strerror or error}); "
                             "open the folder yourself", "error"))
            return
        try:
            _, stderr = process.communicate(timeout=OPEN_FOLDER_WAIT_S)
        except subprocess.TimeoutExpired:
            return  # still running: the file manager is open
        if process.returncode != 0:
            why = (stderr or b"").decode(errors="replace").strip().splitlines()
            self.post(Notice(f"cannot open {folder}: {command[0]} exited with status {process.returncode}"
                             + (f" ({why[-1]})" if why else ""), "error"))

    def close(self) -> None:
        """Interrupt the engine's waits, wait for the workers, close the engine. Blocks."""
        self.engine.interrupt()
        deadline = time.monotonic() + WORKER_JOIN_S
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.engine.close()


class ClientWindow(WindowShell):
    """The client's window over a ``ClientEngine``. Built and used on the Tk thread only.

    ``close()`` (also the window's close button) pauses every download (they
    are offered again next time), stops the poller, closes the engine and
    destroys the root.
    """

    def __init__(self, root: tk.Tk, engine: ClientEngine, settings_file: Path | None = None,
                 max_active: int | None = None) -> None:
        settings_file = settings_file or engine.config.client.data_dir / "window.json"
        super().__init__(root, "client", settings_file, padding=0)
        self.engine = engine
        self.controller = ClientController(engine, self.pump.post)
        self.manager = TransferManager(download_file_or_folder(engine), engine.discard_partial, self.pump.post,
                                       **({"max_active": max_active} if max_active else {}))
        engine.on_progress = lambda progress: self.pump.post(DownloadProgressed(time.monotonic(), progress))
        self.seeding_enabled = engine.seeder is not None
        self.status: dict | None = None  # the server in use, as its last status said; None: no server
        self.seeding_error = ""
        self._last_snapshot: ClientSnapshot | None = None
        self._next_poll_at: float | None = None
        self._catalog_fetched_at: float | None = None
        self.pair_dialog: PairDialog | None = None
        self.not_paired = False  # the server in use refused us: the status line says how to pair
        self._listened = False  # listened for servers on the LAN since a server last answered
        self._build()
        self._use_remembered_server()
        self.open(self.controller.snapshot, CONNECTED_POLL_S)
        self.controller.set_poll_interval = self.poller.set_interval
        self.every(TICK_MS, self._tick)
        self.controller.start(self.seeding_enabled)

    def _build(self) -> None:
        configure_client_styles(self.root)
        self.header.configure(padding=(14, 10, 14, 6))
        self.header.grid(row=0, column=0, sticky="ew")
        self.pair_button = self.header.add_button("Pair with server…", self.open_pair_dialog)
        self.retry_button = self.header.add_button("Retry now", self.retry_now)
        self.retry_button.grid_remove()
        self.header.show("asking the configured servers", "idle", False)
        self.header.show_identity(self.engine.identity.id)  # what a server's operator sees when this client pairs
        self.banner = ErrorBanner(self)
        self.banner.grid(row=1, column=0, sticky="ew", padx=14, pady=(0, 6))
        self.banner.hide()
        self.chooser = ServerChooser(self, self.use_found_server, self.listen_for_servers)
        self.chooser.grid(row=2, column=0, sticky="ew", padx=14, pady=(0, 6))
        self.chooser.grid_remove()  # shown only while no server answers (unless discovery: false)
        ttk.Separator(self, orient="horizontal").grid(row=3, column=0, sticky="ew")
        panes = ttk.PanedWindow(self, orient="vertical")
        panes.grid(row=4, column=0, sticky="nsew")
        self.rowconfigure(4, weight=1)
        self.catalog = CatalogPanel(panes, self.refresh_catalog, self.download_selected, self.download_folder)
        self.tabs = ttk.Notebook(panes, padding=(10, 0, 10, 0))
        panes.add(self.catalog, weight=1)
        panes.add(self.tabs, weight=2)  # a taller window shows more transfers, not more empty catalog
        self.transfers = TransferList(self.tabs, self.manager, self.controller.open_folder, self.notify,
                                      lambda: (self.status or {}).get("server", ""))
        self.seeding_panel = SeedingPanel(self.tabs, self.seeding_enabled, self.apply_limits)
        self.log_pane = LogPane(self.tabs, height=6)
        self.tabs.add(self.transfers, text="Transfers")
        self.tabs.add(self.seeding_panel, text="Seeding & limits")
        self.tabs.add(self.log_pane, text="Log")
        self.status_line = StatusLine(self)
        self.status_line.grid(row=5, column=0, sticky="ew")
        saved = saved_limits(load_settings(self.settings_file))
        if saved is not None:  # what the user set in this window last time wins over the config file
            self.engine.set_limits(*saved)
        upload = self.engine.seeder.upload_limit.rate_bps if self.engine.seeder else 0
        self.seeding_panel.set_limits(upload, self.engine.download_limit.rate_bps)
        self.seeding_panel.show(None)
        self.catalog.search.focus_set()
        self.root.bind("<Control-f>", lambda _e: self.catalog.search.focus_set())
        self.root.bind("<F5>", lambda _e: self.refresh_catalog())

    # Events (Tk thread) -----------------------------------------------------------------------------------

    def handle(self, event: Any) -> None:
        if isinstance(event, TRANSFER_EVENTS):
            self._on_transfer_event(event)
        elif isinstance(event, ClientSnapshot):
            self._on_snapshot(event)
        elif isinstance(event, CatalogFetched):
            self._on_catalog(event)
        elif isinstance(event, Notice):
            self.notify(event.text, event.tone)
        elif isinstance(event, UnfinishedFound):
            self._on_unfinished(event)
        elif isinstance(event, PairingResult):
            self._on_paired(event)
        elif isinstance(event, ServersFound):
            self._on_servers_found(event)
        elif isinstance(event, ServerChosen):
            self._on_server_chosen(event)
        elif isinstance(event, SeedingFailed):
            self.seeding_error = event.reason
            self.notify(f"seeding could not start: {event.reason}", "error")

    def _on_transfer_event(self, event: TransferEvent) -> None:
        transfer = self.manager.handle(event)
        if transfer is None:
            return
        if isinstance(event, DownloadProgressed):
            self.transfers.progressed(transfer.tid)
            return
        self.transfers.redraw_all()
        if isinstance(event, TransferFinished):
            text = f"{transfer.name}: downloaded and verified ({human_size(event.result.size)}) into {transfer.folder}"
            self.notify(text, "ok")
            self.controller.in_background(lambda: desktop_notification("Download finished", text), "notify", False)
            self.refresh_catalog(announce=False)  # its download count went up
        elif isinstance(event, TransferFailed) and self.status is None:  # most likely why: resume when one answers
            transfer.resume_on_reconnect = True
            self.notify(f"{transfer.name}: {transfer.reason}; it resumes when a server answers", "warn")
        elif isinstance(event, TransferFailed):
            self.notify(f"{transfer.name}: {transfer.reason}", "error")
            text = f"{transfer.name}: {transfer.reason}"
            self.controller.in_background(lambda: desktop_notification("Download failed", text), "notify", False)

    def _on_snapshot(self, snapshot: ClientSnapshot) -> None:
        previous, current = self.status, snapshot.status
        first = self._last_snapshot is None
        self._last_snapshot, self.status = snapshot, current
        self._next_poll_at = time.monotonic() + snapshot.next_poll_s
        self._show_connection()
        news = connection_news(previous, current, first, snapshot.reason)
        if news:  # the status line and the header never disagree
            self.notify(*news)
        if current is not None:
            self._listened = False
            self.chooser.grid_remove()
        elif discovery_wanted(self.engine.config.discovery, False, self._listened):
            self.listen_for_servers()
        if current is not None and (previous is None or news):
            self.refresh_catalog(announce=False)
            if self.manager.resume_after_outage():
                self.transfers.redraw_all()
        elif catalog_due(self._catalog_fetched_at, time.monotonic(), current is not None):
            self.refresh_catalog(announce=False)  # new files show by themselves
        self.seeding_panel.show(snapshot.seeding, self.seeding_error)

    def _on_catalog(self, event: CatalogFetched) -> None:
        self._catalog_fetched_at = time.monotonic()
        if event.not_paired:  # said once, not every refresh: the catalog keeps being asked for
            if not self.not_paired:
                self.notify(HOW_TO_PAIR, "warn")
                self.catalog.set_entries([])  # what it listed before (a revoked client) cannot be downloaded
            self.not_paired = True
        elif event.entries is not None:
            self.not_paired = False
            self.catalog.set_entries(event.entries)
            if event.announce:
                self.notify(f"catalog refreshed: {plural(len(event.entries), 'file')}")
        else:
            self.notify(f"could not refresh the catalog: {event.error}", "error")
        if self.controller.catalog_arrived():
            self.refresh_catalog(announce=False)

    def _on_servers_found(self, event: ServersFound) -> None:
        self.chooser.show(event.servers, event.error)
        if self.status is None:
            self.chooser.grid()

    def _on_server_chosen(self, event: ServerChosen) -> None:
        server = event.server
        if event.error:
            self.notify(event.error, "error")
            self.chooser.show(self.chooser.servers)
            return
        self.notify(f"using {server.name} at {server.address}; its identity {server.identity} is pinned", "ok")
        self.retry_now()

    def _on_unfinished(self, event: UnfinishedFound) -> None:
        added = [self.manager.add_paused(name, folder, size, done) for name, folder, size, done in event.downloads]
        found = [transfer for transfer in added if transfer is not None]
        if found:
            self.transfers.add(found, scroll=False)
            self.notify(f"{plural(len(found), 'unfinished download')} from last time: paused, press Resume to continue")

    def notify(self, text: str, tone: str = "info") -> None:
        """Show ``text`` in the status line; an error also in the banner at the top."""
        self.status_line.say(text, tone)
        if tone == "error":
            self.show_error(text)

    # Drawing ----------------------------------------------------------------------------------------------

    def _tick(self) -> None:
        if self.status is None:
            self._show_connection()  # the countdown to the next try
        self.transfers.redraw_dirty()

    def _show_connection(self) -> None:
        snapshot = self._last_snapshot
        if snapshot is None:
            return
        next_try = None if self._next_poll_at is None else self._next_poll_at - time.monotonic()
        view = connection_view(snapshot.status, snapshot.reason, next_try)
        self.header.show(view.headline, view.tone, view.connected)
        if view.connected:
            self.retry_button.grid_remove()
        else:
            self.retry_button.grid()

    def theme_changed(self, theme: str) -> None:
        configure_client_styles(self.root)
        self.transfers.refresh_theme()
        self.transfers.redraw_all()

    # User actions -----------------------------------------------------------------------------------------

    def refresh_catalog(self, announce: bool = True) -> None:
        """Fetch the catalog in a worker; ``announce``: the user asked, the status line says when it is done."""
        if self.closed:
            return
        if announce:
            self.notify("Refreshing the catalog…")
        self.controller.refresh_catalog(announce)

    def download_selected(self) -> None:
        """Ask for a folder and queue a transfer for each selected file."""
        entries = self.catalog.selected_entries()
        if not entries:
            self.notify("Select one or more files in the catalog first (Ctrl+A selects all).", "warn")
            return
        settings = load_settings(self.settings_file)  # a few bytes, read when the user clicks
        start = download_folder(settings.get("download_folder"), self.engine.config.client.download_dir, Path.home())
        folder = filedialog.askdirectory(parent=self.root, title="Download the selected files into…",
                                         initialdir=str(start), mustexist=False)
        if not folder:
            return
        self.controller.remember(self.settings_file, "download_folder", folder)
        added = [self.manager.add(entry["name"], Path(folder), entry["size"]) for entry in entries]
        self.transfers.add([transfer for transfer in added if transfer is not None])
        skipped = [entry["name"] for entry, transfer in zip(entries, added) if transfer is None]
        self.tabs.select(self.transfers)
        message = f"downloading {plural(len(entries) - len(skipped), 'file')} into {folder}"
        if skipped:
            message += f"; already in the list: {', '.join(elide(n, 40) for n in skipped)}"
        self.notify(message, "warn" if skipped else "info")

    def download_folder(self, folder: str) -> None:
        """Ask where, then queue the whole ``folder`` (``photos/``) as one transfer: one progress, and one per file."""
        entries = in_folder(self.catalog.entries, folder)
        if not entries:
            return
        settings = load_settings(self.settings_file)
        start = download_folder(settings.get("download_folder"), self.engine.config.client.download_dir, Path.home())
        target = filedialog.askdirectory(parent=self.root, title=f"Download {folder} into…",
                                         initialdir=str(start), mustexist=False)
        if not target:
            return
        self.controller.remember(self.settings_file, "download_folder", target)
        transfer = self.manager.add(folder, Path(target), sum(entry["size"] for entry in entries),
                                    files=[(entry["name"], entry["size"]) for entry in entries])
        if transfer is None:
            self.notify(f"{folder} is already in the list", "warn")
            return
        self.transfers.add([transfer])
        self.tabs.select(self.transfers)
        self.notify(f"downloading {folder} ({plural(len(entries), 'file')}) into {target}")

    def listen_for_servers(self) -> None:
        """Listen for servers on the LAN in a worker (the chooser's Search again, or no server answers).

        Listening sends mDNS queries (multicast), never an announcement of this client.
        """
        self._listened = True
        self.chooser.listening()
        self.chooser.grid()
        self.controller.listen_for_servers()

    def use_found_server(self, server: FoundServer) -> None:
        """The user chose ``server`` in the chooser: pin it, ask it, remember it (in a worker)."""
        self.notify(f"trying {server.name} at {server.address}…")
        self.controller.use_server(server, self.settings_file)

    def _use_remembered_server(self) -> None:
        """Ask the server chosen in an earlier run too (its identity was pinned then; a small file read)."""
        server = saved_server(load_settings(self.settings_file))
        if server is None:
            return
        try:
            self.engine.use_server(server.host, server.port, server.identity)
        except MiniTorrentError as error:
            self.notify(f"the server chosen last time is not used: {error}", "error")

    def apply_limits(self) -> None:
        """Validate both limit fields, then apply them; a bad value changes nothing."""
        try:
            upload, download = self.seeding_panel.read_limits()
        except ValueError as error:
            self.seeding_panel.say(str(error), "error")
            self.notify(str(error), "error")
            return
        self.engine.set_limits(upload, download)
        self.controller.remember(self.settings_file, "limits", [upload, download])
        self.seeding_panel.set_limits(upload, download)
        text = limits_text(upload, download, self.seeding_enabled)
        self.seeding_panel.say(text, "ok")
        self.notify(text, "ok")

    def open_pair_dialog(self) -> None:
        """Pair with server…: the dialog where the user types the operator's one-time code."""
        if self.pair_dialog is not None and self.pair_dialog.winfo_exists():
            self.pair_dialog.lift()
            return
        self.pair_dialog = PairDialog(self.root, self.controller.pair)

    def _on_paired(self, event: PairingResult) -> None:
        if self.pair_dialog is not None and self.pair_dialog.winfo_exists():
            self.pair_dialog.show_result(event)
        if event.error:
            self.notify(event.error, "error")
            return
        self.not_paired = False
        self.notify(f"paired with the server {event.server_identity}", "ok")
        self.refresh_catalog(announce=False)

    def retry_now(self) -> None:
        """Ask the servers again at once (the Retry now button)."""
        self._next_poll_at = None
        self.poller.poll_now()

    # Closing ----------------------------------------------------------------------------------------------

    def stop_engine(self) -> None:
        """Pause the downloads (kept for next time), then stop the workers and the engine."""
        self.transfers.stop()
        self.engine.interrupt()
        still_running = self.manager.stop_all()
        if still_running:
            log.warning("downloads still stopping at exit: %s", ", ".join(still_running))
        self.controller.close()


def download_file_or_folder(engine: ClientEngine) -> Callable[..., Any]:
    """The transfer manager's download call: a name ending in ``/`` is a folder, one transfer for all of it.

    A folder with files that failed is a failed transfer (saying how many and
    the first reason); running it again fetches only what is missing.
    """
    def download(name: str, folder: Path, cancel: threading.Event) -> Any:
        if not name.endswith("/"):
            return engine.download(name, folder, cancel)
        result = engine.download_folder(name, folder, cancel)
        if result.failed:
            raise DownloadError(f"{len(result.failed)} of {result.files} files failed, first: {result.failed[0]}")
        return result
    return download


def desktop_notification(summary: str, body: str) -> None:
    """A desktop notification through ``notify-send`` where it is installed; nothing (never an error) elsewhere."""
    program = shutil.which("notify-send")
    if program is None:
        return
    try:
        subprocess.run([program, "--app-name=MiniTorrent", summary, body], timeout=NOTIFY_TIMEOUT_S,
                       capture_output=True, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        log.debug("no desktop notification: %s", error)


def run(engine: ClientEngine, root: tk.Tk, settings_file: Path) -> int:
    """Show the client's window until it is closed; the exit status."""
    return run_window(ClientWindow(root, engine, settings_file))
