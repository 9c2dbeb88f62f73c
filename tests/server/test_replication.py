"""Replication between the main and the backup, in-process: the receiver, the replicator's view, the failback fetch.

Real sockets on 127.0.0.1 (port 0) and real SQLite files under ``tmp_path``;
the end-to-end runs with real processes and SIGKILL are in test_failover.py.
"""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import ROOT, SHORT_TIMEOUT, TLS, make_config, make_file, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from database import ClientStore, PartialStore, ServerStore, SQLiteStore
from error_handler import IntegrityError, RemoteError
from integrity import Manifest, build_manifest, manifest_of_file, sha256_file
from minitorrent.common.partfile import PartFile
from minitorrent.net.remote import ServerSession
from minitorrent.server.backup import BackupServer
from minitorrent.server.catalog import Catalog
from minitorrent.server.failback import catch_up_and_take_over, fetch_file
from minitorrent.server.replication import (
    PeerLink,
    ReplicaReceiver,
    decode_document,
    encode_document,
    open_receiving_store,
)
from minitorrent.server.roles import NodeState, Role
from minitorrent.wire import protocol
from minitorrent.wire.protocol import (
    ErrorCode,
    RemoteProtocolError,
    bitmap_to_chunks,
    chunks_to_bitmap,
)

SECRET = "correct horse battery staple"
CHUNK = 64 * 1024


@pytest.fixture
def backup_factory(tmp_path: Path) -> Iterator[Callable[[], BackupServer]]:
    """Start in-process backups (standby for a minute: no promotion mid-test) on one data folder; all stopped after."""
    started: list[BackupServer] = []

    def start() -> BackupServer:
        config = make_config(tmp_path / "backup", {"server": {"secret": SECRET, "backup": {
            "heartbeat_interval": 1, "heartbeat_timeout": 60}}, "transfer": {"chunk_size": CHUNK}})
        backup = BackupServer(config)
        backup.start()
        started.append(backup)
        return backup

    yield start
    for backup in started:
        if not backup.stop_event.is_set():
            backup.stop()


@pytest.fixture
def store(tmp_path) -> Iterator[ServerStore]:
    with ServerStore(tmp_path / "catalog.db") as opened:
        yield opened


def peer_session(backup: BackupServer) -> ServerSession:
    """An authenticated peer link to ``backup``, as the main opens it."""
    host, port = backup.server.address
    return ServerSession.open(host, port, io_timeout_s=SHORT_TIMEOUT, secure=TLS, secret=SECRET)


def offer(session: ServerSession, name: str, manifest: Manifest) -> tuple[bool, set[int]]:
    """Offer a file as the main does; (complete, chunks the backup already holds)."""
    request = protocol.ReplicateFile(name, manifest.size, manifest.chunk_size, manifest.sha256,
                                     manifest.chunk_count, 1.0, manifest.root)
    frame = session.call(request, protocol.ReplicaState, manifest.chunk_digests)
    return frame.message.complete, protocol.bitmap_to_chunks(frame.payload, manifest.chunk_count)


def send_chunk(session: ServerSession, manifest: Manifest, data: bytes, index: int) -> bool:
    """Send one chunk as the main does; True if the backup says the file is now complete."""
    offset, length = manifest.chunk_span(index)
    return session.call(protocol.ReplicateChunk(manifest.sha256, index), protocol.ChunkStored,
                        data[offset:offset + length]).message.complete


def part_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "store").glob(".*"))


def send_all(session: ServerSession, manifest: Manifest, data: bytes, indexes=None) -> list[bool]:
    return [send_chunk(session, manifest, data, i) for i in (range(manifest.chunk_count) if indexes is None
                                                              else indexes)]


def offered(backup: BackupServer, name: str, manifest: Manifest, data: bytes, indexes) -> None:
    """Offer ``name`` to ``backup`` and send it the chunks ``indexes``, on a session of its own."""
    session = peer_session(backup)
    try:
        offer(session, name, manifest)
        send_all(session, manifest, data, indexes)
    finally:
        session.close()


