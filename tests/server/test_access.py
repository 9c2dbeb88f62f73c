"""Who may download: paired mode, pairing by one-time code over real TLS, revocation, counts once per client."""
from __future__ import annotations

import base64
import sqlite3
import subprocess
import sys

import pytest
from conftest import (
    TLS,
    LONG_TIMEOUT,
    ROOT,
    SHORT_TIMEOUT,
    TlsRelay,
    TlsServer,
    client_config_for,
    make_config,
    make_file,
    run_client,
    wait_until,
    write_config,
)

from config_loader import load_config
from error_handler import ConfigError, MiniTorrentError, RemoteError
from minitorrent.client.engine import ClientEngine
from minitorrent.common.launcher import free_port
from minitorrent.net.remote import ServerSession
from minitorrent.server.access import ACCESS_FILE, AccessList
from minitorrent.server.backup import BackupServer
from minitorrent.server.main import MainServer
from minitorrent.server.replication import encode_document
from minitorrent.wire import protocol
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.protocol import ErrorCode
from minitorrent.wire.tls import ClientTls, ServerTls, server_identity
from minitorrent.wire.transport import Connection

PAIRED = {"server": {"access": "paired"}}
HEARTBEAT = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}


def client_of(tmp_path, address, name: str = "cli", overrides: dict | None = None) -> ClientEngine:
    """A client engine (its own identity in its own folder) of the server at ``address`` only."""
    settings = {"server": {"backup": {"port": 0}}, "client": {"retry_deadline": 1}, **(overrides or {})}
    return ClientEngine(load_config(client_config_for(tmp_path / name, address, settings)))


class IdentitySwappingRelay(TlsServer):
    """A machine in the middle that speaks the protocol: it answers the server's identity challenge with
    its own identity (a client's proof names the relay and would fail) and relays everything else."""

    def __init__(self, tls: ServerTls, target: tuple[str, int]) -> None:
        self.target = target
        super().__init__(tls, self._relay)

    def _relay(self, sock) -> None:
        down = Connection(sock, io_timeout_s=SHORT_TIMEOUT)
        up = Connection.dial(*self.target, io_timeout_s=SHORT_TIMEOUT, secure=ClientTls())
        nonce = ""
        while True:
            frame = down.recv()
            if isinstance(frame.message, protocol.Identify):
                up.send(protocol.Identify(*self.tls.identity.identify(server_identity(up.sock), nonce)))
            else:
                up.send(frame.message, frame.payload)
            reply = up.recv()
            nonce = reply.message.nonce if isinstance(reply.message, protocol.Welcome) else nonce
            down.send(reply.message, reply.payload)


class TestPairedMode:
    def test_an_unpaired_client_is_told_to_ask_for_a_code(self, tmp_path, server_factory):
        """In paired mode a client whose identity was not accepted gets NOT_PAIRED and the way out."""
        server = server_factory(PAIRED)
        client = client_of(tmp_path, server.server.address)
        try:
            with pytest.raises(RemoteError) as refused:
                client.list_files()
        finally:
            client.close()
        assert ErrorCode.NOT_PAIRED == refused.value.code
        assert refused.value.message.startswith("not paired: ask the server's operator for a code")

    def test_paired_mode_refuses_to_run_without_tls(self, tmp_path):
        """server.access: paired with transfer.encrypt false stops with one line naming both keys."""
        config = make_config(tmp_path, {"server": {"access": "paired"}, "transfer": {"encrypt": False}})
        with pytest.raises(ConfigError, match="server.access: paired needs transfer.encrypt: true"):
            MainServer(config)

    def test_open_mode_serves_anyone(self, tmp_path, server_factory):
        """In open mode (the default) a client nobody paired lists the catalog."""
        server = server_factory()
        server.add_file(make_file(tmp_path / "src" / "a.bin", 100))
        client = client_of(tmp_path, server.server.address)
        try:
            assert ["a.bin"] == [entry["name"] for entry in client.list_files()]
        finally:
            client.close()


