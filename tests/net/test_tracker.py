"""The tracker (who holds what, forgotten when silent) and what a seeder will serve."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import SHORT_TIMEOUT, make_file, wait_until

from error_handler import RemoteError
from integrity import manifest_of_file
from minitorrent.client.seeding import SeedSource
from minitorrent.net.remote import ServerSession
from minitorrent.net.serving import RequestServer
from minitorrent.net.tracker import MAX_PEERS_PER_REPLY, Tracker
from minitorrent.wire import protocol
from minitorrent.wire.protocol import ErrorCode

SHA_A = "a" * 64
SHA_B = "b" * 64


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def tracker_with_clock(ttl_s: float = 3.0, seed: int = 0) -> tuple[Tracker, FakeClock]:
    clock = FakeClock()
    return Tracker(ttl_s, clock=clock, rng=random.Random(seed)), clock


class TestExpiry:
    def test_forgets_a_peer_after_ttl(self):
        """A peer that stops announcing is listed until ttl has passed, then forgotten."""
        tracker, clock = tracker_with_clock(ttl_s=3.0)
        tracker.announce("10.0.0.1", 7000, {SHA_A: None})
        clock.now += 2.9
        assert [("10.0.0.1", 7000, None)] == tracker.peers_for(SHA_A, None)
        clock.now += 0.2
        assert [] == tracker.peers_for(SHA_A, None)
        assert 0 == tracker.peer_count()

    def test_announcing_again_keeps_a_peer(self):
        """Each announcement restarts the peer's ttl."""
        tracker, clock = tracker_with_clock(ttl_s=3.0)
        for _ in range(5):
            tracker.announce("10.0.0.1", 7000, {SHA_A: None})
            clock.now += 2.0
        assert 1 == tracker.peer_count()

    def test_only_the_silent_peer_is_forgotten(self):
        """Expiry removes the silent peer and keeps the one still announcing."""
        tracker, clock = tracker_with_clock(ttl_s=3.0)
        tracker.announce("10.0.0.1", 7000, {SHA_A: None})
        tracker.announce("10.0.0.2", 7000, {SHA_A: None})
        clock.now += 2.0
        tracker.announce("10.0.0.2", 7000, {SHA_A: None})
        clock.now += 2.0
        assert [("10.0.0.2", 7000, None)] == tracker.peers_for(SHA_A, None)

    def test_forget_removes_at_once(self):
        """A goodbye (forget) removes the peer without waiting for the ttl."""
        tracker, _ = tracker_with_clock()
        tracker.announce("10.0.0.1", 7000, {SHA_A: None})
        tracker.forget("10.0.0.1", 7000)
        assert 0 == tracker.peer_count()