def receive_as_a_backup_would(data_dir: Path, name: str, manifest: Manifest, data: bytes, indexes) -> None:
    """What a backup killed while receiving leaves: its part file with ``indexes`` written and recorded."""
    store_dir = data_dir / "store"
    with PartialStore(data_dir / "replica.db") as partials:
        part = PartFile.open(partials, store_dir / manifest.sha256, name, manifest,
                             store_dir / f".replica-{manifest.sha256}")
        for index in indexes:
            offset, length = manifest.chunk_span(index)
            part.write_verified(index, data[offset:offset + length])
        part.close()


class Version1(SQLiteStore):
    """The schema replica.db and failback.db had up to fb1c0ba (a client's store)."""

    MIGRATIONS = ClientStore.MIGRATIONS[:1]


def record_as_version_1(path: Path, dest_path: Path, manifest: Manifest, verified) -> None:
    """A record as the code up to fb1c0ba wrote it (``begin_download``, then chunks marked)."""
    with Version1(path) as old:
        connection = old._connection()
        row = connection.execute(
            "INSERT INTO downloads (dest_path, name, size, chunk_size, sha256, started_at, chunk_digests)"
            " VALUES (?, ?, ?, ?, ?, 1.0, ?)",
            (str(dest_path), dest_path.name, manifest.size, manifest.chunk_size, manifest.sha256,
             manifest.chunk_digests)).lastrowid
        connection.executemany("INSERT INTO verified_chunks VALUES (?, ?)", [(row, i) for i in verified])