class TestPairing:
    def test_the_right_code_pairs_and_the_client_may_download(self, tmp_path, server_factory):
        """With the operator's code the client pairs (both learn the other's identity) and may list."""
        server = server_factory(PAIRED)
        client = client_of(tmp_path, server.server.address)
        try:
            code = server.offer_pairing_code()
            assert server.identity.id == client.pair(code.lower())
            assert [] == client.list_files()
        finally:
            client.close()
        assert [client.identity.id] == [identity for identity, _ in server.paired_clients()]
        assert ("paired", client.identity.id) == server.access.code_state(code)

    def test_a_wrong_code_is_refused_and_spends_the_code(self, tmp_path, server_factory):
        """A wrong code fails on both sides; the right code is then spent too (one attempt per code)."""
        server = server_factory(PAIRED)
        client = client_of(tmp_path, server.server.address)
        code = server.access.offer_code()
        wrong = "AAAA-AAAA" if code != "AAAA-AAAA" else "BBBB-BBBB"
        try:
            with pytest.raises(MiniTorrentError, match="pairing failed: the code did not match"):
                client.pair(wrong)
            with pytest.raises(RemoteError) as spent:
                client.pair(code)
        finally:
            client.close()
        assert ErrorCode.PAIRING_FAILED == spent.value.code
        assert [] == server.access.paired()

    def test_a_relay_cannot_pass_on_a_clients_identity(self, tmp_path, server_factory):
        """A TLS relay with its own certificate (trusted on first use): the client's identity proof fails."""
        server = server_factory(PAIRED)
        relay = TlsRelay(ServerTls(load_or_create(tmp_path / "mitm")), server.server.address)
        client = client_of(tmp_path, ("127.0.0.1", relay.port))
        try:
            with pytest.raises(MiniTorrentError, match="identity proof refused"):
                client.pair(server.access.offer_code())
        finally:
            client.close()
            relay.close()
        assert [] == server.access.paired()

    def test_a_machine_in_the_middle_with_the_right_code_cannot_pair(self, tmp_path, server_factory):
        """A relay that proves its own identity to the server and passes the pairing on: the right code fails."""
        server = server_factory(PAIRED)
        relay = IdentitySwappingRelay(ServerTls(load_or_create(tmp_path / "mitm")), server.server.address)
        client = client_of(tmp_path, ("127.0.0.1", relay.port))
        try:
            with pytest.raises(MiniTorrentError, match="pairing failed: the code did not match"):
                client.pair(server.access.offer_code())
        finally:
            client.close()
            relay.close()
        assert [] == server.access.paired()


def certificate_on_an_unusual_curve(folder) -> str:
    """Base64 DER of a self-signed certificate whose key is on sect163k1 (openssl makes it; cryptography cannot
    load that curve)."""
    key, der = folder / "k.pem", folder / "c.der"
    subprocess.run(["openssl", "ecparam", "-name", "sect163k1", "-genkey", "-out", str(key)], check=True,
                   capture_output=True, timeout=SHORT_TIMEOUT)
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", str(key), "-subj", "/CN=x", "-days", "1",
                    "-outform", "DER", "-out", str(der)], check=True, capture_output=True, timeout=SHORT_TIMEOUT)
    return base64.b64encode(der.read_bytes()).decode()


class TestIdentityProofs:
    def test_a_certificate_on_an_unsupported_curve_is_refused_not_a_crash(self, tmp_path, server_factory, caplog):
        """identify with a certificate cryptography cannot load gets AUTH_FAILED, and no traceback is logged."""
        server = server_factory()
        connection = Connection.dial(*server.server.address, io_timeout_s=SHORT_TIMEOUT, secure=ClientTls())
        try:
            connection.send(protocol.Hello(protocol.PROTOCOL_VERSION, "client"))
            connection.recv()
            connection.send(protocol.Identify(certificate_on_an_unusual_curve(tmp_path), base64.b64encode(
                b"x" * 64).decode()))
            reply = connection.recv().message
        finally:
            connection.close()
        crashed = "Traceback" in caplog.text or "internal error" in caplog.text
        assert (ErrorCode.AUTH_FAILED, False) == (reply.code, crashed)


class TestRevocation:
    def test_a_revoked_client_is_refused_even_on_an_open_connection(self, tmp_path, server_factory):
        """After revoke, the paired client's next request fails NOT_PAIRED, on its pooled connection too."""
        server = server_factory(PAIRED)
        client = client_of(tmp_path, server.server.address)
        try:
            client.pair(server.access.offer_code())
            assert [] == client.list_files()
            assert server.revoke_client(client.identity.id)
            with pytest.raises(RemoteError) as refused:
                client.list_files()
        finally:
            client.close()
        assert ErrorCode.NOT_PAIRED == refused.value.code


