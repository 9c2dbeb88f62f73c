"""The client window: its plain logic without Tk, then real windows under Xvfb against real servers.

The window tests drive the real widgets (type in the search box, invoke the
buttons) with the folder dialog patched, against in-process servers on port
0. A ``TkThreadGuard`` is installed on every root right after it is created,
and every test ends by asserting that no widget was touched from another
thread.
"""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import (
    LONG_TIMEOUT,
    ROOT,
    SHORT_TIMEOUT,
    TkThreadGuard,
    make_config,
    make_file,
    pump_until,
    wait_until,
    write_config,
)

import minitorrent.gui.client_logic as logic
import minitorrent.gui.client_window as cw
from error_handler import DownloadCancelled, DownloadError
from integrity import sha256_file
from minitorrent.client.downloader import DownloadResult
from minitorrent.client.engine import ClientEngine
from minitorrent.client.progress import Progress
from minitorrent.gui.base import LogLine, fit_text, load_settings, open_root
from minitorrent.gui.client_panels import TransferRow
from minitorrent.gui.shell import TITLES
from minitorrent.gui.transfers import (
    Action,
    DownloadProgressed,
    Transfer,
    TransferManager,
    TransferState,
    allowed_actions,
    describe_sources,
    eta_seconds,
    file_row,
    files_summary,
    transfer_view,
    without_name,
)
from minitorrent.server.backup import BackupServer
from minitorrent.server.main import MainServer

MiB = 1024 * 1024
CHUNK = 256 * 1024
SECRET = "a shared secret for the pair"


# Plain functions: no Tk ----------------------------------------------------------------------------------------------


def entry(name: str, size: int = 10, downloads: int = 0, sha: str = "ab" * 32) -> dict:
    return {"name": name, "size": size, "chunks": 1, "sha256": sha, "downloads": downloads, "added_at": 0.0}


class TestCatalogLogic:
    def test_filter_is_caseless_and_accent_form_proof(self):
        """The search matches any part of the name in any case, whatever the accent's Unicode form."""
        entries = [entry("Beta Café.bin"), entry("alpha.txt"), entry("CAFE-noaccent")]
        assert ["Beta Café.bin"] == [e["name"] for e in logic.filter_entries(entries, "cafe\u0301")]
        assert ["Beta Café.bin"] == [e["name"] for e in logic.filter_entries(entries, "CAFÉ")]
        assert 3 == len(logic.filter_entries(entries, "  "))

    def test_catalog_row_shows_human_units_and_sorts_by_raw_numbers(self):
        """Sizes show in human units but sort by bytes; the SHA-256 is shortened."""
        values, keys = logic.catalog_row(entry("a.bin", size=1536, downloads=4, sha="0123456789abcdef" * 4))
        assert ("a.bin", "1.5 KiB", 1, 4, "0123456789ab") == values
        assert (1536, "0123456789abcdef" * 4) == (keys["size"], keys["sha256"])

    def test_count_text(self):
        """All files, or how many of them the search shows."""
        assert ("12 files", "3 of 12 files", "1 file") == (logic.count_text(12, 12), logic.count_text(3, 12),
                                                           logic.count_text(1, 1))

    def test_elide_keeps_both_ends(self):
        """A long name is cut in the middle, keeping its start and its extension."""
        assert "abcdef…yz.bin" == logic.elide("abcdefghijklmnopqrstuvwxyz.bin", 13)
        assert "short" == logic.elide("short", 13)


class TestLimits:
    @pytest.mark.parametrize("text, expected", [("", 0), ("0", 0), ("512", 512 * 1024), (" 1.5 ", 1536),
                                                ("0,5", 512)])
    def test_valid_limits(self, text, expected):
        """KiB/s as typed (empty or 0: unlimited; a decimal comma is accepted) becomes bytes/s."""
        assert expected == logic.parse_limit_kib(text, "Upload limit")

    @pytest.mark.parametrize("text", ["abc", "-1", "1e12", "nan", "inf", "12 KB"])
    def test_invalid_limits_say_what_is_wanted(self, text):
        """Anything else is refused with a message naming the field and the accepted range."""
        with pytest.raises(ValueError) as raised:
            logic.parse_limit_kib(text, "Upload limit")
        assert str(raised.value).startswith("Upload limit: enter a number of KiB/s from 0 to ")

    def test_format_limit_round_trips(self):
        """A rate shows as the KiB/s text that parses back to it."""
        for rate in (0, 512 * 1024, 1536):
            assert rate == logic.parse_limit_kib(logic.format_limit_kib(rate), "x")
        assert ("512 KiB/s", "unlimited") == (logic.describe_limit(512 * 1024), logic.describe_limit(0))