class TestPeerLists:
    def test_never_lists_the_asker(self):
        """The asker (same host and seed port) is left out; the same host on another port is not."""
        tracker, _ = tracker_with_clock()
        tracker.announce("10.0.0.1", 7000, {SHA_A: None})
        tracker.announce("10.0.0.1", 7001, {SHA_A: None})
        tracker.announce("10.0.0.2", 7000, {SHA_A: None})
        listed = {(host, port) for host, port, _ in tracker.peers_for(SHA_A, ("10.0.0.1", 7000))}
        assert {("10.0.0.1", 7001), ("10.0.0.2", 7000)} == listed

    def test_only_peers_holding_the_file(self):
        """Peers are listed for the files they announced, with their bitmaps (None: whole file)."""
        tracker, _ = tracker_with_clock()
        tracker.announce("10.0.0.1", 7000, {SHA_A: None})
        tracker.announce("10.0.0.2", 7000, {SHA_A: b"\x05", SHA_B: None})
        tracker.announce("10.0.0.3", 7000, {SHA_B: None})
        assert {("10.0.0.1", 7000, None), ("10.0.0.2", 7000, b"\x05")} == set(tracker.peers_for(SHA_A, None))

    def test_announcement_replaces_the_previous_one(self):
        """A new announcement replaces what the peer held before (a file it dropped is gone)."""
        tracker, _ = tracker_with_clock()
        tracker.announce("10.0.0.1", 7000, {SHA_A: b"\x01"})
        tracker.announce("10.0.0.1", 7000, {SHA_B: None})
        assert ([], [("10.0.0.1", 7000, None)]) == (tracker.peers_for(SHA_A, None), tracker.peers_for(SHA_B, None))

    def test_bounded_to_thirty(self):
        """With 100 peers a reply lists MAX_PEERS_PER_REPLY (30), all distinct."""
        tracker, _ = tracker_with_clock()
        for n in range(100):
            tracker.announce(f"10.0.1.{n}", 7000, {SHA_A: None})
        listed = tracker.peers_for(SHA_A, None)
        assert 30 == MAX_PEERS_PER_REPLY == len(listed) == len(set(listed))

    def test_shuffled_so_every_peer_gets_its_turn(self):
        """Replies come in varying orders, and over a few dozen replies every one of 100 peers is named."""
        tracker, _ = tracker_with_clock()
        for n in range(100):
            tracker.announce(f"10.0.1.{n}", 7000, {SHA_A: None})
        replies = [tuple(tracker.peers_for(SHA_A, None)) for _ in range(40)]
        assert len(set(replies)) > 1
        assert 100 == len({peer for reply in replies for peer in reply})

    def test_small_list_is_shuffled(self):
        """Even five peers do not always come in announcement order."""
        tracker, _ = tracker_with_clock()
        for n in range(5):
            tracker.announce(f"10.0.1.{n}", 7000, {SHA_A: None})
        orders = {tuple(host for host, _, _ in tracker.peers_for(SHA_A, None)) for _ in range(30)}
        assert len(orders) > 1


# Over the wire --------------------------------------------------------------------------------


def open_session(address: tuple[str, int]) -> ServerSession:
    return ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT)


def announce(session: ServerSession, port: int, files: dict[str, bytes | None]) -> None:
    session.call(protocol.Announce(port), protocol.Ok, protocol.encode_holdings(files))


def peers(session: ServerSession, sha256: str, port: int = 0) -> list[dict]:
    return session.call(protocol.GetPeers(sha256, port), protocol.PeerList).message.peers


class TestTrackerOnTheServer:
    def test_announce_then_get_peers(self, server_factory):
        """Two clients announce; each asking with its own seed port sees only the other, host from the socket."""
        server = server_factory()
        first, second = open_session(server.server.address), open_session(server.server.address)
        try:
            announce(first, 7001, {SHA_A: None})
            announce(second, 7002, {SHA_A: protocol.chunks_to_bitmap({0, 3}, 8)})
            chunks_0_and_3 = protocol.encode_bitmap(b"\x09")
            assert [{"host": "127.0.0.1", "port": 7002, "have": chunks_0_and_3}] == peers(first, SHA_A, 7001)
            assert [{"host": "127.0.0.1", "port": 7001, "have": None}] == peers(second, SHA_A, 7002)
            assert 2 == len(peers(first, SHA_A))  # a non-seeding asker (port 0) sees both
        finally:
            first.close()
            second.close()

    def test_forgets_a_peer_that_stops_announcing(self, server_factory):
        """The server forgets a silent peer after 3 announce intervals (0.2 s each here)."""
        server = server_factory({"transfer": {"announce_interval": 0.2}})
        session = open_session(server.server.address)
        try:
            announce(session, 7001, {SHA_A: None})
            assert 1 == len(peers(session, SHA_A))
            wait_until(lambda: not peers(session, SHA_A), what="the silent peer to be forgotten")
        finally:
            session.close()

    def test_malformed_announcement_is_a_bad_request(self, server_factory):
        """An announcement that is not the documented JSON gets BAD_REQUEST and the connection stays usable."""
        server = server_factory()
        session = open_session(server.server.address)
        try:
            with pytest.raises(RemoteError) as caught:
                session.call(protocol.Announce(7001), protocol.Ok, b'{"files": [{"sha256": "short"}]}')
            assert ErrorCode.BAD_REQUEST == caught.value.code
            assert [] == peers(session, SHA_A)
        finally:
            session.close()


