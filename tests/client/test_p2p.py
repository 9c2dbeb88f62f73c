"""Peer-to-peer downloads over real sockets: a crowd helps itself, liars and dead peers change nothing.

Every test here has a main server whose upload is limited, so that peers
matter and a download is still running when a peer misbehaves.
"""
from __future__ import annotations

import atexit
import functools
import json
import logging
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    LONG_TIMEOUT,
    ROOT,
    SHORT_TIMEOUT,
    TLS,
    client_config_for,
    make_config,
    make_file,
    run_client,
    wait_until,
)

from error_handler import ConnectionFailed, RemoteError
from integrity import Manifest, sha256_file
from minitorrent.client.chunkboard import MAX_STRIKES
from minitorrent.client.downloader import MAX_PEERS_PER_DOWNLOAD
from minitorrent.client.engine import ClientEngine
from minitorrent.client.seeding import SeedSource
from minitorrent.common.fs import ChunkLocation
from minitorrent.net.remote import ServerSession
from minitorrent.net.serving import RequestServer
from minitorrent.net.throttle import TokenBucket
from minitorrent.wire import protocol
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.protocol import ErrorCode
from minitorrent.wire.tls import ClientTls, ServerTls
from minitorrent.wire.transport import Connection

MIB = 1024 * 1024
IO_TIMEOUT_S = 1.0  # a silent peer is given up on after this long
SLACK_S = 5.0  # start-up, hashing and a busy machine, on top of the expected time


def client_overrides(seeding: bool, **transfer) -> dict:
    return {"client": {"seeding": seeding},
            "transfer": {"announce_interval": 0.5, "io_timeout": IO_TIMEOUT_S, **transfer}}


def engine_for(folder: Path, server, seeding: bool = False, on_progress=None, **transfer) -> ClientEngine:
    """A client of ``server`` with short announce and I/O timeouts; ``transfer`` overrides more keys."""
    host, port = server.server.address
    overrides = client_overrides(seeding, **transfer)
    overrides["server"] = {"main": {"host": host, "port": port}}
    return ClientEngine(make_config(folder, overrides), on_progress=on_progress)


def shared_file(tmp_path: Path, server, size: int, name: str = "movie.bin", seed: int = 1) -> tuple[Path, Manifest]:
    """Add a file of ``size`` random bytes to ``server``; its path and manifest."""
    source = make_file(tmp_path / "src" / name, size, seed=seed)
    server.add_file(source)
    header, digests = server.catalog.manifest(name)
    return source, Manifest.from_header(header, digests)


def peer_bytes(sources: dict[str, int]) -> int:
    return sum(n for label, n in sources.items() if label.startswith("peer "))


@functools.cache
def peer_tls() -> ServerTls:
    """The TLS identity every hand-made peer of these tests presents (made once per run)."""
    folder = Path(tempfile.mkdtemp(prefix="p2p-peer-"))
    atexit.register(shutil.rmtree, folder, True)
    return ServerTls(load_or_create(folder))


def announce_fake_peer(server, port: int, files: dict[str, bytes | None]) -> None:
    """Tell ``server``'s tracker that 127.0.0.1:``port`` holds ``files`` (with ``peer_tls``'s identity)."""
    as_peer = ClientTls(identity=peer_tls().identity)
    session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT, secure=as_peer)
    try:
        session.call(protocol.Announce(port), protocol.Ok, protocol.encode_holdings(files))
    finally:
        session.close()


def start_seeder(source, idle_timeout_s: float = SHORT_TIMEOUT, **options) -> tuple[RequestServer, int]:
    """A started seeder-like RequestServer over ``source`` on 127.0.0.1; it and its port."""
    server = RequestServer(source, host="127.0.0.1", port=0, name="seeder", max_connections=4,
                           idle_timeout_s=idle_timeout_s, io_timeout_s=SHORT_TIMEOUT, tls=peer_tls(), **options)
    return server, server.start()[1]