class TestConnectionLogic:
    def test_main_server(self):
        """The main: its address, role and epoch, in the 'ok' tone."""
        view = logic.connection_view({"server": "main", "role": "active", "epoch": 3, "address": "h:1"})
        assert ("Main server · h:1 · role active · epoch 3", "ok", True) == (view.headline, view.tone, view.connected)

    def test_backup_after_failover(self):
        """The backup is named as such, in the warning tone."""
        view = logic.connection_view({"server": "backup", "role": "active", "epoch": 4, "address": "h:2"})
        assert ("Backup server (failover)", "warn") == (view.server, view.tone)
        assert "epoch 4" in view.detail

    def test_no_server_counts_down(self):
        """With no server: reconnecting, the reason, and the seconds to the next try."""
        view = logic.connection_view(None, "connection refused", 2.6)
        assert ("Reconnecting…", "connection refused · next try in 3 s", False) == (view.server, view.detail,
                                                                                     view.connected)
        assert logic.connection_view(None, "", 0.0).detail == "trying now…"

    def test_server_changed(self):
        """A change is a first answer, another server, or another epoch; losing the server is not one."""
        main, backup = {"server": "main", "epoch": 1}, {"server": "backup", "epoch": 2}
        assert [True, False, True, True, False] == [
            logic.server_changed(None, main), logic.server_changed(main, dict(main)), logic.server_changed(main, backup),
            logic.server_changed(main, {"server": "main", "epoch": 3}), logic.server_changed(main, None)]

    def test_seeding_tiles(self):
        """Seeding on: address, files, uploads and peers; off or failed: says so."""
        seeding = {"running": True, "address": "10.0.0.2:7000", "files": [entry("a")], "partial": 2,
                   "bytes_sent": 3 * MiB, "connections_total": 5, "active_connections": 1, "upload_bps": 0.0,
                   "upload_limit_bps": 512 * 1024, "download_limit_bps": 0}
        tiles = logic.seeding_tiles(seeding, True)
        assert ("on", "peers reach us at 10.0.0.2:7000", "ok") == tiles["status"]
        assert (("1", "+ 2 in part", ""), ("5", "1 connected now", "")) == (tiles["files"], tiles["peers"])
        assert ("3.0 MiB", "0 B/s now · limit 512 KiB/s", "") == tiles["uploaded"]
        assert "off" == logic.seeding_tiles(None, False)["status"][0]
        failed = logic.seeding_tiles({**seeding, "running": False}, True, "port 7000 is taken")
        assert ("failed", "port 7000 is taken", "error") == failed["status"]

    def test_why_no_server_names_each_server_once_in_words(self):
        """The engine's doubled, raw socket wording becomes one short phrase per server."""
        reason = ("no active server: 127.0.0.1:5001: cannot connect to 127.0.0.1:5001: Connection refused; "
                  "127.0.0.1:5002: cannot connect to 127.0.0.1:5002: timed out")
        assert "127.0.0.1:5001 refuses connections; 127.0.0.1:5002 does not answer (timed out)" == \
            logic.why_no_server(reason)

    def test_status_line_news_agrees_with_the_header(self):
        """No server at the start is news (not "Ready."); so are a new server and a lost one; a steady one is not."""
        main = {"server": "main", "epoch": 1, "address": "h:1"}
        refused = "no active server: h:1: cannot connect to h:1: Connection refused"
        assert [("no server answers yet (h:1 refuses connections); the window keeps trying", "warn"),
                ("connected to the main server at h:1 (epoch 1)", "ok"),
                ("lost the server; downloads wait and resume when a server answers", "warn"),
                None, None] == [logic.connection_news(None, None, True, refused),
                                logic.connection_news(None, main, False, ""),
                                logic.connection_news(main, None, False, refused),
                                logic.connection_news(main, dict(main), False, ""),
                                logic.connection_news(None, None, False, refused)]

    def test_catalog_is_due_every_few_seconds_while_connected(self):
        """A connected window fetches the catalog again after CATALOG_REFRESH_S; never while disconnected."""
        every = logic.CATALOG_REFRESH_S
        assert [True, False, True, False] == [logic.catalog_due(None, 10.0, True),
                                              logic.catalog_due(10.0, 10.0 + every / 2, True),
                                              logic.catalog_due(10.0, 10.0 + every, True),
                                              logic.catalog_due(None, 10.0, False)]

    def test_folder_picker_opens_somewhere_that_exists(self, tmp_path):
        """The picker opens in the last folder used, else the download folder, else home: never a missing one."""
        last, default, home = tmp_path / "last", tmp_path / "downloads", tmp_path / "home"
        assert home == logic.download_folder(str(last), default, home)
        default.mkdir()
        assert default == logic.download_folder(str(last), default, home)
        assert default == logic.download_folder(None, default, home)
        last.mkdir()
        assert last == logic.download_folder(str(last), default, home)

    def test_reconnect_backs_off_to_a_cap(self):
        """1, 2, 3, 5, 5... seconds between tries while no server answers."""
        assert [1, 2, 3, 5, 5, 5] == [logic.reconnect_delay(n) for n in range(1, 7)]


class TestFitText:
    def test_fits_by_cutting_the_middle(self):
        """A name too wide loses its middle to an ellipsis, keeping its start and its extension."""
        shown = fit_text("holiday photos from the summer.bin", 15, len)
        assert (15, "holiday", ".bin") == (len(shown), shown[:7], shown[-4:])
        assert "…" in shown

    def test_a_name_that_fits_is_untouched(self):
        """Nothing is cut when the whole name fits."""
        assert "short.txt" == fit_text("short.txt", 9, len)


class TestTitles:
    def test_every_window_is_titled_in_one_form(self):
        """The three windows' titles read "MiniTorrent — <what it is>"."""
        assert {"main": "MiniTorrent — Main server", "backup": "MiniTorrent — Backup server",
                "client": "MiniTorrent — Client"} == TITLES


class TestEta:
    def test_eta(self):
        """Remaining bytes over speed; 0 when done; unknown without speed."""
        assert (5.0, 0.0, None) == (eta_seconds(500, 100.0), eta_seconds(0, 0.0), eta_seconds(10, 0.0))

    def test_sources(self):
        """Who sent the bytes: the named server alone, or its share beside the peers'."""
        assert "" == describe_sources({})
        assert "from backup server" == describe_sources({"server": 10}, "backup")
        assert "from server 75% · 2 peers 25%" == describe_sources({"server": 75, "peer a:1": 20, "peer b:2": 5})
        assert "from 1 peer 100%" == describe_sources({"peer a:1": 5})

    def test_reason_without_the_repeated_name(self):
        """An engine message starting with the file's name loses that prefix: the row names the file."""
        assert "no such file" == without_name("a.bin: a.bin: no such file", "a.bin")


class TestTransferRows:
    def test_downloading_row(self):
        """Sizes, speed, ETA and sources; the percent is rounded down."""
        transfer = Transfer(1, "a.bin", Path("/x"), total_bytes=4 * MiB, done_bytes=MiB - 1,
                            state=TransferState.DOWNLOADING, sources={"server": MiB})
        view = transfer_view(transfer, 1.5 * MiB, "main")
        assert ("24.9%", "downloading", "active") == (view.percent_text, view.state_text, view.tone)
        assert "1024.0 KiB of 4.0 MiB · 1.5 MiB/s · ETA 0:02 · from main server" == view.detail

    def test_failed_row_names_the_reason(self):
        """A failed transfer says why and that Resume continues."""
        view = transfer_view(Transfer(1, "a", Path("/x"), 10, 5, TransferState.FAILED, reason="disk full"), 0.0)
        assert ("failed", "error") == (view.state_text, view.tone)
        assert view.detail.startswith("failed: disk full · Resume")

    def test_actions_per_state(self):
        """Only the actions that make sense are offered."""
        assert {Action.PAUSE, Action.CANCEL} == allowed_actions(TransferState.DOWNLOADING)
        assert {Action.RESUME, Action.CANCEL} == allowed_actions(TransferState.PAUSED)
        assert set() == allowed_actions(TransferState.DONE)

    def test_summary(self):
        """The transfers' header counts them by state."""
        counts = {TransferState.DOWNLOADING: 2, TransferState.DONE: 1}
        assert "2 downloading · 1 done" == logic.transfers_summary(counts)
        assert "no transfers" == logic.transfers_summary({})


