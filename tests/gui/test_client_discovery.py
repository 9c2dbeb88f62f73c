"""The client window offers the servers it hears on the LAN when no configured server answers.

Real programs, a real window: inside a network namespace this test creates
(multicast never leaves it), a main server announces itself
(``discovery: true``), and a client window whose configured server does not
exist lists it, is told to use it, pins its identity, connects, and on the
next start uses it again without asking. The window is on the suite's
display (Xvfb's socket is a file, which a network namespace does not hide).
The client's config leaves ``discovery`` unset, as a new user's does. The
rest runs without mDNS.
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest
from conftest import make_config, private_network_available, run_in_private_network

from minitorrent.client.engine import ClientEngine
from minitorrent.gui.client_logic import (
    discovery_wanted,
    found_server_row,
    saved_server,
)
from minitorrent.net.discovery import FoundServer
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.tls import IdentityRefused

WINDOW_TEST_TIMEOUT_S = 150  # two windows, a server start, two 3 s listens, under load
SERVER = FoundServer("main-server", "192.0.2.7", 5701, "ABCDEFG-HIJKLMN", "active", 4)


class TestChoosingLogic:
    def test_listens_once_per_outage_unless_discovery_is_false(self):
        """The window listens by itself with discovery true or unset, no server answering, not yet this outage."""
        cases = [(True, False, False), (None, False, False), (False, False, False), (True, True, False),
                 (None, False, True)]
        assert [True, True, False, False, False] == [discovery_wanted(*case) for case in cases]

    def test_a_chosen_server_is_remembered_and_read_back_strictly(self):
        """What the window saves comes back equal; a hand-edited entry out of bounds is ignored."""
        assert SERVER == saved_server({"server": vars(SERVER)})
        for bad in ({**vars(SERVER), "port": 70000}, {**vars(SERVER), "host": "fe80::1"},
                    {**vars(SERVER), "epoch": -1}, {**vars(SERVER), "identity": "a b"}, "main-server"):
            assert None is saved_server({"server": bad})

    def test_the_chooser_row_says_name_address_role_epoch_identity(self):
        """Each found server is one row: name, address, role, epoch, identity."""
        expected = ("main-server", "192.0.2.7:5701", "active", "4", "ABCDEFG-HIJKLMN")
        assert expected == found_server_row(SERVER)


class TestUsingAFoundServer:
    def test_the_chosen_identity_is_pinned_and_a_server_presenting_another_is_refused(self, server_factory, tmp_path):
        """Choosing a server pins the identity it announced; a server at that address with another identity is refused."""
        main = server_factory()
        host, port = main.server.address
        announced = load_or_create(tmp_path / "someone-else").id  # well formed, but not this server's
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"port": 1}}}))  # nothing listens on 1
        try:
            engine.use_server(host, port, announced)
            assert {f"{host}:{port}": announced} == engine.server.secure.pins.known()
            with pytest.raises(IdentityRefused):
                engine.list_files()
        finally:
            engine.close()

    def test_a_found_server_with_its_own_identity_serves_the_catalog(self, server_factory, tmp_path):
        """With the identity the server really has, the client lists its catalog through it."""
        main = server_factory()
        main.add_file(_small_file(tmp_path / "src" / "a.txt"))
        host, port = main.server.address
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"port": 1}}}))
        try:
            engine.use_server(host, port, main.identity.id.lower())  # any case, as parse_id accepts
            assert ["a.txt"] == [entry["name"] for entry in engine.list_files()]
        finally:
            engine.close()

    def test_a_different_identity_already_pinned_refuses_the_choice(self, tmp_path):
        """An address pinned to one identity cannot be chosen with another: IdentityRefused, nothing added."""
        first, second = (load_or_create(tmp_path / name).id for name in ("one", "two"))
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"port": 1}}}))
        try:
            engine.use_server("127.0.0.1", 9, first)
            with pytest.raises(IdentityRefused):
                engine.use_server("127.0.0.1", 9, second)
            assert [("127.0.0.1", 1), ("127.0.0.1", 9)] == [(p.host, p.port) for p in engine.server.pools]
        finally:
            engine.close()

    def test_an_announced_identity_that_is_not_one_is_refused(self, tmp_path):
        """A stranger's identity text that fails the identity checks is refused before anything is pinned."""
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"port": 1}}}))
        try:
            with pytest.raises(IdentityRefused):
                engine.use_server("127.0.0.1", 9, "ABCDEFG-HIJKLMN")
            assert ({}, 1) == (engine.server.secure.pins.known(), len(engine.server.pools))
        finally:
            engine.close()


def _small_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"hello")
    return path


