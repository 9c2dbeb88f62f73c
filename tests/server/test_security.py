"""Security with real processes, sockets and TLS: the shipped pair, pinned identities, men in the middle."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import (
    TLS,
    LONG_TIMEOUT,
    ROOT,
    SHORT_TIMEOUT,
    TlsRelay,
    make_config,
    make_file,
    run_client,
    wait_until,
    write_config,
)

from config_loader import load_config
from integrity import sha256_file
from minitorrent.common.launcher import ServerProcess, free_port
from minitorrent.server.backup import BackupServer
from minitorrent.server.main import MainServer
from minitorrent.wire.identity import IDENTITY_FILE, load_or_create
from minitorrent.wire import auth, protocol
from minitorrent.wire.tls import ServerTls, server_identity
from minitorrent.wire.transport import Connection

HEARTBEAT = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}


class NetworkNamespace:
    """A private network namespace (its own loopback, so the shipped ports 5001/5002 are ours alone)."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && echo ready && exec sleep 3600"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.kill()
            raise OSError(self.holder.stderr.read().strip() or "unshare failed")
        self.prefix = ["nsenter", "-t", str(self.holder.pid), "-n"]

    def run_client(self, config, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, sys.executable, str(ROOT / "client.py"), "--config", str(config), *args],
                              capture_output=True, text=True, timeout=LONG_TIMEOUT)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def namespace():
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs root with unshare and nsenter for a private network namespace")
    try:
        space = NetworkNamespace()
    except OSError as error:
        pytest.skip(f"cannot make a network namespace here: {error}")
    yield space
    space.close()


class TestShippedConfig:
    @pytest.mark.timeout(LONG_TIMEOUT * 3)
    def test_main_backup_and_failover_run_with_no_edits(self, tmp_path, namespace):
        """The shipped config.yaml, unchanged: the pair shares a cluster key, replicates over TLS, fails over."""
        config = tmp_path / "config.yaml"
        shutil.copyfile(ROOT / "config.yaml", config)
        source = make_file(tmp_path / "share" / "movie.bin", 3 * 1024 * 1024 + 5, seed=3)
        main = ServerProcess(config, add=[source], prefix=namespace.prefix)
        backup = ServerProcess(config, script="backup_server.py", prefix=namespace.prefix)
        try:
            def in_sync() -> bool:
                status = namespace.run_client(config, "status", "--json")
                return status.returncode == 0 and json.loads(status.stdout)["backup"].get("in_sync") is True
            wait_until(in_sync, LONG_TIMEOUT, "the backup to hold the main's catalog")
            main.kill()
            got = namespace.run_client(config, "get", "movie.bin", "--output", str(tmp_path / "out"))
        finally:
            main.kill()
            backup.kill()
        assert 0 == got.returncode, got.stderr
        assert sha256_file(source) == sha256_file(tmp_path / "out" / "movie.bin")
        assert 0o600 == stat.S_IMODE((tmp_path / "cluster.key").stat().st_mode)
        banner = next(line for line in main.stdout_lines if "listening on" in line)  # the web page's line follows it
        assert "identity " + load_or_create(tmp_path / "data" / "main").id in banner


class TestClientPinsServers:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_a_server_with_a_new_identity_is_refused_in_one_line(self, tmp_path):
        """client.py pins the main on first use; after the main's identity changes it exits 1 naming both IDs."""
        port = free_port()
        server_config = write_config(tmp_path / "srv", {
            "server": {"main": {"port": port}, "backup": {"port": 0}}, "logging": {"log_to_file": False}})
        client_config = write_config(tmp_path / "cli", {
            "server": {"main": {"port": port}, "backup": {"port": 0}}, "client": {"retry_deadline": 2},
            "logging": {"log_to_file": False}})
        data_dir = load_config(server_config).server.main.data_dir
        server = ServerProcess(server_config)
        try:
            assert 0 == run_client(client_config, "list").returncode
            server.stop()
            old = load_or_create(data_dir).id
            (data_dir / IDENTITY_FILE).unlink()
            server = ServerProcess(server_config)
            refused = run_client(client_config, "list")
        finally:
            server.kill()
        new = load_or_create(data_dir).id
        lines = refused.stderr.strip().splitlines()
        assert (1, 1) == (refused.returncode, len(lines))
        assert [True, True, True] == [old in lines[0], new in lines[0], "known_servers.json" in lines[0]]


class TestPeerLink:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_a_relay_with_its_own_certificate_gets_nothing_replicated(self, tmp_path, caplog):
        """Main and backup share the key, but a TLS relay sits between them: the main refuses the link."""
        shared = {"cluster_key_file": str(tmp_path / "cluster.key")}
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {"backup": {"port": 0, **HEARTBEAT},
                                                                           **shared}}))
        backup.start()
        relay = TlsRelay(ServerTls(load_or_create(tmp_path / "mitm")), backup.server.address)
        main = MainServer(make_config(tmp_path / "main", {"server": {
            "main": {"port": 0}, "backup": {"port": relay.port, **HEARTBEAT}, **shared}}))
        try:
            with caplog.at_level(logging.WARNING):
                main.start()
                main.add_file(make_file(tmp_path / "src" / "a.bin", 1000))
                wait_until(lambda: any("could not prove it knows the cluster key" in r.getMessage()
                                       for r in caplog.records), SHORT_TIMEOUT, "the main to refuse the relay")
            assert relay.connections >= 1
            assert (0, 0) == backup.catalog.count_files()
        finally:
            main.stop()
            relay.close()
            backup.stop()

    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_different_cluster_keys_name_the_file_to_copy(self, tmp_path, caplog):
        """Servers on two machines (two key files): the main's one-line error names the file to copy."""
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {"backup": {"port": 0, **HEARTBEAT}}}))
        backup.start()
        main = MainServer(make_config(tmp_path / "main", {"server": {
            "main": {"port": 0}, "backup": {"port": backup.server.address[1], **HEARTBEAT}}}))
        key = tmp_path / "main" / "cluster.key"
        try:
            with caplog.at_level(logging.WARNING):
                main.start()
                wanted = f"copy {key} from this machine over the backup's cluster key file"
                found = wait_until(lambda: [r.getMessage() for r in caplog.records if wanted in r.getMessage()],
                                   SHORT_TIMEOUT, "the main to say which file to copy")
        finally:
            main.stop()
            backup.stop()
        assert "\n" not in found[0]