def write_sized(path: Path, data: bytes, size: int) -> None:
    """A file of ``size`` bytes starting with ``data``, as the old code's ftruncate'd part files were."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(data)
        out.truncate(size)


class TestReplicaReceiving:
    def test_a_file_sent_whole_joins_the_catalog(self, backup_factory, tmp_path):
        """Every chunk verified and the whole file proven: the blob is exact, the name catalogued, no part file left."""
        source = make_file(tmp_path / "src" / "a.bin", 5 * CHUNK + 3)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        backup = backup_factory()
        session = peer_session(backup)
        try:
            assert (False, set()) == offer(session, "a.bin", manifest)
            completions = [send_chunk(session, manifest, data, i) for i in range(manifest.chunk_count)]
        finally:
            session.close()
        assert [False] * 5 + [True] == completions
        assert sha256_file(source) == backup.catalog.db.get_file("a.bin").sha256
        assert sha256_file(source) == sha256_file(backup.catalog.blob_path(manifest.sha256))
        assert [] == part_files(backup.catalog.data_dir)

    def test_a_chunk_failing_verification_is_refused_and_not_recorded(self, backup_factory, tmp_path):
        """A replicated chunk whose bytes do not match the manifest gets INTEGRITY and is not held."""
        source = make_file(tmp_path / "src" / "a.bin", 3 * CHUNK)
        manifest = manifest_of_file(source, CHUNK)
        backup = backup_factory()
        session = peer_session(backup)
        try:
            offer(session, "a.bin", manifest)
            with pytest.raises(RemoteError) as refused:
                send_chunk(session, manifest, bytes(3 * CHUNK), 1)
            held = offer(session, "a.bin", manifest)
        finally:
            session.close()
        assert (ErrorCode.INTEGRITY, (False, set())) == (refused.value.code, held)

    def test_files_being_received_are_reported(self, backup_factory, tmp_path):
        """The backup tells what it is receiving (its window's view) without reaching into the receiver."""
        source = make_file(tmp_path / "src" / "a.bin", 4 * CHUNK)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        backup = backup_factory()
        session = peer_session(backup)
        try:
            offer(session, "a.bin", manifest)
            send_chunk(session, manifest, data, 0)
            send_chunk(session, manifest, data, 2)
            receiving = backup.replication_in_progress()
        finally:
            session.close()
        assert [{"name": "a.bin", "size": 4 * CHUNK, "chunks": 4, "chunks_done": 2}] == receiving


class TestReplicaResume:
    def test_recorded_chunks_are_verified_again_after_a_restart(self, backup_factory, tmp_path):
        """A restarted backup hashes its recorded chunks again: one damaged on disk is asked for again, not trusted."""
        source = make_file(tmp_path / "src" / "a.bin", 6 * CHUNK)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        backup = backup_factory()
        session = peer_session(backup)
        try:
            offer(session, "a.bin", manifest)
            for index in range(4):
                send_chunk(session, manifest, data, index)
        finally:
            session.close()
        backup.stop()
        [part] = (backup.catalog.data_dir / "store").glob(".replica-*")
        with open(part, "r+b") as damaged:
            damaged.seek(CHUNK + 100)
            damaged.write(b"\x00\xff")
        restarted = backup_factory()
        session = peer_session(restarted)
        try:
            held = offer(session, "a.bin", manifest)
            completions = [send_chunk(session, manifest, data, i) for i in sorted(set(range(6)) - held[1])]
        finally:
            session.close()
        assert ((False, {0, 2, 3}), [False, False, True]) == (held, completions)
        assert sha256_file(source) == sha256_file(restarted.catalog.blob_path(manifest.sha256))


class TestReplicaInstall:
    def test_every_chunk_recorded_but_not_installed_is_installed_on_the_next_offer(self, backup_factory, tmp_path):
        """A backup killed between its last recorded chunk and the install installs on the next offer: complete."""
        source = make_file(tmp_path / "src" / "a.bin", 3 * CHUNK + 1)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        first = backup_factory()
        data_dir = first.catalog.data_dir
        first.stop()
        receive_as_a_backup_would(data_dir, "a.bin", manifest, data, range(manifest.chunk_count))
        restarted = backup_factory()
        session = peer_session(restarted)
        try:
            held = offer(session, "a.bin", manifest)
        finally:
            session.close()
        assert ((True, set()), manifest.sha256, []) == (held, restarted.catalog.db.get_file("a.bin").sha256,
                                                         part_files(data_dir))
        assert manifest.sha256 == sha256_file(restarted.catalog.blob_path(manifest.sha256))

    def test_an_install_that_failed_on_a_local_error_is_done_by_the_next_offer(self, backup_factory, tmp_path,
                                                                                monkeypatch):
        """An I/O error installing the file is reported; the part is kept and the next offer installs it."""
        source = make_file(tmp_path / "src" / "a.bin", 3 * CHUNK)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        backup = backup_factory()
        real_link, failures = os.link, [OSError(errno.EIO, "Input/output error")]

        def failing_once(*args, **kwargs):
            if failures:
                raise failures.pop()
            return real_link(*args, **kwargs)

        monkeypatch.setattr(os, "link", failing_once)
        session = peer_session(backup)
        try:
            offer(session, "a.bin", manifest)
            send_all(session, manifest, data, range(2))
            with pytest.raises(RemoteError) as failed:
                send_chunk(session, manifest, data, 2)
            held = offer(session, "a.bin", manifest)
        finally:
            session.close()
        assert (ErrorCode.STORAGE_ERROR, (True, set())) == (failed.value.code, held)
        catalogued = backup.catalog.db.get_file("a.bin").sha256
        assert (manifest.sha256, []) == (catalogued, part_files(backup.catalog.data_dir))

    def test_a_damaged_blob_in_the_way_is_replaced_on_the_next_offer(self, backup_factory, tmp_path):
        """A wrong-size file at the blob path fails the install once; it is removed and the next offer installs."""
        source = make_file(tmp_path / "src" / "a.bin", 3 * CHUNK)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        backup = backup_factory()
        session = peer_session(backup)
        try:
            offer(session, "a.bin", manifest)
            send_all(session, manifest, data, range(2))
            backup.catalog.blob_path(manifest.sha256).write_bytes(b"half a blob")
            with pytest.raises(RemoteError) as failed:
                send_chunk(session, manifest, data, 2)
            held = offer(session, "a.bin", manifest)
        finally:
            session.close()
        assert (ErrorCode.STORAGE_ERROR, (True, set())) == (failed.value.code, held)
        assert manifest.sha256 == sha256_file(backup.catalog.blob_path(manifest.sha256))


class TestReplicaNames:
    def test_a_resumed_replica_is_catalogued_under_the_name_offered_now(self, backup_factory, tmp_path):
        """Renamed on the main while cut off: the resumed replica shows and joins the catalog under the new name."""
        source = make_file(tmp_path / "src" / "a.bin", 3 * CHUNK)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        backup = backup_factory()
        offered(backup, "old.bin", manifest, data, [0])
        backup.stop()
        restarted = backup_factory()
        session = peer_session(restarted)
        try:
            offer(session, "new.bin", manifest)
            receiving = restarted.replication_in_progress()
            send_all(session, manifest, data, [1, 2])
        finally:
            session.close()
        assert (["new.bin"], None, manifest.sha256) == ([r["name"] for r in receiving],
                                                        restarted.catalog.db.get_file("old.bin"),
                                                        restarted.catalog.db.get_file("new.bin").sha256)


class TestReplicaVersions:
    def test_a_version_replaced_while_received_is_dropped(self, backup_factory, tmp_path):
        """Offered again with other content, a name's partial replica goes: part file, record, receiving entry."""
        old = make_file(tmp_path / "old" / "a.bin", 3 * CHUNK, seed=1)
        new = make_file(tmp_path / "new" / "a.bin", 2 * CHUNK, seed=2)
        old_manifest, new_manifest = manifest_of_file(old, CHUNK), manifest_of_file(new, CHUNK)
        backup = backup_factory()
        offered(backup, "a.bin", old_manifest, old.read_bytes(), [0])
        offered(backup, "a.bin", new_manifest, new.read_bytes(), [0])
        assert ([f".replica-{new_manifest.sha256}"], [new_manifest.sha256], [2 * CHUNK]) == (
            part_files(backup.catalog.data_dir), [s.manifest.sha256 for s in backup.receiver.partials.in_progress()],
            [r["size"] for r in backup.replication_in_progress()])

    def test_a_version_replaced_across_a_restart_is_dropped(self, backup_factory, tmp_path):
        """A name's old content, partly received before a restart, goes when the new content is offered."""
        old = make_file(tmp_path / "old" / "a.bin", 3 * CHUNK, seed=1)
        new = make_file(tmp_path / "new" / "a.bin", 2 * CHUNK, seed=2)
        old_manifest, new_manifest = manifest_of_file(old, CHUNK), manifest_of_file(new, CHUNK)
        backup = backup_factory()
        offered(backup, "a.bin", old_manifest, old.read_bytes(), [0])
        backup.stop()
        restarted = backup_factory()
        offered(restarted, "a.bin", new_manifest, new.read_bytes(), [])
        assert [f".replica-{new_manifest.sha256}"] == part_files(restarted.catalog.data_dir)

    def test_a_removed_name_drops_its_partial_replica(self, backup_factory, tmp_path):
        """The main's removal of a name drops the replica being received for it."""
        source = make_file(tmp_path / "src" / "a.bin", 3 * CHUNK)
        manifest = manifest_of_file(source, CHUNK)
        backup = backup_factory()
        offered(backup, "a.bin", manifest, source.read_bytes(), [0])
        session = peer_session(backup)
        try:
            session.call(protocol.RemoveFile("a.bin"), protocol.Ok)
        finally:
            session.close()
        assert ([], [], []) == (part_files(backup.catalog.data_dir), backup.receiver.partials.in_progress(),
                                backup.replication_in_progress())


    def test_a_partial_replica_of_a_name_the_main_no_longer_has_is_dropped(self, backup_factory, server_factory,
                                                                          tmp_path):
        """A backup left part-way through a file the main has since removed drops it once the main connects."""
        source = make_file(tmp_path / "src" / "gone.bin", 3 * CHUNK)
        manifest = manifest_of_file(source, CHUNK)
        backup = backup_factory()
        offered(backup, "gone.bin", manifest, source.read_bytes(), [0])
        server_factory({"server": {"secret": SECRET, "backup": {"port": backup.server.address[1],
                                                               "heartbeat_interval": 0.2}}})
        wait_until(lambda: not part_files(backup.catalog.data_dir), SHORT_TIMEOUT, "the partial replica dropped")
        assert ([], []) == (backup.receiver.partials.in_progress(), backup.replication_in_progress())


class TestOldVersionProgress:
    def test_an_old_versions_replica_progress_is_tidied(self, backup_factory, tmp_path):
        """An fb1c0ba-era .replica-<sha> (received into itself) and its record go; one of another size stays."""
        source = make_file(tmp_path / "src" / "a.bin", 3 * CHUNK)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        other = manifest_of_file(make_file(tmp_path / "src" / "b.bin", 2 * CHUNK, seed=3), CHUNK)
        first = backup_factory()
        data_dir = first.catalog.data_dir
        first.stop()
        for leftover in data_dir.glob("replica.db*"):
            leftover.unlink()
        store_dir = data_dir / "store"
        record_as_version_1(data_dir / "replica.db", store_dir / f".replica-{manifest.sha256}", manifest, [0])
        write_sized(store_dir / f".replica-{manifest.sha256}", data[:CHUNK], manifest.size)
        record_as_version_1(data_dir / "replica.db", store_dir / f".replica-{other.sha256}", other, [])
        (store_dir / f".replica-{other.sha256}").write_bytes(b"not the size that version gave it")
        restarted = backup_factory()
        session = peer_session(restarted)
        try:
            held = offer(session, "a.bin", manifest)
            send_all(session, manifest, data)
        finally:
            session.close()
        assert ((False, set()), [f".replica-{other.sha256}"], []) == (
            held, part_files(data_dir), restarted.receiver.partials.in_progress())
        assert manifest.sha256 == restarted.catalog.db.get_file("a.bin").sha256

    def test_an_old_versions_failback_progress_is_tidied(self, server_factory, tmp_path):
        """fb1c0ba-era failback progress in data_dir/failback: part file and record go; the folder too, at start."""
        source = make_file(tmp_path / "src" / "f.bin", 3 * CHUNK)
        manifest = manifest_of_file(source, CHUNK)
        data_dir = tmp_path / "main-data"
        staging = data_dir / "failback"
        record_as_version_1(data_dir / "failback.db", staging / "f.bin", manifest, [0])
        write_sized(staging / "f.bin.part", source.read_bytes()[:CHUNK], manifest.size)
        catalog = Catalog(data_dir, CHUNK)
        try:
            with open_receiving_store(data_dir / "failback.db", catalog) as partials:
                records = partials.in_progress()
        finally:
            catalog.close()
        part_left = (staging / "f.bin.part").exists()
        server_factory({"server": {"main": {"data_dir": str(data_dir)}}})
        assert ([], False, False) == (records, part_left, staging.exists())


class TestReplicatorView:
    def test_the_main_knows_what_the_backup_holds(self, backup_factory, server_factory, tmp_path):
        """The main's view of the backup's inventory comes from the replicator's public method, once replicated."""
        source = make_file(tmp_path / "src" / "a.bin", 2 * CHUNK + 1)
        backup = backup_factory()
        main = server_factory({"server": {"secret": SECRET, "backup": {"port": backup.server.address[1],
                                                                       "heartbeat_interval": 0.2}}})
        main.add_file(source)
        wait_until(lambda: main.backup_holds() == {"a.bin": sha256_file(source)}, SHORT_TIMEOUT, "a.bin replicated")
        assert {"a.bin": sha256_file(source)} == main.replicator.backup_holds()

    def test_a_main_without_replication_knows_nothing(self, server_factory):
        """With replication off there is no inventory to tell: None, not an empty one."""
        assert None is server_factory().backup_holds()


@pytest.fixture
def fetcher(tmp_path) -> Iterator[tuple[Catalog, PartialStore]]:
    """A main's catalog and failback records to fetch into (the failback tests share it)."""
    catalog = Catalog(tmp_path / "fetcher", CHUNK)
    partials = PartialStore(tmp_path / "fetcher" / "failback.db")
    yield catalog, partials
    partials.close()
    catalog.close()


class TestFailbackFetch:
    def test_a_fetched_file_is_verified_into_the_store(self, server_factory, fetcher, tmp_path):
        """fetch_file lands the content as an exact blob, leaves no part file or record, and add_stored names it."""
        catalog, partials = fetcher
        source = make_file(tmp_path / "src" / "f.bin", 7 * CHUNK + 9)
        server = server_factory({"transfer": {"chunk_size": CHUNK}})
        server.add_file(source)
        session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            manifest = fetch_file(session, "f.bin", catalog, partials, threading.Event())
        finally:
            session.close()
        added = catalog.add_stored("f.bin", manifest)
        assert ("added", sha256_file(source)) == (added.outcome, sha256_file(catalog.blob_path(manifest.sha256)))
        assert ([], []) == (part_files(catalog.data_dir), partials.in_progress())

    def test_a_damaged_chunk_stops_the_fetch_and_the_verified_ones_are_kept(self, server_factory, fetcher,
                                                                             tmp_path):
        """A chunk failing SHA-256 ends the fetch with IntegrityError, no blob; a later fetch resumes after it."""
        catalog, partials = fetcher
        source = make_file(tmp_path / "src" / "f.bin", 8 * CHUNK)
        server = server_factory({"transfer": {"chunk_size": CHUNK}})
        sha256 = server.add_file(source).record.sha256
        blob = server.catalog.blob_path(sha256)
        original = blob.read_bytes()
        damaged = bytearray(original)
        damaged[3 * CHUNK + 7] ^= 0xFF
        blob.write_bytes(damaged)
        address = server.server.address
        session = ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            with pytest.raises(IntegrityError, match="chunk 3"):
                fetch_file(session, "f.bin", catalog, partials, threading.Event())
        finally:
            session.close()
        [kept] = partials.in_progress()
        blob.write_bytes(original)
        session = ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            fetch_file(session, "f.bin", catalog, partials, threading.Event())
        finally:
            session.close()
        assert ({0, 1, 2}, False) == (kept.verified, catalog.has_blob(sha256, 0))
        assert sha256_file(source) == sha256_file(catalog.blob_path(sha256))


class TestFailbackNames:
    def test_a_resumed_fetch_asks_for_the_name_the_backup_uses_now(self, server_factory, fetcher, tmp_path):
        """A fetch begun as old.bin and resumed as new.bin asks the backup for new.bin (old.bin is gone there)."""
        catalog, partials = fetcher
        source = make_file(tmp_path / "src" / "new.bin", 4 * CHUNK)
        manifest, data = manifest_of_file(source, CHUNK), source.read_bytes()
        server = server_factory({"transfer": {"chunk_size": CHUNK}})
        server.add_file(source)
        part = PartFile.open(partials, catalog.blob_path(manifest.sha256), "old.bin", manifest,
                             catalog.store_dir / f".failback-{manifest.sha256}")
        part.write_verified(0, data[:CHUNK])
        part.close()
        session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
        try:
            fetch_file(session, "new.bin", catalog, partials, threading.Event())
        finally:
            session.close()
        assert (manifest.sha256, []) == (sha256_file(catalog.blob_path(manifest.sha256)), partials.in_progress())

    def test_malformed_inventory_entries_are_skipped(self, backup_factory, fetcher, tmp_path, monkeypatch):
        """Entries without a name or SHA-256, with an unsafe name or a bad epoch, are skipped; the good one is fetched."""
        catalog, partials = fetcher
        source = make_file(tmp_path / "src" / "good.bin", 2 * CHUNK)
        manifest = manifest_of_file(source, CHUNK)
        malformed = [{"name": "a.bin"}, 7, {"name": "../x", "sha256": manifest.sha256}, {"sha256": 5},
                     *({"name": f"{n}.bin", "sha256": manifest.sha256, "epoch": epoch}
                       for n, epoch in enumerate(("3", True, -1, 2**63, 1.5))),
                     {"name": "good.bin", "sha256": manifest.sha256, "epoch": 2}]

        def inventory(receiver, peer, frame) -> None:
            peer.send(protocol.Inventory(), encode_document({"files": malformed, "counters": {}, "removed": 5}))

        monkeypatch.setattr(ReplicaReceiver, "inventory", inventory)
        backup = backup_factory()
        offered(backup, "good.bin", manifest, source.read_bytes(), range(manifest.chunk_count))
        link = PeerLink(backup.server.address, SECRET, SHORT_TIMEOUT, NodeState(catalog.db, "main", Role.STANDBY), TLS)
        try:
            handed_over = catch_up_and_take_over(catalog, link, partials, threading.Event())
        finally:
            link.drop()
        assert (True, ["good.bin"]) == (handed_over, [r.name for r in catalog.db.list_files(None)])

    @pytest.mark.parametrize("before, after", [("file", "folder"), ("folder", "file")])
    def test_a_name_turned_from_file_to_folder_on_the_backup_takes_the_new_shape(
            self, backup_factory, fetcher, tmp_path, before, after):
        """The active backup removed ``a`` (a file, or the folder ``a/``) and shared the other shape under that name:
        the main removes its old one before fetching the new one, and ends with exactly the backup's names."""
        catalog, partials = fetcher
        file_a = make_file(tmp_path / "src-file" / "a", 2 * CHUNK, seed=61)
        folder_a = tmp_path / "src-folder" / "a"
        make_file(folder_a / "b", 3 * CHUNK, seed=62)
        share = {"file": lambda c: c.add_file(file_a), "folder": lambda c: c.add_folder(folder_a)}
        unshare = {"file": lambda c: c.remove_file("a"), "folder": lambda c: c.remove_path("a/")}
        share[before](catalog)  # the main's, at epoch 0
        backup = backup_factory()
        backup.node.promote("the main went silent")  # epoch 1: what the backup changes now outranks the main's
        backup.node.step_down("the main is back")
        share[before](backup.catalog)
        unshare[before](backup.catalog)
        share[after](backup.catalog)
        link = PeerLink(backup.server.address, SECRET, SHORT_TIMEOUT, NodeState(catalog.db, "main", Role.STANDBY), TLS)
        try:
            handed_over = catch_up_and_take_over(catalog, link, partials, threading.Event())
        finally:
            link.drop()
        expected = sorted(r.name for r in backup.catalog.db.list_files(None))
        assert (True, expected) == (handed_over, sorted(r.name for r in catalog.db.list_files(None)))


class TestServerFloor:
    def test_the_servers_load_no_client_code(self):
        """Importing the main's and the backup's engines loads nothing from the client floor (failback included)."""
        probe = ("import sys, minitorrent.server.main, minitorrent.server.backup; "
                 "print(sorted(m for m in sys.modules if m.startswith('minitorrent.client')))")
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                                timeout=SHORT_TIMEOUT * 3)
        assert ("[]", "") == (result.stdout.strip(), result.stderr)