class FakeEngine:
    """Downloads that wait for their gate (or a cancel), so a test controls when each ends."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.failures: dict[str, str] = {}
        self.running: set[str] = set()
        self.discarded: list[str] = []
        self._lock = threading.Lock()

    def gate(self, name: str) -> threading.Event:
        with self._lock:
            return self.gates.setdefault(name, threading.Event())

    def download(self, name: str, folder: Path, cancel: threading.Event) -> DownloadResult:
        with self._lock:
            self.running.add(name)
        try:
            while not self.gate(name).wait(0.01):
                if cancel.is_set():
                    raise DownloadCancelled(f"{name}: stopped")
            if name in self.failures:
                raise DownloadError(f"{name}: {self.failures[name]}")
            return DownloadResult(name, folder / name, "downloaded", 10, 10, 0, 0.5, None)
        finally:
            with self._lock:
                self.running.discard(name)

    def discard(self, name: str, folder: Path) -> None:
        self.discarded.append(name)


class Driven:
    """A TransferManager over a FakeEngine, its events handled on the test's thread."""

    def __init__(self, max_active: int = 2) -> None:
        self.engine = FakeEngine()
        self.events: queue.Queue = queue.Queue()
        self.manager = TransferManager(self.engine.download, self.engine.discard, self.events.put, max_active)

    def until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + SHORT_TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            try:
                self.manager.handle(self.events.get(timeout=0.05))
            except queue.Empty:
                pass

    def states(self) -> list[str]:
        return [t.state.value for t in self.manager.transfers.values()]


class TestTransferManager:
    def test_at_most_max_active_run_the_rest_queue(self):
        """Three files with two slots: two download, one waits, and starts when a slot frees."""
        driven = Driven(max_active=2)
        for name in ("a", "b", "c"):
            driven.manager.add(name, Path("/dl"), 10)
        assert ["downloading", "downloading", "queued"] == driven.states()
        wait_until(lambda: driven.engine.running == {"a", "b"}, SHORT_TIMEOUT, "two downloads")
        driven.engine.gate("a").set()
        driven.until(lambda: driven.states() == ["done", "downloading", "downloading"], "c to start")
        driven.engine.gate("b").set()
        driven.engine.gate("c").set()
        driven.until(lambda: driven.states() == ["done"] * 3, "all done")
        assert 3 == len(driven.manager.clear_finished()) and not driven.manager.transfers

    def test_pause_keeps_then_resume_runs_again(self):
        """Pause stops the thread (nothing discarded); Resume queues it and it completes."""
        driven = Driven()
        tid = driven.manager.add("a", Path("/dl"), 10).tid
        assert driven.manager.pause(tid)
        assert "pausing…" == driven.manager.transfers[tid].state.value
        driven.until(lambda: driven.states() == ["paused"], "the pause")
        assert driven.manager.resume(tid)
        driven.engine.gate("a").set()
        driven.until(lambda: driven.states() == ["done"], "the resumed download")
        assert [] == driven.engine.discarded

    def test_cancel_discards_running_and_paused(self):
        """Cancel drops the partial data, whether the transfer was running or paused."""
        driven = Driven()
        running = driven.manager.add("a", Path("/dl"), 10).tid
        paused = driven.manager.add("b", Path("/dl"), 10).tid
        driven.manager.pause(paused)
        driven.until(lambda: driven.manager.transfers[paused].state is TransferState.PAUSED, "the pause")
        driven.manager.cancel(running)
        driven.manager.cancel(paused)
        driven.until(lambda: driven.states() == ["cancelled", "cancelled"], "both cancelled")
        assert ["a", "b"] == sorted(driven.engine.discarded)

    def test_failure_keeps_the_reason_and_may_resume(self):
        """A failed download shows its reason (without the name) and Resume tries again."""
        driven = Driven()
        driven.engine.failures["a"] = "disk full"
        tid = driven.manager.add("a", Path("/dl"), 10).tid
        driven.engine.gate("a").set()
        driven.until(lambda: driven.states() == ["failed"], "the failure")
        assert "disk full" == driven.manager.transfers[tid].reason
        del driven.engine.failures["a"]
        driven.manager.resume(tid)
        driven.until(lambda: driven.states() == ["done"], "the retry")

    def test_one_unfinished_transfer_per_name(self):
        """The same file cannot be queued twice while the first is unfinished."""
        driven = Driven()
        assert driven.manager.add("a", Path("/dl")) is not None
        assert driven.manager.add("a", Path("/other")) is None
        driven.manager.stop_all()

    def test_a_folder_transfer_follows_each_file(self):
        """A folder transfer keeps one progress per file: a big file's own reports, the folder's per-file news."""
        driven = Driven()
        folder = driven.manager.add("p/", Path("/dl"), 130, files=[("p/b.raw", 100), ("p/a.txt", 10), ("p/c.txt", 20)])
        at = time.monotonic()
        driven.manager.handle(DownloadProgressed(at, Progress("p/", 130, 30, 30, 2, 3,
                                                              files=(("p/a.txt", "done"), ("p/c.txt", "failed")))))
        driven.manager.handle(DownloadProgressed(at, Progress("p/b.raw", 100, 40, 40, 2, 5)))
        files = folder.files
        assert ["p/a.txt", "p/b.raw", "p/c.txt"] == list(files)
        assert [("done", 10), ("downloading", 40), ("failed", 0)] == [(f.state, f.done_bytes) for f in files.values()]
        assert (50, "1 of 3 files done · 1 downloading · 1 failed") == (folder.done_bytes, files_summary(files))
        assert ("b.raw", "100 B", "40.0%", "downloading") == file_row(files["p/b.raw"], "p/")
        driven.engine.gate("p/").set()
        driven.until(lambda: driven.states() == ["done"], "the folder to finish")
        assert ["done"] * 3 == [f.state for f in files.values()]

    def test_progress_updates_the_running_transfer(self):
        """Progress events move the running transfer of that name."""
        driven = Driven()
        transfer = driven.manager.add("a", Path("/dl"))
        driven.manager.handle(DownloadProgressed(time.monotonic(), Progress("a", 100, 40, 40, 2, 5,
                                                                           {"server": 40})))
        assert (100, 40, 40.0) == (transfer.total_bytes, transfer.done_bytes, transfer.percent)
        assert [] == driven.manager.stop_all()


# Real windows --------------------------------------------------------------------------------------------------------


class Harness:
    """One open client window with its guard; ``close`` is idempotent."""

    def __init__(self, config_path: Path, geometry: str = cw.GEOMETRY) -> None:
        from config_loader import load_config

        self.config = load_config(config_path)
        self.settings_file = self.config.client.data_dir / "window.json"
        self.root = open_root(TITLES["client"], geometry, self.settings_file)
        self.guard = TkThreadGuard(self.root)  # before any widget exists
        self.engine = ClientEngine(self.config)
        self.window = cw.ClientWindow(self.root, self.engine, self.settings_file)

    def pump(self, condition: Callable[[], object], what: str, timeout: float = LONG_TIMEOUT):
        """``pump_until``; on a timeout the message also tells where every transfer stands."""
        try:
            return pump_until(self.root, condition, timeout, what)
        except AssertionError as error:
            where = [(t.name, t.state.value, t.done_bytes, t.reason) for t in self.window.manager.transfers.values()]
            raise AssertionError(f"{error}; transfers: {where}") from None

    def connected(self) -> None:
        self.pump(lambda: self.window.catalog.entries and self.window.status is not None,
                  "the window to connect and list the catalog", SHORT_TIMEOUT * 2)

    def close(self) -> None:
        self.window.close()

    def transfer(self, name: str) -> Transfer:
        return next(t for t in self.window.manager.transfers.values() if t.name == name)

    def row(self, name: str) -> TransferRow:
        return self.window.transfers.rows[self.transfer(name).tid]

    def download(self, names: list[str], folder: Path, monkeypatch) -> dict:
        """Select ``names`` in the catalog and click Download Selected, the folder dialog answering ``folder``.

        Returns what the window asked the dialog (title, initialdir...).
        """
        asked = {}

        def askdirectory(**options):
            asked.update(options)
            return str(folder)

        monkeypatch.setattr(cw.filedialog, "askdirectory", askdirectory)
        tree = self.window.catalog.table.tree
        tree.selection_set([self.window.catalog.iid_of(name) for name in names])
        self.window.catalog.download_button.invoke()
        assert "Download the selected files into…" == asked["title"]
        return asked