def holding_all(source: Path, manifest: Manifest) -> SeedSource:
    """A SeedSource holding the whole of ``source``."""
    seed_source = SeedSource()
    seed_source.add_complete(source, "movie.bin", manifest)
    return seed_source


class BackgroundDownload:
    """``engine.download`` in a thread, so the test can act meanwhile; ``result()`` re-raises its error."""

    def __init__(self, engine: ClientEngine, output: Path) -> None:
        self._outcome: list = []
        self._errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(engine, output), name="test-download")

    def _run(self, engine: ClientEngine, output: Path) -> None:
        try:
            self._outcome.append(engine.download("movie.bin", output))
        except BaseException as error:  # handed to the test thread by result()
            self._errors.append(error)

    def start(self) -> "BackgroundDownload":
        self.thread.start()
        return self

    @property
    def failed(self) -> bool:
        return bool(self._errors)

    def result(self, timeout: float = LONG_TIMEOUT):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the download did not end within {timeout} s"
        if self._errors:
            raise self._errors[0]
        return self._outcome[0]


# Misbehaving peers ---------------------------------------------------------------------------


class GarbageSource:
    """A FileSource that claims to hold a content and serves garbage of the right length for every chunk."""

    def __init__(self, garbage: Path, manifest: Manifest) -> None:
        self.garbage = garbage
        self.manifest = manifest

    def list_files(self, search: str = "", offset: int = 0, limit: int | None = None) -> tuple[list[dict], int]:
        return [], 0

    def count_files(self) -> tuple[int, int]:
        return 0, 0

    def manifest(self, name: str) -> tuple[dict, bytes]:
        raise protocol.RequestFailed(ErrorCode.NOT_FOUND, "no manifests here")

    def locate_chunk(self, name: str, sha256: str, index: int) -> ChunkLocation:
        offset, length = self.manifest.chunk_span(index)
        return ChunkLocation(str(self.garbage), offset, length)

    def record_download(self, name: str, sha256: str) -> None:
        pass


class SilentPeer:
    """A TCP server that accepts and never answers; with ``greet`` it says welcome first, then goes silent.

    It keeps reading (so the client's writes never block) and counts what it
    was asked for.
    """

    def __init__(self, greet: bool) -> None:
        self.greet = greet
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.chunk_requests = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._sockets.append(sock)
            threading.Thread(target=self._absorb, args=(sock,), daemon=True).start()

    def _absorb(self, sock: socket.socket) -> None:
        connection = Connection(sock, io_timeout_s=LONG_TIMEOUT, idle_timeout_s=LONG_TIMEOUT)
        try:
            if not self.greet:
                while sock.recv(65536):
                    pass
                return
            sock = peer_tls().wrap(sock)
            peer_tls().handshake(sock, LONG_TIMEOUT)
            connection = Connection(sock, io_timeout_s=LONG_TIMEOUT, idle_timeout_s=LONG_TIMEOUT)
            connection.recv()  # the hello
            connection.send(protocol.Welcome(protocol.PROTOCOL_VERSION, "active", 0, "silent", "seeder", ""))
            while True:
                if isinstance(connection.recv().message, protocol.GetChunk):
                    self.chunk_requests += 1
        except (OSError, ConnectionFailed, protocol.ProtocolError):
            pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for sock in self._sockets:
            sock.close()