# Replication helpers -------------------------------------------------------------------------------------------


class TestChunkBitmap:
    @given(data=st.data(), count=st.integers(min_value=0, max_value=3000))
    @settings(max_examples=100, deadline=None)
    def test_round_trip(self, data, count):
        """Any set of chunk indexes survives bitmap and back; the bitmap has one bit per chunk."""
        indexes = data.draw(st.sets(st.integers(min_value=0, max_value=count - 1))) if count else set()
        bitmap = chunks_to_bitmap(indexes, count)
        assert (count + 7) // 8 == len(bitmap)
        assert indexes == bitmap_to_chunks(bitmap, count)

    def test_bit_order(self):
        """Chunk i is bit i % 8 of byte i // 8 (least significant first)."""
        assert b"\x01\x80\x02" == chunks_to_bitmap({0, 15, 17}, 18)

    def test_bits_past_the_count_are_ignored(self):
        """Padding bits in the last byte mean nothing."""
        assert {0, 1, 2} == bitmap_to_chunks(b"\xff", 3)

    def test_short_bitmap_means_the_rest_are_missing(self):
        """A bitmap shorter than the chunk count (from a peer) marks only what it covers."""
        assert {8} == bitmap_to_chunks(b"\x00\x01", 100)
        assert set() == bitmap_to_chunks(b"", 10)

    def test_empty_file(self):
        """A file of no chunks has an empty bitmap."""
        assert (b"", set()) == (chunks_to_bitmap(set(), 0), bitmap_to_chunks(b"", 0))