@pytest.fixture
def harness(display):
    """Open client windows (``open(config_path)``); each is closed after the test."""
    opened: list[Harness] = []

    def open_window(config_path: Path, geometry: str = cw.GEOMETRY) -> Harness:
        harness = Harness(config_path, geometry)
        opened.append(harness)
        return harness

    yield open_window
    for harness in opened:
        harness.close()


@pytest.fixture
def shared(server_factory, tmp_path):
    """A main server sharing a few files (256 KiB chunks); returns (engine, client config path, files)."""
    engine = server_factory({"transfer": {"chunk_size": CHUNK}})
    files = {path.name: path for path in (
        make_file(tmp_path / "src" / "alpha report.txt", 3000, seed=1),
        make_file(tmp_path / "src" / "Beta Café.bin", 5 * CHUNK + 1, seed=2),
        make_file(tmp_path / "src" / "gamma.iso", 3 * MiB + 5, seed=3),
        make_file(tmp_path / "src" / "big.bin", 32 * MiB, seed=4),
    )}
    for path in files.values():
        engine.add_file(path)
    return engine, client_config(tmp_path / "cli", engine.server.address), files


def client_config(folder: Path, main: tuple[str, int], backup: tuple[str, int] | None = None,
                  overrides: dict | None = None) -> Path:
    from conftest import deep_merge

    servers = {"main": {"host": main[0], "port": main[1]}}
    if backup:
        servers["backup"] = {"host": backup[0], "port": backup[1]}
    return write_config(folder, deep_merge({"server": servers, "transfer": {"io_timeout": 2.0}}, overrides or {}))


def shown_names(window: cw.ClientWindow) -> list[str]:
    return sorted(window.catalog.visible_names())


class TestCatalogWindow:
    @pytest.mark.timeout(60)
    def test_typing_filters_the_rows(self, harness, shared):
        """Typing in the search box filters the rows as you type; clearing it shows all again."""
        _, config, files = shared
        h = harness(config)
        h.connected()
        assert sorted(files) == shown_names(h.window)
        search = h.window.catalog.search
        search.insert("end", "ca")
        h.pump(lambda: shown_names(h.window) == ["Beta Café.bin"], "the filter on 'ca'")
        assert "1 of 4 files" == h.window.catalog.count.cget("text")
        search.insert("end", "fÉ")
        assert ["Beta Café.bin"] == shown_names(h.window)
        search.delete(0, "end")
        h.pump(lambda: shown_names(h.window) == sorted(files), "every row back")
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_enter_and_refresh_fetch_new_files(self, harness, shared, tmp_path):
        """A file added on the server appears after Enter in the search box (or Refresh)."""
        engine, config, _ = shared
        h = harness(config)
        h.connected()
        engine.add_file(make_file(tmp_path / "src" / "delta.txt", 10, seed=9))
        h.window.catalog.search.event_generate("<Return>")
        h.pump(lambda: "delta.txt" in shown_names(h.window), "the new file after Enter")
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_refresh_says_when_it_is_done(self, harness, shared):
        """F5 says "Refreshing the catalog…", then the status line says it is refreshed (it used to stick)."""
        _, config, _ = shared
        h = harness(config)
        h.connected()
        h.root.event_generate("<F5>")
        assert h.window.status_line.cget("text").endswith("Refreshing the catalog…")
        h.pump(lambda: h.window.status_line.cget("text").endswith("catalog refreshed: 4 files"), "the refresh's end")
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_new_files_show_by_themselves_in_order(self, harness, shared, tmp_path):
        """Files added on the server appear with no click, in name order, not appended at the bottom."""
        engine, config, files = shared
        h = harness(config)
        h.connected()
        for name in ("aardvark.txt", "delta.txt"):
            engine.add_file(make_file(tmp_path / "src" / name, 10, seed=9))
        wanted = sorted([*files, "aardvark.txt", "delta.txt"], key=str.casefold)
        h.pump(lambda: h.window.catalog.visible_names() == wanted, "the new files in order", SHORT_TIMEOUT)
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_heading_names_the_client_as_the_title_does(self, harness, shared):
        """The window's title and big heading both say it is the client; the server in use is on the line under."""
        _, config, _ = shared
        h = harness(config)
        h.connected()
        assert (TITLES["client"], TITLES["client"]) == (h.root.title(), h.window.header.title.cget("text"))
        assert h.window.header.headline.cget("text").startswith("Main server · ")
        h.pump(lambda: "connected to the main server at" in h.window.status_line.cget("text"),
               "the status line to agree with the header")
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_long_names_are_elided_not_clipped(self, harness, shared, tmp_path, monkeypatch):
        """A name wider than its column or row is shown with an ellipsis in the middle, its end kept."""
        engine, config, _ = shared
        long_name = "a very long name " * 12 + "end.bin"
        engine.add_file(make_file(tmp_path / "src" / long_name, 10, seed=5))
        h = harness(config)
        h.pump(lambda: long_name in h.window.catalog.entries.__repr__(), "the long name listed")
        table = h.window.catalog.table
        iid = h.window.catalog.iid_of(long_name)
        h.pump(lambda: "…" in table.tree.set(iid, "name"), "the name elided in the table")
        assert (long_name, True) == (table.full_name(iid), table.tree.set(iid, "name").endswith("end.bin"))
        h.download([long_name], tmp_path / "dl", monkeypatch)
        label = h.row(long_name).name_label
        h.pump(lambda: "…" in label.cget("text"), "the name elided in its transfer row")
        assert label.cget("text").endswith("end.bin")
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_no_server_at_start_is_said_in_the_status_line_too(self, harness, tmp_path):
        """With no server, the header reconnects and the status line says so (not "Ready."), in words."""
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        h = harness(client_config(tmp_path / "cli", ("127.0.0.1", port)))
        h.pump(lambda: "no server answers yet" in h.window.status_line.cget("text"), "the status line")
        headline = h.window.header.headline.cget("text")
        assert headline.startswith(f"Reconnecting… · 127.0.0.1:{port} refuses connections · "), headline
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_sorting_and_ctrl_a(self, harness, shared):
        """A column heading sorts by raw values; Ctrl+A in the table selects every row."""
        _, config, _ = shared
        h = harness(config)
        h.connected()
        catalog = h.window.catalog
        catalog.table.sort_by("size")
        assert ["alpha report.txt", "Beta Café.bin", "gamma.iso", "big.bin"] == catalog.visible_names()
        catalog.table.sort_by("size")
        assert "big.bin" == catalog.visible_names()[0]
        catalog.table.tree.focus_set()
        catalog.table.tree.event_generate("<Control-a>")
        assert 4 == len(catalog.selected_entries())
        assert "Download Selected (4)" == catalog.download_button.cget("text")
        assert [] == h.guard.violations

    @pytest.mark.timeout(30)
    def test_download_without_selection_explains(self, harness, shared):
        """Download Selected with nothing selected says what to do, and asks for no folder."""
        _, config, _ = shared
        h = harness(config)
        h.connected()
        h.window.catalog.download_button.invoke()
        assert "Select one or more files" in h.window.status_line.cget("text")
        assert {} == h.window.manager.transfers