def report_batch(kind: str, pairs: list[tuple[str, str]]) -> tuple[protocol.Message, type, bytes]:
    """(request, reply type, payload) reporting ``pairs`` downloaded in one request of ``kind``."""
    names, sha256s = [name for name, _ in pairs], [sha256 for _, sha256 in pairs]
    if kind == "downloaded_batch":
        return protocol.ReportDownloadedBatch(), protocol.Ok, protocol.encode_batch(names, sha256s)
    return protocol.ReportDownloadedMany(names, sha256s), protocol.Ok, b""


class TestReports:
    def test_a_download_counts_once_per_identified_client_and_file(self, tmp_path, server_factory):
        """Reports: the same client twice counts once, another client once more, an unidentified one never."""
        server = server_factory()
        record = server.add_file(make_file(tmp_path / "src" / "a.bin", 100)).record
        report = protocol.ReportDownloaded("a.bin", record.sha256)
        anonymous = ClientTls()  # TLS, but proves no identity
        for secure in (ClientTls(identity=load_or_create(tmp_path / "one")),) * 2 + (
                ClientTls(identity=load_or_create(tmp_path / "two")), anonymous):
            session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT, secure=secure)
            session.call(report, protocol.Ok)
            session.close()
        assert {"a.bin": 2} == server.catalog.download_counts()

    @pytest.mark.parametrize("kind", ["downloaded_batch", "downloaded_many"])
    def test_a_batch_of_reports_counts_once_per_identified_client_and_file(self, tmp_path, server_factory, kind):
        """Batches of reports keep the rule too: a client reporting a file again (even twice in one batch), or a
        stranger with no identity, adds nothing; another client adds one; two names of one content are two files."""
        server = server_factory()
        a = server.add_file(make_file(tmp_path / "src" / "a.bin", 100)).record
        server.add_file(make_file(tmp_path / "src" / "copy of a.bin", 100))  # the same bytes (the same seed)
        pairs = [("a.bin", a.sha256), ("a.bin", a.sha256), ("copy of a.bin", a.sha256)]
        for secure in (ClientTls(identity=load_or_create(tmp_path / "one")),) * 2 + (
                ClientTls(identity=load_or_create(tmp_path / "two")), ClientTls()):
            session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT, secure=secure)
            try:
                session.call(*report_batch(kind, pairs), protocol.Ok)
            finally:
                session.close()
        assert {"a.bin": 2, "copy of a.bin": 2} == server.catalog.download_counts()

    def test_the_access_list_notes_each_file_once_and_nothing_malformed(self, tmp_path):
        """first_reports: a file once (even listed twice), never for no identity, never a name with a NUL or a digest
        cut short (the texts SQLite cuts could be misread)."""
        access = AccessList(tmp_path)
        sha = "a" * 64
        try:
            first = access.first_reports("me", [("a.txt", sha), ("a.txt", sha), ("b\x00c", sha), ("d.txt", sha[:60])])
            again = access.first_reports("me", [("a.txt", sha), ("b.txt", sha)])
            stranger = access.first_reports("", [("c.txt", sha)])
        finally:
            access.close()
        assert ([("a.txt", sha)], [("b.txt", sha)], []) == (first, again, stranger)

    def test_reports_of_files_not_shared_are_not_kept(self, tmp_path, server_factory):
        """A thousand made-up names reported: nothing counted, and nothing kept in the access list (it cannot be
        grown with names a client makes up)."""
        server = server_factory()
        server.add_file(make_file(tmp_path / "src" / "a.bin", 100))
        made_up = [(f"nope {i}.bin", "0" * 64) for i in range(1000)]
        session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT,
                                     secure=ClientTls(identity=load_or_create(tmp_path / "one")))
        try:
            session.call(*report_batch("downloaded_batch", made_up), protocol.Ok)
        finally:
            session.close()
        with sqlite3.connect(server.config.server.main.data_dir / ACCESS_FILE) as db:
            kept = db.execute("SELECT COUNT(*) FROM reported_files").fetchone()[0]
        assert ({"a.bin": 0}, 0) == (server.catalog.download_counts(), kept)

    def test_an_unidentified_client_cannot_announce(self, tmp_path, server_factory):
        """An announcement from a connection that proved no identity is refused."""
        server = server_factory()
        session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT, secure=ClientTls())
        try:
            with pytest.raises(RemoteError) as refused:
                session.call(protocol.Announce(7000), protocol.Ok, protocol.encode_holdings({}))
        finally:
            session.close()
        assert ErrorCode.BAD_REQUEST == refused.value.code
        assert 0 == server.server.tracker.peer_count()