class TestDocuments:
    def test_round_trip_keeps_any_name(self):
        """Inventories carry names with any Unicode intact."""
        document = {"files": [{"name": "Café | ☃ : x.txt", "sha256": "ab"}], "counters": {"a": {"o": 1}}}
        assert document == decode_document(memoryview(encode_document(document)))

    @pytest.mark.parametrize("payload", [b"[1, 2]", b"not json", b"\xff\xfe"])
    def test_anything_but_a_json_object_is_a_protocol_error(self, payload):
        """A peer's malformed document is refused with BAD_REQUEST, not a crash."""
        with pytest.raises(RemoteProtocolError) as refused:
            decode_document(payload)
        assert ErrorCode.BAD_REQUEST == refused.value.code


# Download counters: a G-counter per origin ----------------------------------------------------------------------


def add_files(store: ServerStore, *names: str) -> None:
    for i, name in enumerate(names):
        store.add_file(name, build_manifest(io.BytesIO(name.encode() * (i + 1)), 4))


class TestDownloadCounters:
    def test_each_origin_counts_its_own_row(self, store):
        """record_download increments the origin's counter; the file's total is the sum over origins."""
        add_files(store, "a.txt")
        store.record_download("a.txt", "main")
        store.record_download("a.txt", "main")
        assert 3 == store.record_download("a.txt", "backup")
        assert {"a.txt": {"backup": 1, "main": 2}} == store.download_counters()
        assert 3 == store.get_file("a.txt").downloads

    def test_merge_keeps_the_larger_count_per_origin(self, store):
        """Merging never lowers a counter and takes any higher one; it returns how many changed."""
        add_files(store, "a.txt")
        for _ in range(3):
            store.record_download("a.txt", "main")
        changed = store.merge_download_counters({"a.txt": {"main": 1, "backup": 4}})
        assert (1, {"a.txt": {"backup": 4, "main": 3}}) == (changed, store.download_counters())
        assert 7 == store.get_file("a.txt").downloads

    def test_merge_is_idempotent(self, store):
        """Merging the same counters again changes nothing (a resent update is harmless)."""
        add_files(store, "a.txt")
        counters = {"a.txt": {"backup": 2}}
        store.merge_download_counters(counters)
        assert 0 == store.merge_download_counters(counters)
        assert 2 == store.get_file("a.txt").downloads

    def test_counters_for_unknown_names_are_ignored(self, store):
        """A counter for a name not in the catalog is dropped, and nothing is created for it."""
        add_files(store, "a.txt")
        assert 0 == store.merge_download_counters({"ghost.bin": {"backup": 9}})
        assert ({}, None) == (store.download_counters(), store.get_file("ghost.bin"))

    def test_split_brain_counts_merge_to_the_sum(self, tmp_path):
        """Two replicas that both counted while cut off end with the same, complete totals."""
        with ServerStore(tmp_path / "main.db") as main, ServerStore(tmp_path / "backup.db") as backup:
            for replica in (main, backup):
                add_files(replica, "a.txt", "b.txt")
            main.record_download("a.txt", "main")
            for _ in range(2):
                backup.record_download("a.txt", "backup")
            backup.record_download("b.txt", "backup")
            main.merge_download_counters(backup.download_counters())
            backup.merge_download_counters(main.download_counters())
            assert main.download_counters() == backup.download_counters()
            totals = {r.name: r.downloads for r in main.list_files()}
            assert {"a.txt": 3, "b.txt": 1} == totals == {r.name: r.downloads for r in backup.list_files()}

    @given(updates=st.lists(st.dictionaries(st.sampled_from(["o1", "o2", "o3"]), st.integers(0, 50)),
                            min_size=1, max_size=6))
    @settings(max_examples=30, deadline=None)
    def test_merge_order_does_not_matter(self, tmp_path_factory, updates):
        """Merging any updates in any order gives, per origin, the maximum: a G-counter."""
        folder = tmp_path_factory.mktemp("g")
        with ServerStore(folder / "fwd.db") as forward, ServerStore(folder / "rev.db") as backward:
            for replica in (forward, backward):
                add_files(replica, "a.txt")
            for update in updates:
                forward.merge_download_counters({"a.txt": update})
            for update in reversed(updates):
                backward.merge_download_counters({"a.txt": update})
            expected: dict[str, int] = {}
            for update in updates:
                for origin, count in update.items():
                    expected[origin] = max(expected.get(origin, 0), count)
            merged = forward.download_counters().get("a.txt", {})
            assert expected == merged == backward.download_counters().get("a.txt", {})
            assert sum(expected.values()) == forward.get_file("a.txt").downloads
