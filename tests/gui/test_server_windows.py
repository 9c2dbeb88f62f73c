"""The server windows: their pure formatting, and the real Tk windows under Xvfb driven through their widgets."""
from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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
)

from minitorrent.gui import backup_window as bw
from minitorrent.gui import base as gui_base
from minitorrent.gui import main_window as mw
from minitorrent.gui.main_window import ServerState
from minitorrent.server.backup import BackupServer
from minitorrent.server.main import MainServer

GUI_TEST_TIMEOUT = 120  # a whole window test, Xvfb start included
HEARTBEAT = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.0}
MIB = 1024 * 1024


# Pure functions ----------------------------------------------------------------------------------------------------


class TestMainFormatting:
    def test_short_sha_keeps_twelve_hex_digits(self):
        """A SHA-256 is shown by its first 12 hex digits."""
        assert "0123456789ab" == gui_base.short_sha("0123456789abcdef" * 4)

    def test_added_date_is_local_minutes(self):
        """Catalog dates show as local YYYY-MM-DD HH:MM."""
        stamp = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
        assert "2026-03-04 05:06" == gui_base.format_added(stamp)

    def test_replica_state_yes_pending_no(self):
        """yes when the backup holds that content, pending while the link is up, no otherwise."""
        holds = {"a.bin": "aa"}
        up = {"replicating": True, "connected": True}
        assert "yes" == mw.replica_state("a.bin", "aa", holds, up)
        assert "pending" == mw.replica_state("a.bin", "bb", holds, up)  # a new content under the same name
        assert "pending" == mw.replica_state("b.bin", "bb", holds, up)
        assert "no" == mw.replica_state("b.bin", "bb", holds, {"replicating": True, "connected": False})
        assert "no" == mw.replica_state("b.bin", "bb", {}, {"replicating": False})

    def test_file_rows_show_human_values_and_sort_on_raw_ones(self):
        """A row shows 1.5 MiB and a short hash; its sort keys keep the bytes and the timestamp."""
        entry = {"name": "été | x.bin", "size": 3 * MIB // 2, "chunks": 2, "sha256": "f" * 64, "downloads": 7,
                 "added_at": 1_700_000_000.0}
        [(iid, values, keys)] = mw.file_rows([entry], {}, {"replicating": False})
        assert "été | x.bin" == iid
        assert ("été | x.bin", "1.5 MiB", 2, "f" * 12, 7, "no", gui_base.format_added(1_700_000_000.0)) == values
        assert (3 * MIB // 2, 1_700_000_000.0, mw.REPLICA_ORDER["no"]) == (keys["size"], keys["added"], keys["backup"])

    def test_backup_tile_for_each_link_state(self):
        """The backup link tile says off, in sync, syncing with the lag, unreachable, or that the backup is active."""
        serving = ServerState.SERVING
        assert ("Off", "no backup configured", "idle") == mw.backup_tile({"replicating": False}, serving)
        in_sync = {"replicating": True, "connected": True, "in_sync": True, "files_pending": 0,
                   "last_ack_age_s": 9.0, "last_heartbeat_ack_age_s": 0.25}
        assert ("In sync", "last ack 0.2 s ago", "ok") == mw.backup_tile(in_sync, serving)
        lagging = {**in_sync, "in_sync": False, "files_pending": 2, "bytes_pending": 3 * MIB}
        assert ("Syncing", "2 files · 3.0 MiB behind", "info") == mw.backup_tile(lagging, serving)
        down = {"replicating": True, "connected": False}
        assert ("Unreachable", "last ack never", "error") == mw.backup_tile(down, serving)
        taken_over = {**in_sync, "role": "active", "epoch": 4}
        assert ("Backup active", "it serves with epoch 4", "warn") == mw.backup_tile(taken_over, serving)
        assert "—" == mw.backup_tile(in_sync, ServerState.STOPPED)[0]

    def test_status_tiles_when_stopped_show_no_live_figures(self):
        """A stopped server shows no clients, no uptime and no speed."""
        tiles = mw.status_tiles(mw.MainSnapshot(ServerState.STOPPED, epoch=3,
                                                metrics={"active_connections": 5, "upload_bps": 10.0}))
        assert ("Stopped", "epoch 3", "idle") == tiles["role"]
        assert "0" == tiles["clients"][0]
        assert "—" == tiles["uptime"][0]
        assert "0 B/s" == tiles["speed"][0]

    def test_status_tiles_when_serving(self):
        """Serving: the role, clients, uptime, bytes sent and upload speed."""
        snapshot = mw.MainSnapshot(ServerState.SERVING, "127.0.0.1:5001", 75.0, "active", 2, backup={},
                                   metrics={"active_connections": 3, "connections_total": 9, "bytes_sent": 2048,
                                            "requests_total": 12, "upload_bps": 1536.0, "average_upload_bps": 512})
        tiles = mw.status_tiles(snapshot)
        assert ("Active", "epoch 2", "ok") == tiles["role"]
        assert ("3", "9 since start", "") == tiles["clients"]
        assert "1:15" == tiles["uptime"][0]
        assert ("2.0 KiB", "12 requests", "") == tiles["sent"]
        assert ("1.5 KiB/s", "average 512 B/s", "") == tiles["speed"]

    def test_headline_pulses_only_while_serving_as_active(self):
        """The dot breathes while serving; a main on standby or stopped is still."""
        assert ("Serving on h:1", "ok", True) == mw.headline(ServerState.SERVING, "h:1", "active")
        assert (False, "warn") == mw.headline(ServerState.SERVING, "h:1", "standby")[2:0:-1]
        assert "error" == mw.headline(ServerState.STOPPED, "", "", "port taken")[1]
        assert not mw.headline(ServerState.STARTING, "")[2]

    def test_import_and_summary_lines(self):
        """The import line names the file, percent, sizes and queue; the status line the totals."""
        assert ("Importing a.bin: 50%  (1.0 MiB of 2.0 MiB)  ·  2 more queued" ==
                mw.import_text("/x/a.bin", MIB, 2 * MIB, 2))
        assert "Importing a.bin: 99%  (2.0 KiB of 2.0 KiB)" == mw.import_text("a.bin", 2047, 2048, 0)
        assert "1 file shared, 2.0 KiB  ·  store: /d" == mw.summary_line(1, 2048, 1, "/d")
        assert "5 files shared, 0 B (the first 2 shown)" == mw.summary_line(5, 0, 2, "")

    def test_import_error_names_the_file_once(self):
        """A failed import says which file and why, without repeating its path."""
        assert "Could not add a.bin: no such file" == mw.import_error_text("/x/a.bin", "/x/a.bin: no such file")
        assert "Could not add a.bin: disk full" == mw.import_error_text("/x/a.bin", "disk full")

    def test_errors_text_shows_the_latest_and_a_count(self):
        """The banner shows the latest error and how many more there are."""
        from minitorrent.gui.widgets import errors_text

        assert "" == errors_text([])
        assert "b  (and 1 more: see the log)" == errors_text(["a", "b"])


class TestErrorBanner:
    def test_a_repeated_error_counts_once(self, display):
        """A poll that fails the same way twice adds one error, not two, to the banner's count."""
        from minitorrent.gui.widgets import ErrorBanner

        root = gui_base.open_root("MiniTorrent test", "400x200")
        try:
            banner = ErrorBanner(root)
            banner.grid()
            for text in ("a", "a", "b"):
                banner.add(text)
            assert "b  (and 1 more: see the log)" == banner.text
        finally:
            root.destroy()


class TestEngineHolder:
    def test_replace_waits_for_users_and_try_use_does_not_block(self):
        """A swap waits until the engine is unused; meanwhile try_use yields None instead of waiting."""
        holder = mw.EngineHolder("old")
        leave, entered, swapped = threading.Event(), threading.Event(), threading.Event()

        def user():
            with holder.use():
                entered.set()
                leave.wait(SHORT_TIMEOUT)

        threading.Thread(target=user, daemon=True).start()
        assert entered.wait(SHORT_TIMEOUT)
        swapper = threading.Thread(target=lambda: (holder.replace(lambda old: old + "-renewed"), swapped.set()))
        swapper.start()
        wait_until(lambda: holder._swapping, what="the swap to begin")
        with holder.try_use() as engine:
            assert engine is None
        assert not swapped.is_set()
        leave.set()
        swapper.join(SHORT_TIMEOUT)
        with holder.use() as engine:
            assert "old-renewed" == engine


class TestBackupFormatting:
    def test_badge_states(self):
        """ACTIVE when active; standby is NO CONTACT after an interval plus a grace (an interval, >= 1 s) of silence."""
        assert bw.BadgeState.ACTIVE == bw.badge_state(True, "active", 99.0, 2.0)
        assert bw.BadgeState.STANDBY == bw.badge_state(True, "standby", 3.9, 2.0)
        assert bw.BadgeState.NO_CONTACT == bw.badge_state(True, "standby", 4.1, 2.0)
        assert bw.BadgeState.STANDBY == bw.badge_state(True, "standby", 1.4, 0.5)  # the grace is at least 1 s
        assert bw.BadgeState.NO_CONTACT == bw.badge_state(True, "standby", 1.6, 0.5)
        assert bw.BadgeState.STARTING == bw.badge_state(False, "standby", 0.0, 2.0, started=False)
        assert bw.BadgeState.NOT_RUNNING == bw.badge_state(False, "standby", 0.0, 2.0, started=True)

    def test_countdown_clamps_at_zero(self):
        """The failover countdown: seconds left and the share of the timeout left, never negative."""
        assert (4.5, 0.75) == bw.countdown(1.5, 6.0)
        assert (0.0, 0.0) == bw.countdown(7.0, 6.0)

    def test_heartbeat_line_and_explanation(self):
        """Beside the badge: the heartbeat's age and the countdown; under it, what happens next."""
        snapshot = bw.BackupSnapshot(0.0, True, main_address="m:1", heartbeat_timeout_s=6.0, epoch=3)
        assert ("2.5 s ago", "in 3.5 s", "warn") == bw.heartbeat_line(snapshot, bw.BadgeState.NO_CONTACT, 2.5)
        assert "now" == bw.heartbeat_line(snapshot, bw.BadgeState.NO_CONTACT, 6.5)[1]
        text = bw.explanation(snapshot, bw.BadgeState.NO_CONTACT, 4.0)
        assert "No heartbeat from the main at m:1 for 4.0 s" in text and "takes over in 2.0 s" in text
        assert "failback: auto" in bw.explanation(snapshot, bw.BadgeState.ACTIVE, 9.0)

    def test_failover_is_armed_not_counting_while_heartbeats_come(self):
        """A healthy standby shows the failover as armed, the same at every beat, and says after how long."""
        snapshot = bw.BackupSnapshot(0.0, True, main_address="m:1", heartbeat_timeout_s=6.0)
        lines = {bw.heartbeat_line(snapshot, bw.BadgeState.STANDBY, since)[1:] for since in (0.1, 0.8, 1.9)}
        assert {("armed", "")} == lines
        assert "If the heartbeats stop for 6 s, the backup takes over." in bw.explanation(
            snapshot, bw.BadgeState.STANDBY, 0.5)

    def test_manual_failback_asks_the_operator(self):
        """With manual failback an active backup offers Hand back, and says when the main asks."""
        active = bw.BackupSnapshot(0.0, True, role="active", failback="manual", handback_asked_age_s=1.0)
        assert bw.handback_enabled(active) and not bw.promote_enabled(active)
        assert "The main is back and asks for its role" in bw.explanation(active, bw.BadgeState.ACTIVE, 9.0)
        approved = bw.BackupSnapshot(0.0, True, role="active", failback="manual", handback_approved=True)
        assert not bw.handback_enabled(approved)
        assert not bw.handback_enabled(bw.BackupSnapshot(0.0, True, role="active", failback="auto"))
        assert bw.promote_enabled(bw.BackupSnapshot(0.0, True, role="standby"))
        assert not bw.promote_enabled(bw.BackupSnapshot(0.0, False, role="standby"))

    def test_receiving_line_adds_up_the_partials(self):
        """Replication progress counts verified chunks over every file being received."""
        assert ("", 1.0) == bw.receiving_line([])
        text, fraction = bw.receiving_line([{"name": "a.bin", "size": MIB, "chunks": 4, "chunks_done": 1},
                                            {"name": "b.bin", "size": MIB, "chunks": 4, "chunks_done": 3}])
        assert 0.5 == fraction
        assert "Receiving a.bin and 1 more from the main: 50% (4 of 8 chunks, 2.0 MiB)" == text
        paused, _ = bw.receiving_line([{"name": "a.bin", "size": MIB, "chunks": 4, "chunks_done": 1}], live=False)
        assert "Paused: a.bin 25% (1 of 4 chunks, 1.0 MiB) received; resumes when the main replicates again" == paused

    def test_replica_rows(self):
        """The backup's table: name, human size, chunks, short hash, downloads, date."""
        entry = {"name": "a", "size": 2048, "chunks": 1, "sha256": "ab" * 32, "downloads": 0, "added_at": 0.0}
        [(iid, values, keys)] = bw.replica_rows([entry])
        assert ("a", ("a", "2.0 KiB", 1, "ab" * 6, 0, gui_base.format_added(0.0)), 2048) == (iid, values, keys["size"])


# Real windows --------------------------------------------------------------------------------------------------------


class Windows:
    """Opens server windows on the test display with a Tk-thread guard; closes what is left at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.opened: list = []
        self.engines: list = []

    def root(self):
        from minitorrent.gui.base import open_root

        root = open_root("MiniTorrent test", "1120x720")
        return root, TkThreadGuard(root)

    def main(self, overrides: dict | None = None, start: bool = True):
        engine = MainServer(make_config(self.tmp_path / "main", overrides))
        root, guard = self.root()
        window = mw.MainWindow(root, engine, self.tmp_path / "main" / "window.json", start=start)
        self.opened.append(window)
        return window, guard

    def backup(self, overrides: dict | None = None):
        settings = {"server": {"secret": "s3cret", "backup": {"data_dir": "backup", **HEARTBEAT}}}
        engine = BackupServer(make_config(self.tmp_path / "backup", _merge(settings, overrides or {})))
        root, guard = self.root()
        window = bw.BackupWindow(root, engine, self.tmp_path / "backup" / "window.json")
        self.opened.append(window)
        pump_until(root, lambda: window.controller._running, SHORT_TIMEOUT, "the backup to listen")
        return window, guard

    def main_engine_for(self, backup_window) -> MainServer:
        """A started main engine replicating to the backup window's engine."""
        port = backup_window.controller.engine.server.address[1]
        config = make_config(self.tmp_path / "main-engine",
                             {"server": {"secret": "s3cret", "backup": {"port": port, **HEARTBEAT}}})
        engine = MainServer(config)
        engine.start()
        self.engines.append(engine)
        return engine

    def close(self) -> None:
        for window in self.opened:
            window.close()
        for engine in self.engines:
            if not engine.stop_event.is_set():
                engine.stop()


def _merge(base: dict, extra: dict) -> dict:
    from conftest import deep_merge

    return deep_merge(base, extra)


@pytest.fixture
def windows(display, tmp_path):
    opened = Windows(tmp_path)
    yield opened
    opened.close()
    opened.opened.clear()
    # A Tk interpreter must be deleted by the thread that made it: collect the closed windows' reference
    # cycles here, or the garbage collector may do it later in whichever thread happens to allocate
    # (Tcl_AsyncDelete: async handler deleted by the wrong thread).
    gc.collect()


def rows(window) -> dict[str, tuple]:
    """The rows the table shows: name -> shown values."""
    tree = window.table.tree
    return {iid: tuple(tree.item(iid, "values")) for iid in tree.get_children()}


def patch_dialog(monkeypatch, paths) -> None:
    monkeypatch.setattr(mw.filedialog, "askopenfilenames", lambda **_: tuple(str(p) for p in paths))


def confirm(monkeypatch, module, answer: bool = True) -> list:
    asked: list = []
    monkeypatch.setattr(module.messagebox, "askyesno", lambda *args, **kwargs: asked.append(args) or answer)
    return asked


def press(widget, key: str) -> None:
    """Type ``key`` into ``widget`` as a user would: key events go to the widget holding the focus."""
    widget.focus_force()
    pump_until(widget, lambda: widget.focus_get() is widget, SHORT_TIMEOUT, "the keyboard focus")
    widget.event_generate(key)


def serving(window) -> bool:
    return window.controller.state is ServerState.SERVING


class TestMainWindow:
    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_add_files_shows_the_rows(self, windows, monkeypatch, tmp_path):
        """Add Files imports every file the dialog returns, and their rows appear with human sizes."""
        window, guard = windows.main()
        files = [make_file(tmp_path / "in" / "holiday photos été.bin", 3 * MIB + 17, seed=1),
                 make_file(tmp_path / "in" / "notes | 1.txt", 2000, seed=2)]
        patch_dialog(monkeypatch, files)
        window.add_button.invoke()
        shown = pump_until(window.root, lambda: len(rows(window)) == 2 and rows(window), LONG_TIMEOUT, "two rows")
        assert ("3.0 MiB", "4", "no") == (shown["holiday photos été.bin"][1], shown["holiday photos été.bin"][2],
                                          shown["holiday photos été.bin"][5])
        assert "2.0 KiB" == shown["notes | 1.txt"][1]
        pump_until(window.root, lambda: "2 files shared" in window.status.cget("text"), SHORT_TIMEOUT, "the totals")
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_a_bad_file_is_reported_in_the_window(self, windows, monkeypatch, tmp_path):
        """A file that cannot be imported shows a readable message in the window's banner."""
        window, guard = windows.main()
        patch_dialog(monkeypatch, [tmp_path / "missing.bin"])
        window.add_button.invoke()
        pump_until(window.root, lambda: window.banner.text, SHORT_TIMEOUT, "the error banner")
        assert "Could not add missing.bin: no such file" == window.banner.text
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_remove_and_select_all(self, windows, monkeypatch, tmp_path):
        """Ctrl+A selects every row; Remove (confirmed) and the Delete key stop sharing the selected files."""
        window, guard = windows.main()
        window.controller.add_files([make_file(tmp_path / f"f{i}.bin", 1000 + i, seed=i) for i in range(3)])
        pump_until(window.root, lambda: len(rows(window)) == 3, LONG_TIMEOUT, "three rows")
        asked = confirm(monkeypatch, mw)
        press(window.table.tree, "<Control-a>")
        assert {"f0.bin", "f1.bin", "f2.bin"} == set(window.table.selected())
        window.table.tree.selection_set(["f1.bin"])
        pump_until(window.root, lambda: str(window.remove_button.cget("state")) == "normal", SHORT_TIMEOUT,
                   "Remove to be enabled")
        window.remove_button.invoke()
        pump_until(window.root, lambda: set(rows(window)) == {"f0.bin", "f2.bin"}, SHORT_TIMEOUT, "f1 removed")
        window.table.tree.selection_set(["f2.bin"])
        press(window.table.tree, "<Delete>")
        pump_until(window.root, lambda: set(rows(window)) == {"f0.bin"}, SHORT_TIMEOUT, "f2 removed")
        assert 2 == len(asked)
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_add_folder_shares_the_tree_and_rename_moves_it(self, windows, monkeypatch, tmp_path):
        """Add Folder… shares every file under its relative path; Rename… of the folder renames every row."""
        window, guard = windows.main()
        make_file(tmp_path / "in" / "photos" / "2024" / "beach.jpg", 3000, seed=1)
        make_file(tmp_path / "in" / "photos" / "notes.txt", 20, seed=2)
        monkeypatch.setattr(mw.filedialog, "askdirectory", lambda **_: str(tmp_path / "in" / "photos"))
        window.add_folder_button.invoke()
        pump_until(window.root, lambda: set(rows(window)) == {"photos/2024/beach.jpg", "photos/notes.txt"},
                   LONG_TIMEOUT, "the folder's rows")
        window.table.tree.selection_set(["photos/notes.txt"])
        pump_until(window.root, lambda: str(window.rename_button.cget("state")) == "normal", SHORT_TIMEOUT,
                   "Rename to be enabled")
        answers = iter(["photos", "pictures"])  # edit the path down to the folder, then name it anew
        monkeypatch.setattr(mw.simpledialog, "askstring", lambda *args, **kwargs: next(answers))
        window.rename_button.invoke()
        pump_until(window.root, lambda: set(rows(window)) == {"pictures/2024/beach.jpg", "pictures/notes.txt"},
                   SHORT_TIMEOUT, "the renamed rows")
        if os.environ.get("WINDOW_SCREENSHOTS"):
            window.root.update()
            subprocess.run(["import", "-window", "root", os.path.join(os.environ["WINDOW_SCREENSHOTS"],
                                                                     "main-folders.png")], check=False)
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_a_rename_onto_a_taken_name_is_reported(self, windows, monkeypatch, tmp_path):
        """Renaming onto a name already shared changes nothing and says why in the banner."""
        window, guard = windows.main()
        window.controller.add_files([make_file(tmp_path / f"f{i}.bin", 100 + i, seed=i) for i in range(2)])
        pump_until(window.root, lambda: len(rows(window)) == 2, LONG_TIMEOUT, "two rows")
        window.table.tree.selection_set(["f0.bin"])
        pump_until(window.root, lambda: str(window.rename_button.cget("state")) == "normal", SHORT_TIMEOUT,
                   "Rename to be enabled")
        answers = iter(["f0.bin", "f1.bin"])
        monkeypatch.setattr(mw.simpledialog, "askstring", lambda *args, **kwargs: next(answers))
        window.rename_button.invoke()
        pump_until(window.root, lambda: window.banner.text, SHORT_TIMEOUT, "the error banner")
        assert ("f1.bin is already shared" in window.banner.text, {"f0.bin", "f1.bin"}) == (True, set(rows(window)))
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_stop_and_start_server(self, windows, tmp_path):
        """Stop Server closes the port and stops the pulse; Start Server serves the same catalog again."""
        window, guard = windows.main()
        pump_until(window.root, lambda: serving(window), SHORT_TIMEOUT, "the server to start")
        host, port = window.controller.holder._engine.server.address
        socket.create_connection((host, port), timeout=SHORT_TIMEOUT).close()
        pump_until(window.root, lambda: window.header.headline.cget("text") == f"Serving on {host}:{port}" and
                   window.header.dot._pulsing, SHORT_TIMEOUT, "the serving headline")
        assert "Stop Server" == window.serve_button.cget("text")
        window.serve_button.invoke()
        pump_until(window.root, lambda: window.controller.state is ServerState.STOPPED and
                   window.serve_button.cget("text") == "Start Server", LONG_TIMEOUT, "the server to stop")
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=SHORT_TIMEOUT).close()
        window.controller.add_files([make_file(tmp_path / "while-stopped.bin", 5000)])  # still possible
        pump_until(window.root, lambda: "while-stopped.bin" in rows(window) and not window.header.dot._pulsing,
                   SHORT_TIMEOUT, "the file added while stopped")
        window.serve_button.invoke()
        pump_until(window.root, lambda: serving(window), SHORT_TIMEOUT, "the server to start again")
        host, port = window.controller.holder._engine.server.address
        socket.create_connection((host, port), timeout=SHORT_TIMEOUT).close()
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_a_port_in_use_is_reported_and_start_stays_available(self, windows):
        """When the port is taken the window says why, and Start Server can be tried again."""
        with socket.create_server(("127.0.0.1", 0)) as taken:
            window, guard = windows.main({"server": {"main": {"port": taken.getsockname()[1]}}})
            pump_until(window.root, lambda: window.banner.text, SHORT_TIMEOUT, "the error banner")
        assert window.banner.text.startswith("The server could not start: cannot listen on 127.0.0.1:")
        assert ("Start Server", "normal") == (window.serve_button.cget("text"), str(window.serve_button.cget("state")))
        window.serve_button.invoke()  # the port is free now
        pump_until(window.root, lambda: serving(window), SHORT_TIMEOUT, "the server to start")
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_tk_answers_while_a_large_file_is_added(self, windows, tmp_path):
        """While 64 MiB are copied and hashed, after(0) is answered within 1 s (every probe)."""
        window, guard = windows.main()
        big = make_file(tmp_path / "big.bin", 64 * MIB, seed=7)
        window.controller.add_files([big])
        latencies = []
        while window.controller.importing or not latencies:
            answered = threading.Event()
            asked_at = time.monotonic()
            window.root.after(0, answered.set)
            pump_until(window.root, answered.is_set, LONG_TIMEOUT, "after(0) to be answered")
            latencies.append(time.monotonic() - asked_at)
        assert max(latencies) < 1.0, latencies
        pump_until(window.root, lambda: "big.bin" in rows(window), LONG_TIMEOUT, "the big file's row")
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_tones_reach_the_screen_in_both_themes(self, windows):
        """The role tile is drawn in its tone's colour, lighter on the dark theme (the palette used to hide it)."""
        from minitorrent.gui.widgets import DARK_TONES, TONES

        window, guard = windows.main()
        role = window.tiles.tiles["role"].value
        pump_until(window.root, lambda: role.cget("text") == "Active", SHORT_TIMEOUT, "the role tile")
        light = str(role.cget("foreground"))
        window.header.theme_button.invoke()
        pump_until(window.root, lambda: str(role.cget("foreground")) != light, SHORT_TIMEOUT, "the dark colour")
        assert (TONES["ok"], DARK_TONES["ok"]) == (light, str(role.cget("foreground")))
        warning = str(window.log_pane.text.tag_cget("WARNING", "foreground"))
        assert gui_base.LEVEL_COLOURS["dark"]["WARNING"] == warning  # the log's levels follow the theme too
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_theme_is_remembered_as_in_every_window(self, windows, tmp_path):
        """The toggle writes the theme into window.json beside the other settings, as the client's does."""
        from minitorrent.gui.base import load_settings, save_settings

        settings = tmp_path / "main" / "window.json"
        save_settings(settings, {"download_folder": "/somewhere"})
        window, guard = windows.main()
        window.header.theme_button.invoke()
        wait_until(lambda: load_settings(settings).get("theme") == "dark", SHORT_TIMEOUT, "window.json to say dark")
        assert {"download_folder": "/somewhere", "theme": "dark"} == load_settings(settings)
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_closing_the_window_stops_the_engine(self, windows):
        """Closing stops polling, removes the log handler and stops serving (the port is closed)."""
        import logging

        window, guard = windows.main()
        pump_until(window.root, lambda: serving(window), SHORT_TIMEOUT, "the server to start")
        address = window.controller.holder._engine.server.address
        window.close()
        assert window.log_handler not in logging.getLogger().handlers
        assert not window.poller.thread.is_alive()
        with pytest.raises(OSError):
            socket.create_connection(address, timeout=SHORT_TIMEOUT).close()
        assert [] == guard.violations