# What runs inside the namespace: a main server announcing itself, then two client windows.
WINDOW_SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, tempfile
    from pathlib import Path
    sys.path.insert(0, "tests")
    from conftest import LONG_TIMEOUT, TkThreadGuard, pump_until
    from config_loader import load_config
    from minitorrent.client.engine import ClientEngine
    from minitorrent.common.launcher import ServerProcess, free_port, write_config
    from minitorrent.gui.base import load_settings, open_root
    from minitorrent.gui.client_window import ClientWindow, GEOMETRY
    from minitorrent.gui.shell import TITLES
    from minitorrent.wire.identity import load_or_create
    from minitorrent.wire.tls import PIN_FILE

    folder = Path(tempfile.mkdtemp())
    (folder / "shared.txt").write_text("found without an address")
    server_config = write_config(folder / "server.yaml", {
        "server": {"main": {"port": free_port(), "data_dir": "main"}, "backup": {"port": 0}},
        "logging": {"log_to_file": False}, "discovery": True})
    client_config = write_config(folder / "client.yaml", {  # its configured main: a port where nothing listens
        "server": {"main": {"port": free_port()}, "backup": {"port": 0}},
        "client": {"data_dir": "client", "download_dir": "downloads"},
        "transfer": {"io_timeout": 2.0}, "logging": {"log_to_file": False},
        "discovery": None})  # unset, as in a new user's config: the window listens, the client never announces
    server = ServerProcess(server_config, add=[folder / "shared.txt"])

    def open_window():
        config = load_config(client_config)
        settings = config.client.data_dir / "window.json"
        root = open_root(TITLES["client"], GEOMETRY, settings)
        guard = TkThreadGuard(root)
        return ClientWindow(root, ClientEngine(config), settings), guard, settings

    report = {"port": server.address[1], "identity": load_or_create(folder / "main").id}
    try:
        window, guard, settings = open_window()
        pump_until(window.root, lambda: window.chooser.servers and window.chooser.winfo_ismapped(),
                   LONG_TIMEOUT, "the chooser to list a server")
        report["rows"] = [list(window.chooser.table.tree.item(i, "values"))
                          for i in window.chooser.table.tree.get_children()]
        report["message"] = window.chooser.message.cget("text")
        if os.environ.get("SHOT"):
            window.root.update()
            subprocess.run(["import", "-window", "root", os.environ["SHOT"]], check=False)
        window.chooser.use_button.invoke()
        pump_until(window.root, lambda: window.status is not None and window.catalog.entries,
                   LONG_TIMEOUT, "the window to connect to the chosen server")
        report["catalog"] = [e["name"] for e in window.catalog.entries]
        report["chooser_hidden"] = not window.chooser.winfo_ismapped()
        report["remembered"] = load_settings(settings).get("server")
        report["pinned"] = json.loads((folder / "client" / PIN_FILE).read_text())
        report["violations"] = guard.violations
        window.close()
        again, guard, _ = open_window()  # next run: the remembered server, no listening, no question
        pump_until(again.root, lambda: again.status is not None, LONG_TIMEOUT, "the second window to connect")
        report["again_listened"] = again.chooser.message.cget("text") != ""  # set once it listens
        report["violations"] += guard.violations
        again.close()
    finally:
        server.stop()
    print(json.dumps(report))
""")


class TestWindowOffersFoundServers:
    @pytest.mark.timeout(WINDOW_TEST_TIMEOUT_S)
    def test_the_window_lists_a_server_it_hears_and_uses_the_one_chosen(self, display):
        """No configured server answers: the window lists the announced main (name, address, role, epoch,
        identity); choosing it pins that identity, connects, is remembered, and is used again next start."""
        reason = private_network_available()
        if reason:
            pytest.skip(reason)
        env_shot = os.environ.get("WINDOW_SCREENSHOTS")
        if env_shot:
            os.environ["SHOT"] = os.path.join(env_shot, "client-found-servers.png")
        result = run_in_private_network(WINDOW_SCRIPT, WINDOW_TEST_TIMEOUT_S - 10)
        assert 0 == result.returncode, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        address = f"127.0.0.1:{report['port']}"
        assert [[address, "active", report["identity"]]] == [row[1:3] + row[4:] for row in report["rows"]]
        assert {address: report["identity"]} == {k: v for k, v in report["pinned"].items() if k == address}
        assert (["shared.txt"], True) == (report["catalog"], report["chooser_hidden"])
        assert (report["port"], report["identity"]) == (report["remembered"]["port"], report["remembered"]["identity"])
        assert (False, []) == (report["again_listened"], report["violations"])