# What a seeder serves -------------------------------------------------------------------------


CHUNK = 64 * 1024


@pytest.fixture
def seed_server(tmp_path):
    """A RequestServer over a SeedSource (as a client's seeder runs), and the source."""
    source = SeedSource()
    server = RequestServer(source, host="127.0.0.1", port=0, name="seeder", max_connections=4,
                           idle_timeout_s=SHORT_TIMEOUT, io_timeout_s=SHORT_TIMEOUT)
    server.start()
    yield server, source
    server.stop()


def get_chunk(session: ServerSession, name: str, sha256: str, index: int) -> bytes:
    return bytes(session.call(protocol.GetChunk(name, sha256, index), protocol.ChunkData).payload)


class TestSeederServes:
    def test_serves_a_held_chunk_and_refuses_one_not_held(self, tmp_path, seed_server):
        """Partial holdings: a verified chunk is served (and verifies); any other gets NOT_FOUND."""
        server, source = seed_server
        path = make_file(tmp_path / "f.bin.part", 8 * CHUNK, seed=5)
        manifest = manifest_of_file(path, CHUNK)
        source.update_partial(path, "f.bin", manifest, {1, 2})
        session = open_session(server.address)
        try:
            assert manifest.verify_chunk(2, get_chunk(session, "f.bin", manifest.sha256, 2))
            with pytest.raises(RemoteError) as caught:
                get_chunk(session, "f.bin", manifest.sha256, 5)
            assert ErrorCode.NOT_FOUND == caught.value.code
            assert manifest.verify_chunk(1, get_chunk(session, "f.bin", manifest.sha256, 1))  # connection kept
        finally:
            session.close()

    def test_refuses_a_file_it_does_not_hold(self, tmp_path, seed_server):
        """A content the seeder never held gets NOT_FOUND; out-of-range indexes get OUT_OF_RANGE."""
        server, source = seed_server
        path = make_file(tmp_path / "f.bin", 2 * CHUNK, seed=6)
        manifest = manifest_of_file(path, CHUNK)
        source.add_complete(path, "f.bin", manifest)
        session = open_session(server.address)
        try:
            with pytest.raises(RemoteError) as unknown:
                get_chunk(session, "f.bin", SHA_A, 0)
            with pytest.raises(RemoteError) as beyond:
                get_chunk(session, "f.bin", manifest.sha256, 2)
            assert (ErrorCode.NOT_FOUND, ErrorCode.OUT_OF_RANGE) == (unknown.value.code, beyond.value.code)
        finally:
            session.close()

    def test_serves_by_content_never_by_the_name_asked(self, tmp_path, seed_server):
        """The name in a request never picks a path: the bytes are those of the held content."""
        server, source = seed_server
        path = make_file(tmp_path / "f.bin", 2 * CHUNK, seed=7)
        manifest = manifest_of_file(path, CHUNK)
        source.add_complete(path, "f.bin", manifest)
        session = open_session(server.address)
        try:
            assert manifest.verify_chunk(0, get_chunk(session, "other.bin", manifest.sha256, 0))
        finally:
            session.close()

    def test_whole_file_replaces_partial_and_not_the_reverse(self, tmp_path, seed_server):
        """Once the whole file is held, a late partial update does not shrink what is served."""
        _, source = seed_server
        path = make_file(tmp_path / "f.bin", 4 * CHUNK, seed=8)
        manifest = manifest_of_file(path, CHUNK)
        source.update_partial(path, "f.bin", manifest, {0})
        assert {manifest.sha256: protocol.chunks_to_bitmap({0}, 4)} == source.holdings()
        source.add_complete(path, "f.bin", manifest)
        source.update_partial(path, "f.bin", manifest, {1})
        assert {manifest.sha256: None} == source.holdings()
        assert ["f.bin"] == [entry["name"] for entry in source.list_files()[0]]

    def test_dropped_content_is_refused(self, tmp_path, seed_server):
        """After drop (a download discarded), the seeder no longer serves or announces that content."""
        server, source = seed_server
        path: Path = make_file(tmp_path / "f.bin", 2 * CHUNK, seed=9)
        manifest = manifest_of_file(path, CHUNK)
        source.add_complete(path, "f.bin", manifest)
        source.drop(manifest.sha256)
        session = open_session(server.address)
        try:
            with pytest.raises(RemoteError) as caught:
                get_chunk(session, "f.bin", manifest.sha256, 0)
            assert ErrorCode.NOT_FOUND == caught.value.code
            assert {} == source.holdings()
        finally:
            session.close()