class TestDownloads:
    @pytest.mark.timeout(90)
    def test_download_selected_reaches_100_percent_byte_exact(self, harness, shared, tmp_path, monkeypatch):
        """Selected files download into the chosen folder; rows reach 100% done; SHA-256 match."""
        _, config, files = shared
        h = harness(config)
        h.connected()
        names = ["alpha report.txt", "Beta Café.bin", "gamma.iso"]
        out = tmp_path / "chosen"
        h.download(names, out, monkeypatch)
        assert sorted(names) == sorted(t.name for t in h.window.manager.transfers.values())
        h.pump(lambda: all(h.row(n).percent_label.cget("text") == "100.0%"
                           and h.row(n).state_label.cget("text") == "done" for n in names), "three rows at 100%")
        for name in names:
            assert sha256_file(files[name]) == sha256_file(out / name)
            assert not (out / (name + ".part")).exists()
            assert str(h.row(name).bar.cget("value")) in ("100", "100.0")
        assert "3 done" == h.window.transfers.summary.cget("text")
        h.pump(lambda: all(e["downloads"] == 1 for e in h.window.catalog.entries if e["name"] in names),
               "the catalog's download counts to follow")
        assert [] == h.guard.violations

    @pytest.mark.timeout(120)
    def test_pause_then_resume_completes_byte_exact(self, harness, shared, tmp_path, monkeypatch):
        """Pause stops a slow download keeping its verified chunks; Resume finishes it byte-exact."""
        engine, config, files = shared
        engine.set_upload_limit(4 * MiB)  # 32 MiB: about 8 s, plenty of time to pause it midway
        h = harness(config)
        h.connected()
        out = tmp_path / "dl"
        h.download(["big.bin"], out, monkeypatch)
        h.pump(lambda: h.transfer("big.bin").done_bytes >= 2 * CHUNK, "some progress")
        h.row("big.bin").pause_button.invoke()
        h.pump(lambda: h.transfer("big.bin").state is TransferState.PAUSED, "the pause")
        paused_at = h.transfer("big.bin").done_bytes
        assert 0 < paused_at < 32 * MiB
        assert (out / "big.bin.part").exists() and not (out / "big.bin").exists()
        assert "paused" == h.row("big.bin").state_label.cget("text")
        assert not h.row("big.bin").pause_button.winfo_ismapped()
        engine.set_upload_limit(0)
        h.row("big.bin").resume_button.invoke()
        h.pump(lambda: h.transfer("big.bin").state is TransferState.DONE, "the resumed download")
        assert sha256_file(files["big.bin"]) == sha256_file(out / "big.bin")
        assert 0 < h.transfer("big.bin").result.resumed_chunks
        assert [] == h.guard.violations

    @pytest.mark.timeout(90)
    def test_cancel_removes_the_part_file(self, harness, shared, tmp_path, monkeypatch):
        """Cancel stops the download and deletes its .part file; the row says cancelled."""
        engine, config, _ = shared
        engine.set_upload_limit(2 * MiB)
        h = harness(config)
        h.connected()
        out = tmp_path / "dl"
        h.download(["big.bin"], out, monkeypatch)
        h.pump(lambda: (out / "big.bin.part").exists() and h.transfer("big.bin").done_bytes > 0, "a .part file")
        h.row("big.bin").cancel_button.invoke()
        h.pump(lambda: h.transfer("big.bin").state is TransferState.CANCELLED, "the cancel")
        assert not (out / "big.bin.part").exists() and not (out / "big.bin").exists()
        assert "cancelled" == h.row("big.bin").state_label.cget("text")
        assert [] == h.engine.unfinished_downloads()
        assert [] == h.guard.violations

    @pytest.mark.timeout(90)
    def test_more_files_than_slots_queue(self, harness, shared, tmp_path, monkeypatch):
        """With more files than download slots, the extra ones wait queued, then all complete."""
        engine, config, files = shared
        engine.set_upload_limit(8 * MiB)
        h = harness(config)
        h.window.manager.max_active = 2
        h.connected()
        out = tmp_path / "dl"
        h.download(sorted(files), out, monkeypatch)
        assert 2 == h.window.manager.running_count()
        assert "queued" in [h.row(n).state_label.cget("text") for n in files]
        engine.set_upload_limit(0)
        h.pump(lambda: all(h.transfer(n).state is TransferState.DONE for n in files), "all four done")
        assert all(sha256_file(files[n]) == sha256_file(out / n) for n in files)
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_a_failure_is_a_readable_message(self, harness, shared, tmp_path, monkeypatch):
        """A download that cannot finish says why in its row and in the window, no traceback."""
        _, config, _ = shared
        out = tmp_path / "dl"
        make_file(out / "alpha report.txt", 5, seed=7)  # a different file is in the way: never overwritten
        h = harness(config)
        h.connected()
        h.download(["alpha report.txt"], out, monkeypatch)
        h.pump(lambda: h.transfer("alpha report.txt").state is TransferState.FAILED, "the failure")
        row = h.row("alpha report.txt")
        assert "failed" == row.state_label.cget("text")
        assert "already exists with different content" in row.detail_label.cget("text")
        assert "already exists with different content" in h.window.banner.text
        assert row.resume_button.winfo_ismapped()
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_unfinished_downloads_come_back_paused(self, harness, shared, tmp_path, monkeypatch):
        """A download paused when the window closed is listed paused next time, and Resume finishes it."""
        engine, config, files = shared
        engine.set_upload_limit(4 * MiB)
        first = harness(config)
        first.connected()
        out = tmp_path / "dl"
        first.download(["big.bin"], out, monkeypatch)
        first.pump(lambda: first.transfer("big.bin").done_bytes >= 2 * CHUNK, "some progress")
        first.close()
        engine.set_upload_limit(0)
        second = harness(config)
        second.pump(lambda: second.window.manager.transfers, "the unfinished download listed")
        assert TransferState.PAUSED is second.transfer("big.bin").state
        assert 0 < second.transfer("big.bin").done_bytes
        second.row("big.bin").resume_button.invoke()
        second.pump(lambda: second.transfer("big.bin").state is TransferState.DONE, "the resumed download")
        assert sha256_file(files["big.bin"]) == sha256_file(out / "big.bin")
        assert [] == first.guard.violations + second.guard.violations

    @pytest.mark.timeout(60)
    def test_folder_picker_opens_where_the_last_download_went(self, harness, shared, tmp_path, monkeypatch):
        """The first picker opens in client.download_dir; the next one in the folder chosen the first time."""
        _, config, _ = shared
        h = harness(config)
        h.connected()
        first = h.download(["alpha report.txt"], tmp_path / "chosen", monkeypatch)
        wait_until(lambda: load_settings(h.settings_file).get("download_folder"), SHORT_TIMEOUT, "the folder kept")
        h.pump(lambda: h.transfer("alpha report.txt").state is TransferState.DONE, "the download")
        second = h.download(["gamma.iso"], tmp_path / "other", monkeypatch)
        assert (str(h.config.client.download_dir), str(tmp_path / "chosen")) == (first["initialdir"],
                                                                                  second["initialdir"])
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_open_folder_failure_is_shown(self, harness, shared, tmp_path, monkeypatch):
        """Open folder runs the opener in a subprocess; if it cannot run, the window says so."""
        _, config, _ = shared
        h = harness(config)
        h.connected()
        out = tmp_path / "dl"
        h.download(["alpha report.txt"], out, monkeypatch)
        h.pump(lambda: h.transfer("alpha report.txt").state is TransferState.DONE, "the download")
        monkeypatch.setattr(cw, "OPEN_FOLDER_COMMAND", ["no-such-file-manager-here"])
        h.row("alpha report.txt").open_button.invoke()
        h.pump(lambda: "no-such-file-manager-here could not run" in h.window.status_line.cget("text"),
               "the error message")
        monkeypatch.setattr(cw, "OPEN_FOLDER_COMMAND", [sys.executable, "-c", "import sys; sys.exit(3)"])
        h.row("alpha report.txt").open_button.invoke()
        h.pump(lambda: "exited with status 3" in h.window.status_line.cget("text"), "the exit status shown")
        assert [] == h.guard.violations