class TestBackupWindow:
    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_badge_turns_active_when_the_main_stops(self, windows, tmp_path):
        """STANDBY while the main beats, its files replicated; ACTIVE once the main engine stops."""
        window, guard = windows.backup()
        main = windows.main_engine_for(window)
        main.add_file(make_file(tmp_path / "shared.bin", 2 * MIB + 5))
        pump_until(window.root, lambda: window.badge_state is bw.BadgeState.STANDBY and "shared.bin" in rows(window),
                   LONG_TIMEOUT, "standby with the replica")
        assert "STANDBY" == window.badge.cget("text")
        failover = (window.figures["failover"].cget("text"), window.countdown_bar.winfo_ismapped())
        assert ("armed", False) == failover  # not counting down while the main beats
        epoch_on_standby = int(window.figures["epoch"].cget("text"))
        main.stop()
        pump_until(window.root, lambda: window.badge.cget("text") == "ACTIVE", LONG_TIMEOUT, "the badge to turn ACTIVE")
        pump_until(window.root, lambda: int(window.figures["epoch"].cget("text")) > epoch_on_standby,
                   SHORT_TIMEOUT, "the new, higher epoch")
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_no_contact_with_main(self, windows):
        """A standby backup hearing nothing says NO CONTACT WITH MAIN and counts down to failover."""
        window, guard = windows.backup({"server": {"backup": {"heartbeat_timeout": 60.0}}})
        pump_until(window.root, lambda: window.badge.cget("text") == "NO CONTACT WITH MAIN", SHORT_TIMEOUT,
                   "the NO CONTACT badge")
        assert "No heartbeat from the main" in window.explanation.cget("text")
        assert 0.0 < float(window.countdown_bar.cget("value")) < 1.0
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_promote_now_and_hand_back(self, windows, monkeypatch):
        """Promote now (confirmed) makes the backup ACTIVE; with manual failback Hand back approves the hand-back."""
        window, guard = windows.backup({"server": {"backup": {"heartbeat_timeout": 60.0, "failback": "manual"}}})
        asked = confirm(monkeypatch, bw)
        pump_until(window.root, lambda: str(window.promote_button.cget("state")) == "normal", SHORT_TIMEOUT,
                   "Promote now to be enabled")
        window.promote_button.invoke()
        pump_until(window.root, lambda: window.badge.cget("text") == "ACTIVE", SHORT_TIMEOUT, "ACTIVE")
        assert window.controller.engine.node.epoch >= 1
        pump_until(window.root, lambda: str(window.handback_button.cget("state")) == "normal", SHORT_TIMEOUT,
                   "Hand back to be enabled")
        window.handback_button.invoke()
        pump_until(window.root, lambda: window.controller.engine.receiver.handback_approved.is_set(), SHORT_TIMEOUT,
                   "the hand-back approval")
        pump_until(window.root, lambda: "Hand-back approved" in window.explanation.cget("text"), SHORT_TIMEOUT,
                   "the approval shown")
        assert 2 == len(asked)
        assert [] == guard.violations

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_promote_now_needs_the_confirmation(self, windows, monkeypatch):
        """Answering No to the confirmation leaves the backup on standby."""
        window, guard = windows.backup({"server": {"backup": {"heartbeat_timeout": 60.0}}})
        confirm(monkeypatch, bw, answer=False)
        pump_until(window.root, lambda: str(window.promote_button.cget("state")) == "normal", SHORT_TIMEOUT,
                   "Promote now to be enabled")
        window.promote_button.invoke()
        window.poller.poll_now()
        pump_until(window.root, lambda: window.snapshot and window.snapshot.taken_at > time.monotonic() - 0.3,
                   SHORT_TIMEOUT, "a fresh snapshot")
        assert "standby" == window.controller.engine.node.role.value
        assert [] == guard.violations


