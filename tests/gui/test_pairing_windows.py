"""Identities and pairing in the windows: what is shown (no Tk), and the real windows under Xvfb on real engines."""
from __future__ import annotations

import gc
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LONG_TIMEOUT, SHORT_TIMEOUT, TkThreadGuard, make_config, pump_until, write_config

import minitorrent.gui.main_window as mw
from config_loader import load_config
from error_handler import ConnectionFailed, MiniTorrentError, RemoteError
from minitorrent.client.engine import ClientEngine
from minitorrent.gui import pairing
from minitorrent.gui.backup_window import BackupWindow
from minitorrent.gui.base import format_added, open_root
from minitorrent.gui.client_window import ClientWindow
from minitorrent.server.backup import BackupServer
from minitorrent.server.main import MainServer
from minitorrent.wire.protocol import ErrorCode

GUI_TEST_TIMEOUT = 120  # a whole window test, Xvfb start included
PAIRED = {"server": {"access": "paired"}}


# What is shown ------------------------------------------------------------------------------------------------


class TestPairingTexts:
    def test_paired_rows_show_identity_and_date(self):
        """Each paired client is a row keyed by its identity, with the local date it paired."""
        assert [("ID-1", ("ID-1", format_added(1_700_000_000.0)), {"paired": 1_700_000_000.0})] == \
            pairing.paired_rows([("ID-1", 1_700_000_000.0)])

    def test_code_detail_says_how_long_and_what_to_type(self):
        """A shown code says it works once, for ten minutes, and what the client runs."""
        detail = pairing.code_detail("ABCD-EF23", time.time() + 600)
        assert ("One attempt, valid 10 minutes", "python client.py pair ABCD-EF23") == \
            (detail[:29], detail[-31:])

    def test_pairing_end_in_the_windows_words(self):
        """A paired client is named; a failure tells the operator to click the button, not to run a command."""
        assert ("Paired client X", "ok") == pairing.pairing_ended_text(pairing.PairingEnded("C", "X"))
        failed = pairing.PairingEnded("C", error="a client tried this code but could not prove it (a wrong code?); "
                                                 "run pair again for a new one")
        assert ("a client tried this code but could not prove it (a wrong code?); click Pair a client… again "
                "for a new one", "error") == pairing.pairing_ended_text(failed)

    def test_pairing_failures_say_what_to_do(self):
        """No server, no code waiting, and a wrong code each read as one line saying what to do."""
        unreachable = pairing.pairing_failure(ConnectionFailed(
            "no active server: 127.0.0.1:9: cannot connect to 127.0.0.1:9: Connection refused"))
        assert "No server answers (127.0.0.1:9 refuses connections): check that it runs, then try again." == \
            unreachable
        spent = pairing.pairing_failure(RemoteError(ErrorCode.PAIRING_FAILED, "no pairing code is waiting"))
        assert spent.startswith("The server has no code waiting")
        wrong = pairing.pairing_failure(MiniTorrentError("pairing failed: the code did not match"))
        assert "Pairing failed: the code did not match" == wrong

    def test_not_paired_is_told_apart(self):
        """Only a NOT_PAIRED refusal counts as not paired."""
        assert (True, False) == (pairing.is_not_paired(RemoteError(ErrorCode.NOT_PAIRED, "not paired")),
                                 pairing.is_not_paired(RemoteError(ErrorCode.BUSY, "busy")))


# Real windows ---------------------------------------------------------------------------------------------------