class TestResponsiveness:
    @pytest.mark.timeout(120)
    def test_tk_answers_within_a_second_while_64_mib_download(self, harness, server_factory, tmp_path,
                                                               monkeypatch):
        """While a 64 MiB file downloads, an after(0) call is always answered within 1 s."""
        engine = server_factory()
        source = make_file(tmp_path / "src" / "huge.bin", 64 * MiB, seed=5)
        engine.add_file(source)
        h = harness(client_config(tmp_path / "cli", engine.server.address))
        h.connected()
        h.download(["huge.bin"], tmp_path / "dl", monkeypatch)
        latencies = []
        while h.transfer("huge.bin").state is not TransferState.DONE:
            answered = []
            asked_at = time.monotonic()
            h.root.after(0, lambda: answered.append(time.monotonic()))
            h.pump(lambda: answered, "the after(0) answer", LONG_TIMEOUT)
            latencies.append(answered[0] - asked_at)
            assert h.transfer("huge.bin").state is not TransferState.FAILED, h.transfer("huge.bin").reason
        assert max(latencies) < 1.0, f"worst {max(latencies):.3f} s over {len(latencies)} samples"
        assert sha256_file(source) == sha256_file(tmp_path / "dl" / "huge.bin")
        assert [] == h.guard.violations


class TestConnection:
    @pytest.mark.timeout(60)
    def test_server_gone_shows_reconnecting_with_a_countdown(self, harness, shared):
        """When the server stops, the indicator says reconnecting, counts down, and offers Retry now."""
        engine, config, _ = shared
        h = harness(config)
        h.connected()
        headline = h.window.header.headline
        assert headline.cget("text").startswith("Main server · ") and "epoch 1" in headline.cget("text")
        engine.stop()
        h.pump(lambda: headline.cget("text").startswith("Reconnecting…"), "the reconnecting indicator")
        h.pump(lambda: "next try in" in headline.cget("text"), "the countdown")
        assert h.window.retry_button.winfo_ismapped()
        h.window.retry_button.invoke()
        assert [] == h.guard.violations

    @pytest.mark.timeout(90)
    def test_indicator_switches_to_the_backup_after_failover(self, harness, tmp_path):
        """Main and backup share a secret; the main's engine stops; the indicator switches to the backup."""
        heartbeat = {"heartbeat_interval": 0.3, "heartbeat_timeout": 1.5}
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {
            "secret": SECRET, "backup": {"data_dir": "data", **heartbeat}}}))
        backup_address = backup.start()
        main = MainServer(make_config(tmp_path / "main", {"server": {
            "secret": SECRET, "backup": {"port": backup_address[1], **heartbeat}}}))
        try:
            main_address = main.start()
            main.add_file(make_file(tmp_path / "src" / "shared.bin", 100_000, seed=1))
            wait_until(lambda: backup.catalog.list_files()[1] == 1, LONG_TIMEOUT, "replication to the backup")
            h = harness(client_config(tmp_path / "cli", main_address, backup_address))
            h.connected()
            headline = h.window.header.headline
            assert headline.cget("text").startswith("Main server · ")
            main.stop()
            h.pump(lambda: headline.cget("text").startswith("Backup server (failover) · "),
                   "the indicator to switch to the backup")
            assert "role active" in headline.cget("text")
            assert "shared.bin" in h.window.catalog.visible_names()
            assert [] == h.guard.violations
        finally:
            if not main.stop_event.is_set():
                main.stop()
            backup.stop()


class TestSmallWindow:
    @pytest.mark.timeout(90)
    @pytest.mark.parametrize("geometry", ["1200x520+0+0", "900x520+0+0"])  # the demo's size, the minimum size
    def test_first_transfer_row_and_apply_button_are_whole(self, harness, shared, tmp_path, monkeypatch, geometry):
        """At the demo's and the minimum size a batch of downloads shows from its first row, and Apply is on screen."""
        engine, config, files = shared
        engine.set_upload_limit(2 * MiB)  # still downloading when the rows are looked at
        h = harness(config, geometry)
        h.connected()
        names = sorted(files, key=str.casefold)
        h.download(names, tmp_path / "dl", monkeypatch)
        first = h.transfer(names[0]).tid
        h.pump(lambda: h.window.transfers.top_row() == first, "the first row at the top", SHORT_TIMEOUT)
        h.window.tabs.select(h.window.seeding_panel)
        apply = h.window.seeding_panel.apply_button
        h.pump(apply.winfo_ismapped, "the Seeding tab", SHORT_TIMEOUT)
        bottom = apply.winfo_rooty() + apply.winfo_height()
        assert bottom <= h.window.status_line.winfo_rooty(), (bottom, h.window.status_line.winfo_rooty())
        assert [] == h.guard.violations