class HangUpPeer:
    """A TCP server that accepts and closes at once: a peer that is gone but still listed by the tracker."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            sock.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


class SeedProcess:
    """A real `client.py seed` process, after a real `client.py get` in the same client folder."""

    BANNER = re.compile(r"seeding (\d+) files \(.*\) on ([\d.]+):(\d+)")

    def __init__(self, config: Path) -> None:
        self.process = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "--config", str(config), "seed"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.banner = threading.Event()
        self.match: re.Match | None = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self.banner.wait(LONG_TIMEOUT) or self.match is None:
            self.kill()
            raise AssertionError(f"client.py seed did not start: {self.lines} {self.process.stderr.read()}")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            match = self.BANNER.search(line)
            if match and self.match is None:
                self.match = match
                self.banner.set()
        self.banner.set()

    @classmethod
    def after_get(cls, folder: Path, server, upload_limit: int = 0) -> "SeedProcess":
        config = client_config_for(folder, server.server.address, client_overrides(True, upload_limit=upload_limit))
        got = run_client(config, "get", "movie.bin")
        assert 0 == got.returncode, got.stderr
        return cls(config)

    @property
    def files(self) -> int:
        return int(self.match.group(1))

    @property
    def port(self) -> int:
        return int(self.match.group(3))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(SHORT_TIMEOUT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# The crowd ----------------------------------------------------------------------------------


class TestSwarm:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_three_seeding_clients_share_the_load(self, tmp_path, server_factory):
        """Three seeding clients fetch one file from a 4 MB/s server: all byte-exact, peers carry part of it."""
        size = 16 * MIB
        server = server_factory({"transfer": {"upload_limit": 4_000_000, "chunk_size": 256 * 1024,
                                              "max_connections": 30}})
        source, _ = shared_file(tmp_path, server, size)
        clients = 3
        results: dict[int, object] = {}
        seeders = []
        errors: list[BaseException] = []
        everyone_done = threading.Event()
        lock = threading.Lock()

        def one_client(n: int) -> None:
            engine = engine_for(tmp_path / f"client{n}", server, seeding=True)
            seeders.append(engine.seeder)
            try:
                engine.start_seeding()
                result = engine.download("movie.bin", tmp_path / f"out{n}")
                with lock:
                    results[n] = result
                    if len(results) == clients:
                        everyone_done.set()
                everyone_done.wait(LONG_TIMEOUT)  # keep seeding until the crowd is done
            except BaseException as error:  # reported by the test thread
                errors.append(error)
                everyone_done.set()
            finally:
                engine.close()

        threads = [threading.Thread(target=one_client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LONG_TIMEOUT * 2)
        assert [] == errors
        assert [False] * clients == [thread.is_alive() for thread in threads]
        expected = sha256_file(source)
        assert [expected] * clients == [sha256_file(results[n].path) for n in range(clients)]
        assert [size] * clients == [sum(results[n].sources.values()) for n in range(clients)]
        from_peers = sum(peer_bytes(results[n].sources) for n in range(clients))
        sent = server.metrics.snapshot()["bytes_sent"]
        assert from_peers > 0, f"no bytes came from peers: {[results[n].sources for n in range(clients)]}"
        assert sent < clients * size, f"the server sent {sent} bytes for {clients} x {size}"
        assert [0] * clients == [results[n].duplicate_chunks for n in range(clients)]
        uploaded = sum(seeder.metrics.snapshot()["bytes_sent"] for seeder in seeders)
        assert uploaded >= from_peers, "the seeders' upload metrics missed bytes their peers received"

    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_download_in_progress_seeds_its_verified_chunks(self, tmp_path, server_factory):
        """Mid-download, a seeding client is tracked with a partial bitmap and serves exactly those chunks."""
        server = server_factory({"transfer": {"upload_limit": 2_000_000, "chunk_size": 64 * 1024}})
        source, manifest = shared_file(tmp_path, server, 6 * MIB)
        engine = engine_for(tmp_path / "seeding", server, seeding=True)
        seed_host, seed_port = engine.start_seeding()
        download = BackgroundDownload(engine, tmp_path / "out").start()
        try:
            def partial_entry():
                for host, port, have in server.server.tracker.peers_for(manifest.sha256, None):
                    if port == seed_port and have is not None:
                        held = protocol.bitmap_to_chunks(have, manifest.chunk_count)
                        if 0 < len(held) < manifest.chunk_count:
                            return held
                return None

            held = wait_until(partial_entry, what="a partial announcement")
            missing = set(range(manifest.chunk_count)) - held
            session = ServerSession.open(seed_host, seed_port, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
            try:
                index = min(held)
                frame = session.call(protocol.GetChunk("movie.bin", manifest.sha256, index), protocol.ChunkData)
                assert manifest.verify_chunk(index, frame.payload)
                with pytest.raises(RemoteError) as caught:
                    session.call(protocol.GetChunk("movie.bin", manifest.sha256, max(missing)), protocol.ChunkData)
                assert ErrorCode.NOT_FOUND == caught.value.code
            finally:
                session.close()
            assert sha256_file(source) == sha256_file(download.result().path)
            wait_until(lambda: (seed_host, seed_port, None) in
                       [(h, p, have) for h, p, have in server.server.tracker.peers_for(manifest.sha256, None)],
                       what="the finished file to be announced whole")
        finally:
            download.thread.join(LONG_TIMEOUT)
            engine.close()


class TestLyingPeer:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_corrupt_peer_is_struck_out_and_download_is_exact(self, tmp_path, server_factory, caplog):
        """A peer serving garbage gets MAX_STRIKES strikes, is dropped, never reconnected; the file is exact."""
        server = server_factory({"transfer": {"upload_limit": 4_000_000, "chunk_size": 128 * 1024}})
        source, manifest = shared_file(tmp_path, server, 4 * MIB)
        garbage = make_file(tmp_path / "garbage.bin", manifest.size, seed=99)
        liar, liar_port = start_seeder(GarbageSource(garbage, manifest))
        engine = engine_for(tmp_path / "cli", server)
        try:
            announce_fake_peer(server, liar_port, {manifest.sha256: None})
            with caplog.at_level(logging.WARNING, logger="downloader"):
                result = engine.download("movie.bin", tmp_path / "out")
        finally:
            engine.close()
            liar.stop()
        assert sha256_file(source) == sha256_file(result.path)
        strikes = [r.getMessage() for r in caplog.records
                   if "failed SHA-256 verification (strike" in r.getMessage() and f":{liar_port}" in r.getMessage()]
        assert [f"strike {n}" for n in range(1, MAX_STRIKES + 1)] == [re.search(r"strike \d+", m).group()
                                                                       for m in strikes]
        assert strikes[-1].endswith("; dropped)")
        assert 1 == liar.metrics.snapshot()["connections_total"]
        assert {"server": manifest.size} == result.sources

    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_peer_announcing_more_than_it_holds_still_helps(self, tmp_path, server_factory):
        """A peer whose announcement is ahead of it (NOT_FOUND for some chunks) keeps serving what it holds."""
        server = server_factory({"transfer": {"upload_limit": 2_000_000, "chunk_size": 128 * 1024}})
        source, manifest = shared_file(tmp_path, server, 4 * MIB)
        half = set(range(0, manifest.chunk_count, 2))
        seed_source = SeedSource()
        seed_source.update_partial(source, "movie.bin", manifest, half)
        seeder, seed_port = start_seeder(seed_source)
        engine = engine_for(tmp_path / "cli", server)
        try:
            announce_fake_peer(server, seed_port, {manifest.sha256: protocol.chunks_to_bitmap(
                set(range(manifest.chunk_count)), manifest.chunk_count)})
            result = engine.download("movie.bin", tmp_path / "out")
        finally:
            engine.close()
            seeder.stop()
        assert sha256_file(source) == sha256_file(result.path)
        assert peer_bytes(result.sources) > 0
        assert 1 == seeder.metrics.snapshot()["connections_total"]  # refusals did not drop it


class TestVanishingPeers:
    @pytest.mark.timeout(LONG_TIMEOUT)
    @pytest.mark.parametrize("greet", [False, True], ids=["silent-from-accept", "silent-after-welcome"])
    def test_silent_peer_is_given_up_on(self, tmp_path, server_factory, greet):
        """A peer that never answers delays the download by about io_timeout, no more; its chunks go elsewhere."""
        size, limit = 4 * MIB, 4_000_000
        server = server_factory({"transfer": {"upload_limit": limit, "chunk_size": 128 * 1024}})
        source, manifest = shared_file(tmp_path, server, size)
        silent = SilentPeer(greet)
        engine = engine_for(tmp_path / "cli", server)
        try:
            announce_fake_peer(server, silent.port, {manifest.sha256: None})
            result = engine.download("movie.bin", tmp_path / "out")
        finally:
            engine.close()
            silent.close()
        assert sha256_file(source) == sha256_file(result.path)
        assert 1 == silent.connections
        if greet:
            assert silent.chunk_requests > 0, "the silent peer was never asked for chunks: nothing was reassigned"
        bound = size / limit + IO_TIMEOUT_S + SLACK_S
        assert result.seconds < bound, f"took {result.seconds:.1f} s (bound {bound:.1f} s)"
        assert {"server": size} == result.sources

    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_seed_process_killed_mid_transfer(self, tmp_path, server_factory):
        """A real `client.py seed` peer SIGKILLed mid-transfer: the download finishes exact from the server."""
        size, limit = 8 * MIB, 2_000_000
        server = server_factory({"transfer": {"chunk_size": 128 * 1024, "max_connections": 20}})
        source, manifest = shared_file(tmp_path, server, size)
        seed = SeedProcess.after_get(tmp_path / "seed", server, upload_limit=1_000_000)
        server.server.upload_limit.set_rate(limit)  # from now on the server is the slow source
        latest: list = []
        engine = engine_for(tmp_path / "cli", server, on_progress=latest.append)
        download = BackgroundDownload(engine, tmp_path / "out")
        try:
            wait_until(lambda: server.server.tracker.peers_for(manifest.sha256, None), what="the seed's announcement")
            download.start()
            wait_until(lambda: download.failed or (latest and peer_bytes(latest[-1].sources) >= 256 * 1024),
                       timeout=LONG_TIMEOUT, what="the seed process to serve some chunks")
            seed.kill()
            killed_at = time.monotonic()
            result = download.result()
            after_kill_s = time.monotonic() - killed_at
        finally:
            seed.kill()
            download.thread.join(LONG_TIMEOUT)
            engine.close()
        assert sha256_file(source) == sha256_file(result.path)
        assert peer_bytes(result.sources) > 0
        assert size == sum(result.sources.values())
        bound = size / limit + IO_TIMEOUT_S + SLACK_S
        assert after_kill_s < bound, f"{after_kill_s:.1f} s after the kill (bound {bound:.1f} s)"


# The seed command -------------------------------------------------------------------------------


class TestFolderFromPeers:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_a_one_chunk_file_of_a_folder_comes_from_a_peer_holding_it(self, tmp_path, server_factory):
        """A folder's 300 KiB photo (one chunk) comes from the peer that holds it; its 2 KB note from the server."""
        server = server_factory({"transfer": {"upload_limit": 100_000}})  # 3 s for the photo from the server
        photo = make_file(tmp_path / "src" / "album" / "photo.jpg", 300 * 1024, seed=5)
        make_file(tmp_path / "src" / "album" / "note.txt", 2000, seed=6)
        server.add_folder(tmp_path / "src" / "album")
        header, digests = server.catalog.manifest("album/photo.jpg")
        manifest = Manifest.from_header(header, digests)
        holding = SeedSource()
        holding.add_complete(photo, "album/photo.jpg", manifest)
        seeder, port = start_seeder(holding)
        announce_fake_peer(server, port, {manifest.sha256: None})
        engine = engine_for(tmp_path / "client", server)
        try:
            result = engine.download_folder("album/", tmp_path / "out")
            uploaded = seeder.metrics.snapshot()["bytes_sent"]
        finally:
            engine.close()
            seeder.stop()
        assert (2, [], sha256_file(photo)) == (result.downloaded, result.failed,
                                               sha256_file(tmp_path / "out" / "album" / "photo.jpg"))
        assert uploaded >= 300 * 1024, f"the peer sent {uploaded} bytes"