class Desk:
    """Windows opened on the test display (each in its own Tk root, all on this thread); closed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.windows: list = []
        self.roots: list = []
        self.guards: list[TkThreadGuard] = []

    def _root(self, geometry: str):
        root = open_root("MiniTorrent test", geometry)
        self.roots.append(root)
        self.guards.append(TkThreadGuard(root))
        return root

    def main(self, overrides: dict | None = None) -> mw.MainWindow:
        engine = MainServer(make_config(self.tmp_path / "main", overrides))
        window = mw.MainWindow(self._root("1120x720"), engine, self.tmp_path / "main" / "window.json")
        self.windows.append(window)
        self.pump(lambda: window.controller.state is mw.ServerState.SERVING, "the main to serve")
        return window

    def client(self, address: tuple[str, int]) -> ClientWindow:
        config = load_config(write_config(self.tmp_path / "client", {
            "server": {"main": {"host": address[0], "port": address[1]}}, "transfer": {"io_timeout": 2.0},
            "client": {"retry_deadline": 2.0}}))
        window = ClientWindow(self._root("1280x820"), ClientEngine(config), config.client.data_dir / "window.json")
        self.windows.append(window)
        return window

    def backup(self) -> BackupWindow:
        config = make_config(self.tmp_path / "backup", {"server": {"secret": "s3cret", "backup": {"data_dir": "b"}}})
        window = BackupWindow(self._root("1120x720"), BackupServer(config), self.tmp_path / "backup" / "window.json")
        self.windows.append(window)
        return window

    def pump(self, condition, what: str, timeout: float = LONG_TIMEOUT):
        """Run every open window's event loop until ``condition()`` holds."""
        def polled():
            for root in self.roots[:-1]:
                if root.winfo_exists():
                    root.update()
            return condition()
        return pump_until(self.roots[-1], polled, timeout, what)

    def violations(self) -> list[str]:
        return [violation for guard in self.guards for violation in guard.violations]

    def screenshot(self, name: str) -> None:
        """With WINDOW_SCREENSHOTS set, the whole screen into that folder (ImageMagick's import)."""
        folder = os.environ.get("WINDOW_SCREENSHOTS")
        if folder:
            self.pump(lambda: True, "a redraw")
            subprocess.run(["import", "-window", "root", os.path.join(folder, name)], check=False)

    def close(self) -> None:
        for window in reversed(self.windows):
            window.close()


@pytest.fixture
def desk(display, tmp_path):
    opened = Desk(tmp_path)
    yield opened
    opened.close()
    opened.windows.clear()
    gc.collect()  # Tk interpreters are deleted here, by the thread that made them


def confirm(monkeypatch, answer: bool = True) -> list:
    asked: list = []
    monkeypatch.setattr(mw.messagebox, "askyesno", lambda *args, **kwargs: asked.append(args) or answer)
    return asked


def said(client: ClientWindow) -> str:
    """The client's status line without its time stamp."""
    return client.status_line.cget("text").split("  ", 1)[-1]


def pair_in_dialog(desk: Desk, client: ClientWindow, code: str) -> pairing.PairDialog:
    """Open Pair with server…, type ``code``, press Pair, and wait for the dialog's answer."""
    client.pair_button.invoke()
    dialog = client.pair_dialog
    dialog.entry.insert(0, code)
    dialog.pair_button.invoke()
    desk.pump(lambda: str(dialog.pair_button.cget("state")) == "normal", "the dialog's answer", LONG_TIMEOUT)
    return dialog


class TestIdentityShown:
    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_every_window_shows_its_identity_and_copies_it(self, desk):
        """The main, backup and client windows show their own whole identity; Copy puts it on the clipboard."""
        main = desk.main()
        with main.controller.holder.use() as main_engine:
            client = desk.client(main_engine.server.address)
        backup = desk.backup()
        shown = []
        for window, engine in ((main, main_engine), (backup, backup.controller.engine), (client, client.engine)):
            line = window.header.identity
            line.copy_button.invoke()
            shown.append((line.text.get(), window.root.clipboard_get(), str(line.field.cget("state"))))
            assert (engine.identity.id, engine.identity.id, "readonly") == shown[-1]
        assert 3 == len({identity for identity, _, _ in shown})
        assert [] == desk.violations()