class TestLogPane:
    @pytest.mark.timeout(60)
    def test_follows_new_lines_even_from_a_hidden_tab_until_scrolled_up(self, harness, shared):
        """Lines logged while the Log tab is hidden are in view when it opens; scrolling up stops following."""
        _, config, _ = shared
        h = harness(config)
        pane = h.window.log_pane
        for number in range(300):
            pane.append(LogLine("INFO", f"line {number}"))
        h.window.tabs.select(pane)
        h.pump(lambda: pane.winfo_ismapped(), "the Log tab")
        assert pane.last_line_visible()
        pane.scroll_view("moveto", 0.0)  # the user reads older lines: they stay put
        pane.append(LogLine("INFO", "one more"))
        assert (False, "1.0") == (pane.last_line_visible(), pane.text.index("@0,0").split(".")[0] + ".0")
        pane.scroll_view("moveto", 1.0)  # back at the end: following again
        pane.append(LogLine("INFO", "and another"))
        assert pane.last_line_visible()
        assert [] == h.guard.violations


class TestThemeAndLimits:
    @pytest.mark.timeout(60)
    def test_theme_toggle_persists_and_a_new_window_opens_in_it(self, harness, shared):
        """The toggle switches to dark, writes window.json, and the next window opens dark."""
        from minitorrent.gui.widgets import current_theme

        _, config, _ = shared
        first = harness(config)
        assert "light" == current_theme(first.root)
        first.window.header.theme_button.invoke()
        assert "dark" == current_theme(first.root)
        wait_until(lambda: load_settings(first.settings_file).get("theme") == "dark", SHORT_TIMEOUT,
                   "window.json to say dark")
        first.close()
        second = harness(config)
        assert "dark" == current_theme(second.root)
        second.window.header.theme_button.invoke()
        assert "light" == current_theme(second.root)
        wait_until(lambda: load_settings(second.settings_file).get("theme") == "light", SHORT_TIMEOUT,
                   "window.json to say light")
        assert [] == first.guard.violations + second.guard.violations

    @pytest.mark.timeout(60)
    def test_limits_validate_then_apply(self, harness, shared):
        """Bad input shows a message and changes nothing; good input is applied to the engine."""
        _, config, _ = shared
        h = harness(config)
        panel = h.window.seeding_panel
        panel.upload_var.set("256")
        panel.download_var.set("fast please")
        panel.apply_button.invoke()
        assert panel.message.cget("text").startswith("Download limit: enter a number of KiB/s")
        assert (0, 0) == (h.engine.seeder.upload_limit.rate_bps, h.engine.download_limit.rate_bps)
        panel.download_var.set("1024")
        panel.apply_button.invoke()
        assert (256 * 1024, MiB) == (h.engine.seeder.upload_limit.rate_bps, h.engine.download_limit.rate_bps)
        assert "upload 256 KiB/s, download 1024 KiB/s" in panel.message.cget("text")
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_seeding_view_counts_what_is_seeded(self, harness, shared, tmp_path, monkeypatch):
        """Seeding starts with the window; a finished download is listed among the seeded files."""
        _, config, _ = shared
        h = harness(config)
        h.connected()
        h.download(["gamma.iso"], tmp_path / "dl", monkeypatch)
        tiles = h.window.seeding_panel.strip.tiles
        h.pump(lambda: tiles["files"].value.cget("text") == "1" and tiles["status"].value.cget("text") == "on",
               "the seeding view to count the file")
        assert "peers reach us at" in tiles["status"].detail.cget("text")
        assert ["gamma.iso"] == [v[0] for v in (h.window.seeding_panel.files.tree.item(i, "values")
                                                for i in h.window.seeding_panel.files.tree.get_children())]
        assert [] == h.guard.violations


    @pytest.mark.timeout(60)
    def test_seeder_that_cannot_start_says_why(self, harness, shared, tmp_path):
        """A seed port already taken: the window says seeding failed and why; browsing still works."""
        import socket

        engine = shared[0]
        with socket.create_server(("127.0.0.1", 0)) as taken:
            config = client_config(tmp_path / "cli-taken", engine.server.address,
                                   overrides={"client": {"seed_port": taken.getsockname()[1]}})
            h = harness(config)
            h.connected()
            status = h.window.seeding_panel.strip.tiles["status"]
            h.pump(lambda: status.value.cget("text") == "failed", "the seeding tile to say failed")
            assert "seeding could not start" in h.window.banner.text
            assert [] == h.guard.violations


class TestClosing:
    @pytest.mark.timeout(60)
    def test_close_stops_every_thread_and_the_engine(self, harness, shared, tmp_path, monkeypatch):
        """Closing mid-download stops the downloads, the poller and the workers, and closes the engine."""
        engine, config, _ = shared
        engine.set_upload_limit(2 * MiB)
        h = harness(config)
        h.connected()
        h.download(["big.bin"], tmp_path / "dl", monkeypatch)
        h.pump(lambda: h.transfer("big.bin").done_bytes > 0, "some progress")
        h.close()
        names = {t.name for t in threading.enumerate() if t.is_alive()}
        assert not [n for n in names if n.startswith(("get-", "client-", "window-poller", "announce"))], names
        assert h.engine.server.stop.is_set()
        assert [] == h.guard.violations


class TestProgram:
    @pytest.mark.timeout(60)
    def test_no_display_gives_a_one_line_hint(self, tmp_path):
        """`python client.py` without a display exits 2 with one line pointing at the commands."""
        config = write_config(tmp_path, {})
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        result = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(config)],
                                capture_output=True, text=True, timeout=SHORT_TIMEOUT * 3, env=env)
        assert 2 == result.returncode
        assert ["error: cannot open a window (no display); run `python client.py list` instead"] == \
            result.stderr.splitlines()

    @pytest.mark.timeout(30)
    def test_bad_geometry_is_a_usage_error(self, tmp_path):
        """A malformed --geometry is refused by the command line, before any window."""
        result = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(write_config(tmp_path)),
                                 "--geometry", "big"], capture_output=True, text=True, timeout=SHORT_TIMEOUT * 2)
        assert 2 == result.returncode
        assert "expected WxH+X+Y" in result.stderr and "Traceback" not in result.stderr

    @pytest.mark.timeout(60)
    def test_the_window_opens_and_sigterm_closes_it_cleanly(self, display, shared):
        """`python client.py` opens the window; SIGTERM closes it and the program exits 0."""
        import signal

        _, config, _ = shared
        process = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "--config", str(config),
                                    "--geometry", "1024x640+10+10"],  # as demo.py places it
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: subprocess.run(["xdotool", "search", "--name", "MiniTorrent"],
                                              capture_output=True, text=True).stdout.strip()
                       or process.poll() is not None, SHORT_TIMEOUT * 2, "the window to appear")
            assert process.poll() is None, process.stderr.read()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=SHORT_TIMEOUT * 2)
        finally:
            if process.poll() is None:
                process.kill()
        assert 0 == process.returncode, stderr
        assert "Traceback" not in stderr