class TestSeedCommand:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_seed_serves_a_previous_get(self, tmp_path, server_factory):
        """`client.py seed` after `client.py get` serves that file; another client gets bytes from it."""
        server = server_factory({"transfer": {"chunk_size": 128 * 1024, "max_connections": 20}})
        source, manifest = shared_file(tmp_path, server, 4 * MIB)
        seed = SeedProcess.after_get(tmp_path / "seed", server)
        try:
            assert 1 == seed.files
            wait_until(lambda: ("127.0.0.1", seed.port, None) in server.server.tracker.peers_for(manifest.sha256, None),
                       what="the seed's whole-file announcement")
            server.server.upload_limit.set_rate(1_000_000)  # slow enough that the peer matters
            engine = engine_for(tmp_path / "cli", server)
            try:
                result = engine.download("movie.bin", tmp_path / "out")
            finally:
                engine.close()
            assert 0 == seed.stop()
        finally:
            seed.kill()
        assert sha256_file(source) == sha256_file(result.path)
        assert f"peer 127.0.0.1:{seed.port}" in result.sources, result.sources
        assert peer_bytes(result.sources) > 0
        assert any("seeder stopped" in line for line in seed.lines)

    def test_seed_refuses_when_seeding_is_off(self, tmp_path, server_factory):
        """`client.py seed` with client.seeding false says so and exits 2."""
        server = server_factory()
        config = client_config_for(tmp_path / "cli", server.server.address, {"client": {"seeding": False}})
        done = run_client(config, "seed", timeout=SHORT_TIMEOUT * 3)
        assert 2 == done.returncode
        assert "client.seeding is false" in done.stderr