class TestReplication:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_the_backup_holds_the_paired_list_and_applies_it_after_failover(self, tmp_path):
        """Pairing and revoking on the main reach the backup, which after a failover serves only paired clients."""
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {
            "access": "paired", "cluster_key_file": str(tmp_path / "cluster.key"), "backup": {"port": 0, **HEARTBEAT}}}))
        backup.start()
        main = MainServer(make_config(tmp_path / "main", {"server": {
            "access": "paired", "cluster_key_file": str(tmp_path / "cluster.key"),
            "main": {"port": 0}, "backup": {"port": backup.server.address[1], **HEARTBEAT}}}))
        main.start()
        paired = client_of(tmp_path, main.server.address, "paired")
        stranger = client_of(tmp_path, backup.server.address, "stranger")
        try:
            main.access.pair(stranger.identity.id)
            main.access.revoke(stranger.identity.id)
            paired.pair(main.access.offer_code())  # last: the list the backup must end with
            wait_until(lambda: [paired.identity.id] == [i for i, _ in backup.access.paired()], SHORT_TIMEOUT,
                       "the backup to hold the paired list")
            main.stop()
            wait_until(lambda: backup.node.role.value == "active", SHORT_TIMEOUT, "the backup to take over")
            on_backup = client_of(tmp_path, backup.server.address, "paired")
            assert [] == on_backup.list_files()
            on_backup.close()
            with pytest.raises(RemoteError) as refused:
                stranger.list_files()
        finally:
            paired.close()
            stranger.close()
            main.stop()
            backup.stop()
        assert ErrorCode.NOT_PAIRED == refused.value.code

    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_the_backup_acknowledges_the_paired_list(self, tmp_path):
        """The backup answers the main's paired_clients with ok (so the main stops sending it), not an error."""
        secret = "k" * 32
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {
            "secret": secret, "access": "paired", "backup": {"port": 0, **HEARTBEAT}}}))
        address = backup.start()
        identity = load_or_create(tmp_path / "someone").id
        peer = ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT, secret=secret, secure=TLS)
        try:
            reply = peer.call(protocol.PairedClients(1), protocol.Ok, encode_document({"clients": [identity]}))
            held = [i for i, _ in backup.access.paired()]
        finally:
            peer.close()
            backup.stop()
        assert ("ok", [identity]) == (reply.message.TYPE, held)


class TestCommands:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_pair_paired_and_revoke_from_the_command_line(self, tmp_path, server_process):
        """main_server.py pair prints a code, client.py pair CODE pairs, paired lists it, revoke removes it."""
        port = free_port()
        settings = {"server": {"access": "paired", "main": {"port": port}, "backup": {"port": 0}},
                    "client": {"retry_deadline": 2}, "logging": {"log_to_file": False}}
        config = write_config(tmp_path, settings)
        server = server_process(config)
        pair = subprocess.Popen([sys.executable, str(ROOT / "main_server.py"), "--config", str(config), "pair"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            code = pair.stdout.readline().split()[2]
            client = run_client(config, "pair", code)
            out, _ = pair.communicate(timeout=LONG_TIMEOUT)
        finally:
            pair.kill()
            pair.wait()
        identity = load_or_create(load_config(config).client.data_dir).id
        listed = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(config), "paired"],
                                capture_output=True, text=True, timeout=LONG_TIMEOUT)
        revoked = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(config), "revoke",
                                  identity], capture_output=True, text=True, timeout=LONG_TIMEOUT)
        refused = run_client(config, "list")
        server.stop()
        assert (0, f"paired client {identity}") == (client.returncode, out.strip())
        assert listed.stdout.startswith(identity)
        assert (0, 1) == (revoked.returncode, refused.returncode)
        assert "not paired: ask the server's operator for a code" in refused.stderr