class TestPairingFromTheWindows:
    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_pair_from_the_client_dialog_then_revoke(self, desk, monkeypatch):
        """Pair a client… shows a code; the client's dialog pairs with it; the list shows it; Revoke refuses it."""
        main = desk.main(PAIRED)
        with main.controller.holder.use() as engine:
            address = engine.server.address
        client = desk.client(address)
        desk.pump(lambda: said(client) == pairing.HOW_TO_PAIR, "the client to say how to pair")
        main.clients.pair_button.invoke()
        code = desk.pump(lambda: main.clients.code.cget("text"), "the code to show")
        assert main.clients.code_line.cget("text").startswith("One attempt, valid 10 minutes")
        dialog = pair_in_dialog(desk, client, code.lower())  # typed in any case
        identity = client.engine.identity.id
        assert f"Paired with the server\n{engine.identity.id}\nThis client may now list and download." == \
            dialog.result.cget("text")
        desk.pump(lambda: main.clients.table.tree.get_children() == (identity,), "the client in the main's list")
        desk.pump(lambda: main.clients.code_line.cget("text") == f"Paired client {identity}", "the outcome")
        desk.pump(lambda: client.catalog.entries is not None and client.not_paired is False, "the catalog")
        desk.screenshot("pair-client-dialog.png")
        main.clients.pair_button.invoke()  # a second code, shown while the list holds the first client
        desk.pump(lambda: main.clients.code.cget("text"), "a second code")
        client.root.withdraw()  # no window manager under Xvfb: the windows overlap
        desk.screenshot("pair-main-window.png")
        client.root.deiconify()
        dialog.destroy()
        asked = confirm(monkeypatch)
        main.clients.table.tree.selection_set([identity])
        desk.pump(lambda: str(main.clients.revoke_button.cget("state")) == "normal", "Revoke to be enabled")
        main.clients.revoke_button.invoke()
        desk.pump(lambda: main.clients.table.tree.get_children() == (), "the list to empty")
        with pytest.raises(RemoteError) as refused:
            client.engine.list_files()
        assert (1, ErrorCode.NOT_PAIRED) == (len(asked), refused.value.code)
        desk.pump(lambda: said(client) == pairing.HOW_TO_PAIR, "the client to say how to pair again")
        assert [] == desk.violations()

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_a_wrong_code_shows_an_error(self, desk):
        """A code other than the one offered is refused in the dialog, and the client is not paired."""
        main = desk.main(PAIRED)
        with main.controller.holder.use() as engine:
            address = engine.server.address
            offered = engine.offer_pairing_code()
        wrong = "ABCD-EFGH" if offered != "ABCD-EFGH" else "HGFE-DCBA"
        client = desk.client(address)
        dialog = pair_in_dialog(desk, client, wrong)
        assert dialog.result.cget("text").startswith("Pairing failed: the code did not match")
        assert ([], True) == (engine.paired_clients(), "Pairing failed: the code did not match" in client.banner.text)
        assert [] == desk.violations()

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_an_unreachable_server_is_said(self, desk, tmp_path):
        """Pairing with no server listening says that no server answers."""
        client = desk.client(("127.0.0.1", free_port()))
        dialog = pair_in_dialog(desk, client, "ABCD-EFGH")
        assert dialog.result.cget("text").startswith("No server answers")
        assert [] == desk.violations()


class TestCopyWebToken:
    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_copy_web_token_puts_the_operators_token_on_the_clipboard(self, desk):
        """Copy web token copies a token the server accepts (as its operator's), without showing it."""
        main = desk.main(PAIRED)
        with main.controller.holder.use() as engine:
            expected = engine.operator_token()
            holder = engine.tokens.holder(expected)
        main.clients.token_button.invoke()
        desk.pump(lambda: main.clients.code_line.cget("text") == pairing.WEB_TOKEN_COPIED, "the copied line")
        assert (expected, True, False) == (main.root.clipboard_get(), holder is not None,
                                           expected in main.clients.code_line.cget("text"))
        assert [] == desk.violations()

    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_a_clipboard_that_fails_never_puts_the_token_in_the_log(self, desk, monkeypatch, caplog):
        """The window logs an event it could not show; the token's event is logged without the token."""
        main = desk.main(PAIRED)
        with main.controller.holder.use() as engine:
            token = engine.operator_token()

        def refuse(*_args, **_kwargs):
            raise RuntimeError("the clipboard is gone")

        monkeypatch.setattr(main.root, "clipboard_append", refuse)
        main.clients.token_button.invoke()
        desk.pump(lambda: "could not show" in caplog.text, "the window to log the event it could not show")
        assert (True, False) == ("WebTokenReady" in caplog.text, token in caplog.text)


class TestAddRefusesNamesWithNoRoomForAPartFile:
    @pytest.mark.timeout(GUI_TEST_TIMEOUT)
    def test_add_files_refuses_such_a_name(self, desk, monkeypatch, tmp_path):
        """Add Files… of a file whose "<name>.part" could not exist says why in the banner; no row appears."""
        main = desk.main()
        long_file = tmp_path / ("é" * 123 + ".bin")
        long_file.write_bytes(b"data")
        monkeypatch.setattr(mw.filedialog, "askopenfilenames", lambda **_: (str(long_file),))
        main.add_button.invoke()
        desk.pump(lambda: main.banner.text, "the error banner")
        assert (True, ()) == ("partial download" in main.banner.text, main.table.tree.get_children())


def free_port() -> int:
    """A port nothing listens on (bound a moment ago, then closed)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