# Peer streams over a download's life: idle connections, free slots, a prompt end ------------------


class TestIdlePeerConnections:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_peer_that_closed_an_idle_connection_is_used_once_it_has_chunks(self, tmp_path, server_factory):
        """A seeder closing an idle peer connection (its idle_timeout) is no failure: once it has chunks, it serves."""
        server = server_factory({"transfer": {"upload_limit": 1_000_000, "chunk_size": 128 * 1024}})
        source, manifest = shared_file(tmp_path, server, 6 * MIB)
        seed_source = SeedSource()
        seed_source.update_partial(source, "movie.bin", manifest, set())
        seeder, seed_port = start_seeder(seed_source, idle_timeout_s=0.3)
        engine = engine_for(tmp_path / "cli", server)
        download = BackgroundDownload(engine, tmp_path / "out")
        try:
            nothing_yet = protocol.chunks_to_bitmap(set(), manifest.chunk_count)
            announce_fake_peer(server, seed_port, {manifest.sha256: nothing_yet})
            download.start()
            wait_until(lambda: seeder.metrics.snapshot()["connections_total"] >= 1, what="the peer stream to connect")
            wait_until(lambda: seeder.metrics.active_connections == 0, what="the seeder to close the idle connection")
            seed_source.add_complete(source, "movie.bin", manifest)
            announce_fake_peer(server, seed_port, {manifest.sha256: None})
            result = download.result()
        finally:
            download.thread.join(LONG_TIMEOUT)
            engine.close()
            seeder.stop()
        assert sha256_file(source) == sha256_file(result.path)
        assert peer_bytes(result.sources) > 0, (
            f"the peer was dropped for closing an idle connection and never used again: {result.sources}")


