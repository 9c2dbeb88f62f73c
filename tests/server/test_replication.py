"""Replication between the main and the backup, in-process: the receiver, the replicator's view, the failback fetch.

Real sockets on 127.0.0.1 (port 0) and real SQLite files under ``tmp_path``;
the end-to-end runs with real processes and SIGKILL are in test_failover.py.
"""
from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import ROOT, SHORT_TIMEOUT, make_config, make_file, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from database import PartialStore, ServerStore
from error_handler import IntegrityError, RemoteError
from integrity import Manifest, build_manifest, manifest_of_file, sha256_file
from minitorrent.net.remote import ServerSession
from minitorrent.server.backup import BackupServer
from minitorrent.server.catalog import Catalog
from minitorrent.server.failback import fetch_file
from minitorrent.server.replication import decode_document, encode_document
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
    return ServerSession.open(host, port, io_timeout_s=SHORT_TIMEOUT, secret=SECRET)


def offer(session: ServerSession, name: str, manifest: Manifest) -> tuple[bool, set[int]]:
    """Offer a file as the main does; (complete, chunks the backup already holds)."""
    request = protocol.ReplicateFile(name, manifest.size, manifest.chunk_size, manifest.sha256,
                                     manifest.chunk_count, 1.0)
    frame = session.call(request, protocol.ReplicaState, manifest.chunk_digests)
    return frame.message.complete, protocol.bitmap_to_chunks(frame.payload, manifest.chunk_count)


def send_chunk(session: ServerSession, manifest: Manifest, data: bytes, index: int) -> bool:
    """Send one chunk as the main does; True if the backup says the file is now complete."""
    offset, length = manifest.chunk_span(index)
    return session.call(protocol.ReplicateChunk(manifest.sha256, index), protocol.ChunkStored,
                        data[offset:offset + length]).message.complete


def part_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "store").glob(".*"))


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


class TestFailbackFetch:
    @pytest.fixture
    def fetcher(self, tmp_path) -> Iterator[tuple[Catalog, PartialStore]]:
        catalog = Catalog(tmp_path / "fetcher", CHUNK)
        partials = PartialStore(tmp_path / "fetcher" / "failback.db")
        yield catalog, partials
        partials.close()
        catalog.close()

    def test_a_fetched_file_is_verified_into_the_store(self, server_factory, fetcher, tmp_path):
        """fetch_file lands the content as an exact blob, leaves no part file or record, and add_stored names it."""
        catalog, partials = fetcher
        source = make_file(tmp_path / "src" / "f.bin", 7 * CHUNK + 9)
        server = server_factory({"transfer": {"chunk_size": CHUNK}})
        server.add_file(source)
        session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT)
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
        session = ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT)
        try:
            with pytest.raises(IntegrityError, match="chunk 3"):
                fetch_file(session, "f.bin", catalog, partials, threading.Event())
        finally:
            session.close()
        [kept] = partials.in_progress()
        blob.write_bytes(original)
        session = ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT)
        try:
            fetch_file(session, "f.bin", catalog, partials, threading.Event())
        finally:
            session.close()
        assert ({0, 1, 2}, False) == (kept.verified, catalog.has_blob(sha256, 0))
        assert sha256_file(source) == sha256_file(catalog.blob_path(sha256))


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