class TestFoldersAndRemembering:
    @pytest.fixture
    def photos(self, server_factory, tmp_path):
        """A main sharing photos/ (nested) and one loose file; returns (client config path, source root)."""
        engine = server_factory({"transfer": {"chunk_size": CHUNK}})
        root = tmp_path / "src" / "photos"
        make_file(root / "2024" / "beach.jpg", 3000, seed=1)
        make_file(root / "2024" / "big.raw", 2 * CHUNK + 3, seed=2)
        make_file(root / "notes.txt", 10, seed=3)
        engine.add_folder(root)
        engine.add_file(make_file(tmp_path / "src" / "loose.txt", 5, seed=4))
        return client_config(tmp_path / "cli", engine.server.address), root

    def test_folder_logic(self):
        """The folder filter offers every folder, and keeps the entries at any depth below the one chosen."""
        entries = [entry("a/b/c.txt"), entry("a/d.txt"), entry("e.txt")]
        assert [logic.ALL_FOLDERS, "a/", "a/b/"] == logic.folder_choices(entries)
        assert ["a/b/c.txt", "a/d.txt"] == [e["name"] for e in logic.in_folder(entries, "a/")]
        assert 3 == len(logic.in_folder(entries, logic.ALL_FOLDERS))

    @pytest.mark.parametrize("settings, expected", [
        ({"limits": [1024, 2048]}, (1024, 2048)), ({}, None), ({"limits": [-1, 5]}, None),
        ({"limits": "fast"}, None), ({"limits": [True, 5]}, None)])
    def test_saved_limits_are_read_safely(self, settings, expected):
        """Saved limits come back as two non-negative ints; anything else is ignored."""
        assert expected == logic.saved_limits(settings)

    @pytest.mark.timeout(90)
    def test_folder_filter_and_download_folder(self, harness, photos, tmp_path, monkeypatch):
        """Choosing photos/2024/ shows its files; Download Folder fetches them as one transfer, structure kept."""
        config, root = photos
        h = harness(config)
        h.connected()
        assert [logic.ALL_FOLDERS, "photos/", "photos/2024/"] == list(h.window.catalog.folder.cget("values"))
        h.window.catalog.folder_var.set("photos/2024/")
        assert ["photos/2024/beach.jpg", "photos/2024/big.raw"] == shown_names(h.window)
        monkeypatch.setattr(cw.filedialog, "askdirectory", lambda **_: str(tmp_path / "out"))
        h.window.catalog.download_folder_button.invoke()
        h.pump(lambda: h.transfer("photos/2024/").state.value == "done", "the folder transfer to finish")
        for name in ("2024/beach.jpg", "2024/big.raw"):
            assert sha256_file(root / name) == sha256_file(tmp_path / "out" / "photos" / name)
        assert "100.0%" == h.row("photos/2024/").percent_label.cget("text")
        h.pump(lambda: "photos/2024/: downloaded and verified" in h.window.status_line.cget("text"),
               "the status line to say the folder is done")
        if os.environ.get("WINDOW_SCREENSHOTS"):
            h.root.update()
            subprocess.run(["import", "-window", "root",
                            os.path.join(os.environ["WINDOW_SCREENSHOTS"], "client-folders.png")], check=False)
        assert [] == h.guard.violations

    @pytest.mark.timeout(90)
    def test_a_folder_shows_one_progress_per_file(self, harness, server_factory, tmp_path, monkeypatch):
        """While a folder downloads, its list shows the small files done and the big one downloading, each
        with its own progress; at the end every file's row says done."""
        engine = server_factory({"transfer": {"chunk_size": CHUNK}})
        root = tmp_path / "src" / "album"
        for index in range(12):
            make_file(root / f"day{index // 4}" / f"photo{index:02}.jpg", 2000 + index, seed=index)
        make_file(root / "video.mp4", 24 * CHUNK, seed=99)  # 6 MiB at 2 MiB/s: seconds to look at it
        engine.add_folder(root)
        h = harness(client_config(tmp_path / "cli", engine.server.address))
        h.connected()
        h.engine.set_limits(0, 2 * MiB)
        h.window.catalog.folder_var.set("album/")
        monkeypatch.setattr(cw.filedialog, "askdirectory", lambda **_: str(tmp_path / "out"))
        h.window.catalog.download_folder_button.invoke()
        files = h.transfer("album/").files
        h.pump(lambda: files["album/video.mp4"].state == "downloading" and files["album/video.mp4"].done_bytes > 4 * CHUNK,
               "the big file to be under way")
        row = h.row("album/")
        h.pump(lambda: row.files is not None and "downloading" in row.files.summary.cget("text"), "the list to show it")
        shown = {row.files.tree.item(i, "values")[0]: row.files.tree.item(i, "values")[3]
                 for i in row.files.tree.get_children()}
        assert ({"done"}, "downloading") == ({v for k, v in shown.items() if k != "video.mp4"}, shown["video.mp4"])
        assert 0 < h.transfer("album/").percent < 100
        if os.environ.get("WINDOW_SCREENSHOTS"):
            h.root.update()
            subprocess.run(["import", "-window", "root",
                            os.path.join(os.environ["WINDOW_SCREENSHOTS"], "client-folder-files.png")], check=False)
        h.engine.set_limits(0, 0)
        h.pump(lambda: h.transfer("album/").state.value == "done", "the folder to finish")
        h.window.transfers.redraw_all()
        states = [row.files.tree.item(i, "values")[3] for i in row.files.tree.get_children()]
        assert ["done"] * 13 == states
        assert [] == h.guard.violations

    @pytest.mark.timeout(60)
    def test_limits_are_remembered_between_runs(self, harness, photos):
        """Limits applied in the window are in force again when the window is opened next time."""
        config, _ = photos
        first = harness(config)
        first.window.seeding_panel.upload_var.set("300")
        first.window.seeding_panel.download_var.set("700")
        first.window.seeding_panel.apply_button.invoke()
        wait_until(lambda: load_settings(first.settings_file).get("limits") == [300 * 1024, 700 * 1024],
                   SHORT_TIMEOUT, "window.json to hold the limits")
        first.close()
        second = harness(config)
        assert (300 * 1024, 700 * 1024) == (second.engine.seeder.upload_limit.rate_bps,
                                            second.engine.download_limit.rate_bps)
        assert "700" == second.window.seeding_panel.download_var.get()

    def test_desktop_notification_without_notify_send_is_silent(self, monkeypatch):
        """With no notify-send on the PATH, a notification is skipped without an error."""
        monkeypatch.setenv("PATH", "/nonexistent")
        assert None is cw.desktop_notification("Download finished", "x")