class TestPeerSlots:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_dropped_peers_free_their_slots(self, tmp_path, server_factory):
        """After MAX_PEERS_PER_DOWNLOAD listed peers all failed, a peer announced later is still used."""
        server = server_factory({"transfer": {"upload_limit": 1_000_000, "chunk_size": 128 * 1024}})
        source, manifest = shared_file(tmp_path, server, 6 * MIB)
        gone = [HangUpPeer() for _ in range(MAX_PEERS_PER_DOWNLOAD)]
        seeder = None
        engine = engine_for(tmp_path / "cli", server)
        download = BackgroundDownload(engine, tmp_path / "out")
        try:
            for peer in gone:
                announce_fake_peer(server, peer.port, {manifest.sha256: None})
            download.start()
            wait_until(lambda: all(peer.connections for peer in gone), what="every listed peer to be tried")
            seeder, seed_port = start_seeder(holding_all(source, manifest))
            announce_fake_peer(server, seed_port, {manifest.sha256: None})
            result = download.result()
        finally:
            download.thread.join(LONG_TIMEOUT)
            engine.close()
            if seeder:
                seeder.stop()
            for peer in gone:
                peer.close()
        assert sha256_file(source) == sha256_file(result.path)
        assert f"peer 127.0.0.1:{seed_port}" in result.sources, (
            f"dropped peers kept their slots, the live peer was never used: {result.sources}")