class TestPerHostCap:
    def test_one_host_cannot_fill_the_tracker(self):
        """A host announcing from more than MAX_PEERS_PER_HOST ports keeps only its newest entries."""
        from minitorrent.net import tracker as tracker_module

        now = [0.0]
        tracker = tracker_module.Tracker(ttl_s=1000, clock=lambda: now[0])
        for port in range(1, tracker_module.MAX_PEERS_PER_HOST + 11):
            now[0] += 1
            tracker.announce("10.9.9.9", port, {"a" * 64: None})
        ports = sorted(port for _, port, _ in tracker.peers_for("a" * 64, None, limit=1000))
        assert list(range(11, tracker_module.MAX_PEERS_PER_HOST + 11)) == ports


class TestListing:
    def test_peers_lists_each_with_files_and_age(self):
        """peers() gives every live peer, sorted, with how many files it announced and how long ago."""
        tracker, clock = tracker_with_clock(ttl_s=3.0)
        tracker.announce("10.0.0.2", 7000, {"a" * 64: None, "b" * 64: b"\x01"})
        clock.now += 1.0
        tracker.announce("10.0.0.1", 7000, {"a" * 64: None})
        clock.now += 2.5  # the first is now past its ttl
        assert [("10.0.0.1", 7000, 1, 2.5)] == tracker.peers()


class TestTotalMemoryBound:
    def test_a_few_hosts_cannot_grow_memory_past_the_budget(self):
        """Hosts announcing huge holdings from many ports keep the tracker within max_bytes, measured."""
        import tracemalloc

        from minitorrent.net.tracker import entry_cost

        holdings = {f"{i:064x}": bytes(1000) for i in range(200)}  # ~230 KB of entries per announcement
        budget = 20 * entry_cost(holdings)
        tracker = Tracker(ttl_s=1000, max_bytes=budget)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
                for port in range(1, 41):
                    tracker.announce(host, port, dict(holdings))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert (True, True) == (tracker.held_bytes <= budget, held <= 2 * budget), f"{held} bytes held"

    def test_the_biggest_holder_gives_way_first(self):
        """Over the budget, the host holding the most loses its oldest entry; a small host keeps its one."""
        from minitorrent.net.tracker import entry_cost

        now = [0.0]
        big = {f"{i:064x}": bytes(100) for i in range(10)}
        tracker = Tracker(ttl_s=1000, clock=lambda: now[0], max_bytes=3 * entry_cost(big) + entry_cost({SHA_A: None}))
        tracker.announce("10.0.0.9", 1, {SHA_A: None})
        for port in range(1, 6):
            now[0] += 1
            tracker.announce("10.0.0.1", port, dict(big, **{SHA_A: None}))
        hosts = sorted((host, port) for host, port, _ in tracker.peers_for(SHA_A, None, limit=100))
        assert [("10.0.0.1", 4), ("10.0.0.1", 5), ("10.0.0.9", 1)] == hosts