class TestBackupIdentity:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_a_configured_backup_identity_is_required_of_the_backup(self, tmp_path, caplog):
        """With server.backup.id set to another identity, the main refuses the real backup (nothing replicated)."""
        shared = {"cluster_key_file": str(tmp_path / "cluster.key")}
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {"backup": {"port": 0, **HEARTBEAT},
                                                                           **shared}}))
        backup.start()
        expected = load_or_create(tmp_path / "the backup we expect").id
        main = MainServer(make_config(tmp_path / "main", {"server": {
            "main": {"port": 0}, "backup": {"port": backup.server.address[1], "id": expected, **HEARTBEAT},
            **shared}}))
        try:
            with caplog.at_level(logging.WARNING):
                main.start()
                main.add_file(make_file(tmp_path / "src" / "a.bin", 1000))
                wait_until(lambda: any(f"not the expected {expected}" in r.getMessage() for r in caplog.records),
                           SHORT_TIMEOUT, "the main to refuse the backup's identity")
            assert (0, 0) == backup.catalog.count_files()
        finally:
            main.stop()
            backup.stop()


class TestMainIdentity:
    """The backup pins the main by ``server.main.id``: the main signs the backup's challenge with its key."""

    def start_pair(self, tmp_path, pinned: str) -> tuple[MainServer, BackupServer]:
        shared = {"cluster_key_file": str(tmp_path / "cluster.key")}
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {
            "backup": {"port": 0, **HEARTBEAT}, "main": {"id": pinned}, **shared}}))
        backup.start()
        main = MainServer(make_config(tmp_path / "main", {"server": {
            "main": {"port": 0, "data_dir": str(tmp_path / "main-data")},
            "backup": {"port": backup.server.address[1], **HEARTBEAT}, **shared}}))
        main.start()
        return main, backup

    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_the_pinned_main_replicates_and_is_named(self, tmp_path, caplog):
        """With server.main.id set to the main's identity, the backup accepts the link and logs who it is."""
        main_id = load_or_create(tmp_path / "main-data").id
        with caplog.at_level(logging.INFO):
            main, backup = self.start_pair(tmp_path, main_id)
            try:
                main.add_file(make_file(tmp_path / "src" / "a.bin", 1000))
                wait_until(lambda: backup.catalog.count_files()[0] == 1, SHORT_TIMEOUT, "the file replicated")
            finally:
                main.stop()
                backup.stop()
        assert any(f"authenticated as {main_id}" in r.getMessage() for r in caplog.records)

    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_a_main_with_another_identity_is_refused_even_with_the_key(self, tmp_path, caplog):
        """A server that knows the cluster key but is not the pinned main replicates nothing to the backup."""
        pinned = load_or_create(tmp_path / "the main we expect").id
        main_id = load_or_create(tmp_path / "main-data").id
        with caplog.at_level(logging.WARNING):
            main, backup = self.start_pair(tmp_path, pinned)
            try:
                main.add_file(make_file(tmp_path / "src" / "a.bin", 1000))
                wait_until(lambda: any(f"it proved identity {main_id}, not {pinned} pinned here" in r.getMessage()
                                       for r in caplog.records), SHORT_TIMEOUT, "the backup to refuse the main")
                assert (0, 0) == backup.catalog.count_files()
            finally:
                main.stop()
                backup.stop()

    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_the_pinned_mains_certificate_without_its_key_is_refused(self, tmp_path):
        """A peer with the cluster key that shows the pinned main's certificate but cannot sign with it gets AUTH_FAILED."""
        secret = "k" * 32
        main_identity = load_or_create(tmp_path / "main-data")
        backup = BackupServer(make_config(tmp_path / "backup", {"server": {
            "secret": secret, "backup": {"port": 0, **HEARTBEAT}, "main": {"id": main_identity.id}}}))
        address = backup.start()
        impostor = load_or_create(tmp_path / "impostor")
        connection = Connection.dial(*address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            bound = server_identity(connection.sock)
            connection.send(protocol.Hello(protocol.PROTOCOL_VERSION, "main", "x", 0, auth.new_nonce()))
            welcome = connection.recv().message
            certificate, _ = main_identity.identify(bound, welcome.nonce)  # the real main's certificate...
            _, signature = impostor.identify(bound, welcome.nonce)  # ...signed with another key
            connection.send(protocol.Authenticate(auth.prove(secret, auth.PEER_PURPOSE, f"{welcome.nonce}{bound}"),
                                                  certificate, signature))
            reply = connection.recv().message
        finally:
            connection.close()
            backup.stop()
        assert (protocol.ErrorReply, protocol.ErrorCode.AUTH_FAILED) == (type(reply), reply.code)