class TestEndgameEnds:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_slow_peer_does_not_hold_up_a_finished_download(self, tmp_path, server_factory):
        """Once every chunk is verified the download returns promptly, without draining a slow peer's pipeline."""
        server = server_factory({"transfer": {"upload_limit": 1_000_000, "chunk_size": 128 * 1024}})
        source, manifest = shared_file(tmp_path, server, 2 * MIB)
        slow, slow_port = start_seeder(holding_all(source, manifest),
                                       upload_limit=TokenBucket(100_000))  # 1.3 s per chunk: 4 in flight = 5 s
        all_verified_at: list[float] = []

        def note(progress) -> None:
            if progress.chunks_done == progress.chunks_total and not all_verified_at:
                all_verified_at.append(time.monotonic())

        engine = engine_for(tmp_path / "cli", server, on_progress=note, io_timeout=SHORT_TIMEOUT, pipeline_depth=4)
        try:
            announce_fake_peer(server, slow_port, {manifest.sha256: None})
            result = engine.download("movie.bin", tmp_path / "out")
            returned_at = time.monotonic()
        finally:
            engine.close()
            slow.stop()
        assert sha256_file(source) == sha256_file(result.path)
        assert peer_bytes(result.sources) > 0  # the slow peer did take part
        lag = returned_at - all_verified_at[0]
        assert lag < 1.5, f"download returned {lag:.1f} s after its last chunk was verified"


class TestSeederListingPages:
    def test_a_full_last_page_ends_the_listing(self, tmp_path):
        """A seeder's page says more follow only if a held name sorts after it; its entries are UTF-8 JSON."""
        seed_source = SeedSource()
        for index, name in enumerate(["b.bin", "a.bin", "Zürich.bin"]):
            seed_source.add_complete(tmp_path / name, name, Manifest(4, 4, f"{index:064x}", bytes(32)))
        pages = [seed_source.list_page("", after, limit, 0) for after, limit in (("", 3), ("", 2), ("a.bin", 1))]
        assert [([b"Z\xc3\xbcrich.bin", b"a.bin", b"b.bin"], False), ([b"Z\xc3\xbcrich.bin", b"a.bin"], True),
                ([b"b.bin"], False)] == [(re.findall(rb'"name": "([^"]+)"', page.entries), page.more)
                                         for page in pages]

    def test_a_packed_page_holds_what_the_json_page_holds(self, tmp_path):
        """Asked for the packed layout, a seeder's page decodes to the entries of its JSON page."""
        seed_source = SeedSource()
        for index, name in enumerate(["b.bin", "a.bin", "Zürich.bin"]):
            seed_source.add_complete(tmp_path / name, name, Manifest(4, 4, f"{index:064x}", bytes(32)))
        packed = seed_source.list_page("", "", 3, 0, layout=protocol.LIST_LAYOUT_PACKED)
        as_json = seed_source.list_page("", "", 3, 0)
        assert json.loads(as_json.entries) == protocol.decode_list_page(packed.entries, packed.layout, packed.count)