# The programs ------------------------------------------------------------------------------------------------------


def _run_program(script: str, config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")


class TestPrograms:
    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    @pytest.mark.parametrize("script", ["main_server.py", "backup_server.py"])
    def test_no_display_gives_a_one_line_hint(self, tmp_path, script):
        """Without a display the window mode exits 2 with a one-line hint to use --headless."""
        from conftest import write_config

        config = write_config(tmp_path, {"server": {"secret": "s", "backup": {"data_dir": "b"}}})
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        process = _run_program(script, config, env)
        _, stderr = process.communicate(timeout=LONG_TIMEOUT)
        assert 2 == process.returncode
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert [f"error: cannot open a window (no display); run `python {script} --headless` instead"] == lines
        assert "Traceback" not in stderr

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    @pytest.mark.parametrize("script, banner", [("main_server.py", "main listening on"),
                                                ("backup_server.py", "backup listening on")])
    def test_the_window_serves_and_sigterm_stops_it_cleanly(self, display, tmp_path, script, banner):
        """The program opens its window and serves; SIGTERM closes the window and stops the engine, exit 0."""
        from conftest import write_config

        config = write_config(tmp_path, {"server": {"secret": "s", "backup": {"data_dir": "b"}}})
        process = _run_program(script, config, dict(os.environ))
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
        reader.start()
        try:
            wait_until(lambda: any(banner in line for line in lines) or process.poll() is not None, LONG_TIMEOUT,
                       "the server to listen")
            assert process.poll() is None, "".join(lines)
            process.send_signal(signal.SIGTERM)
            assert 0 == process.wait(LONG_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        reader.join(SHORT_TIMEOUT)
        stopped = f"{script.split('_')[0]} stopped"
        assert any(line.rstrip().endswith(stopped) for line in lines), lines
        assert not any("Traceback" in line for line in lines), "".join(lines)
