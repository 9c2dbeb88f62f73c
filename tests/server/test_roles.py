"""Unit tests for cluster.py (roles, epochs, peer authentication) and the pure helpers of replication.

In-process and fast: a real SQLite ``ServerStore`` under ``tmp_path``, no sockets.
The download-counter tests cover ``ServerStore``'s G-counter, which is what
makes split-brain counts merge to the right total.
"""
from __future__ import annotations

import io
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from database import ServerStore
from integrity import build_manifest
from minitorrent.server.replication import decode_document, encode_document
from minitorrent.server.roles import NodeState, Role, RoleChanged
from minitorrent.wire.auth import (
    PEER_PURPOSE,
    SERVER_PURPOSE,
    new_nonce,
    proof_ok,
    prove,
)
from minitorrent.wire.protocol import (
    ErrorCode,
    RequestFailed,
    bitmap_to_chunks,
    chunks_to_bitmap,
)


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "catalog.db"


@pytest.fixture
def store(store_path):
    with ServerStore(store_path) as opened:
        yield opened


def node_with_events(store: ServerStore, role: Role = Role.STANDBY) -> tuple[NodeState, list[RoleChanged]]:
    node = NodeState(store, "backup", role)
    events: list[RoleChanged] = []
    node.listeners.append(events.append)
    return node, events


# Epochs ------------------------------------------------------------------------------------------------------


class TestEpochPersistence:
    def test_new_store_starts_at_epoch_zero_on_standby(self, store):
        """A server that never took an epoch is at 0 and does not serve."""
        node = NodeState(store, "main", Role.STANDBY)
        assert (Role.STANDBY, 0, 0, False) == (node.role, node.epoch, node.highest_seen_epoch, node.is_active())

    def test_promoted_epoch_survives_reopening(self, store_path):
        """The epoch a promotion took is read back by a server restarted on the same store."""
        with ServerStore(store_path) as first:
            taken = NodeState(first, "backup", Role.STANDBY).promote("test")
        with ServerStore(store_path) as reopened:
            assert taken == NodeState(reopened, "backup", Role.STANDBY).epoch == 1

    def test_epoch_is_durable_before_anyone_hears_of_it(self, store, store_path):
        """When listeners learn of the promotion, another connection already reads the new epoch."""
        node = NodeState(store, "backup", Role.STANDBY)
        seen_on_disk = []

        def read_back(event: RoleChanged) -> None:
            with ServerStore(store_path) as other:
                seen_on_disk.append((event.epoch, other.get_meta("epoch")))

        node.listeners.append(read_back)
        node.promote("test")
        assert [(1, "1")] == seen_on_disk

    def test_promotion_that_cannot_persist_does_not_happen(self, store, monkeypatch):
        """If writing the epoch fails, the server stays on standby at its old epoch and tells no one."""
        node, events = node_with_events(store)

        def broken(key, value):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(store, "set_meta", broken)
        with pytest.raises(sqlite3.OperationalError):
            node.promote("test")
        assert (Role.STANDBY, 0, []) == (node.role, node.epoch, events)


class TestPromote:
    def test_promote_takes_one_above_the_highest_seen(self, store):
        """promote() picks max(own, highest seen) + 1, even if the higher epoch was someone else's."""
        node, events = node_with_events(store)
        node.observe_epoch(7, "the main's heartbeat")
        assert 8 == node.promote("no heartbeat")
        assert (Role.ACTIVE, 8, 8, "") == (node.role, node.epoch, node.highest_seen_epoch, node.primary)
        assert [RoleChanged(Role.ACTIVE, 8, "no heartbeat")] == events

    def test_promote_above_own_epoch_when_nothing_higher_seen(self, store):
        """Each promotion takes a fresh epoch: a restarted server never reuses one."""
        store.set_meta("epoch", "4")
        node = NodeState(store, "backup", Role.STANDBY)
        assert [5, 6] == [node.promote("first"), node.promote("second")]

    def test_promote_forgets_the_old_primary(self, store):
        """An active server names no other primary."""
        node = NodeState(store, "backup", Role.STANDBY)
        node.observe_epoch(2, "the main", primary="10.0.0.1:5001")
        node.promote("test")
        assert "" == node.primary


class TestObserveEpoch:
    @pytest.fixture
    def active(self, store):
        """An active node at epoch 3, its events recorded from then on."""
        store.set_meta("epoch", "2")
        node = NodeState(store, "main", Role.STANDBY)
        node.promote("setup")
        events: list[RoleChanged] = []
        node.listeners.append(events.append)
        return node, events

    @pytest.mark.parametrize("epoch", [0, 2, 3])
    def test_equal_or_lower_epoch_changes_nothing(self, active, epoch):
        """Hearing an epoch not above ours keeps us active, with no event."""
        node, events = active
        assert False is node.observe_epoch(epoch, "a client")
        assert (Role.ACTIVE, 3, 3, []) == (node.role, node.epoch, node.highest_seen_epoch, events)

    def test_higher_epoch_steps_down_and_tells(self, active):
        """A higher epoch: standby at once, our own epoch kept, the primary named, one RoleChanged event."""
        node, events = active
        assert True is node.observe_epoch(4, "client 127.0.0.1:4242", primary="127.0.0.1:5002")
        assert (Role.STANDBY, 3, 4, "127.0.0.1:5002") == (node.role, node.epoch, node.highest_seen_epoch,
                                                          node.primary)
        assert 1 == len(events)
        assert (Role.STANDBY, 3) == (events[0].role, events[0].epoch)
        assert "client 127.0.0.1:4242 reported epoch 4" in events[0].reason

    def test_on_standby_a_higher_epoch_is_noted_without_an_event(self, store):
        """A standby server only remembers the higher epoch; there is no role change to tell."""
        node, events = node_with_events(store)
        node.observe_epoch(5, "the main's heartbeat", primary="h:1")
        assert (Role.STANDBY, 0, 5, "h:1", []) == (node.role, node.epoch, node.highest_seen_epoch, node.primary,
                                                   events)

    def test_highest_seen_never_goes_down(self, store):
        """Hearing an old epoch after a newer one leaves the newer one."""
        node = NodeState(store, "main", Role.STANDBY)
        for epoch in (3, 9, 4):
            node.observe_epoch(epoch, "test")
        assert 9 == node.highest_seen_epoch

    def test_listeners_run_outside_the_lock(self, active):
        """A listener may read the node's state (it would deadlock if called under the lock)."""
        node, _ = active
        seen = []
        node.listeners.append(lambda event: seen.append((node.role, node.epoch)))
        node.observe_epoch(10, "test")
        assert [(Role.STANDBY, 3)] == seen


class TestCheckServing:
    def test_active_serves(self, store):
        """check_serving returns quietly while active."""
        node = NodeState(store, "backup", Role.STANDBY)
        node.promote("test")
        node.check_serving()

    def test_standby_names_the_primary(self, store):
        """On standby the STANDBY error names the server that is active."""
        node = NodeState(store, "backup", Role.STANDBY)
        node.observe_epoch(2, "the main's heartbeat", primary="192.168.1.5:5001")
        with pytest.raises(RequestFailed) as refused:
            node.check_serving()
        assert ErrorCode.STANDBY == refused.value.code
        assert "backup server is on standby; the active server is 192.168.1.5:5001" in str(refused.value)

    def test_standby_with_no_known_primary_says_so(self, store):
        """Before any primary is known the error says none is."""
        with pytest.raises(RequestFailed, match="no active server is known") as refused:
            NodeState(store, "main", Role.STANDBY).check_serving()
        assert ErrorCode.STANDBY == refused.value.code

    def test_stepping_down_names_the_new_primary(self, store):
        """step_down(primary=...) makes check_serving point clients there."""
        node = NodeState(store, "backup", Role.STANDBY)
        node.promote("test")
        node.step_down("handing back", "10.0.0.7:5001")
        with pytest.raises(RequestFailed, match="10.0.0.7:5001"):
            node.check_serving()


class TestBecomeActive:
    def test_keeps_its_epoch_when_nothing_higher_was_seen(self, store):
        """A restarted server with epoch 3 and nothing newer heard activates at 3, without a new epoch."""
        store.set_meta("epoch", "3")
        node, events = node_with_events(store)
        node.become_active("the backup is on standby")
        assert (Role.ACTIVE, 3, "3") == (node.role, node.epoch, store.get_meta("epoch"))
        assert [RoleChanged(Role.ACTIVE, 3, "the backup is on standby")] == events

    def test_promotes_when_a_higher_epoch_was_seen(self, store):
        """Having heard of epoch 5, becoming active means promoting to 6 (persisted)."""
        store.set_meta("epoch", "3")
        node = NodeState(store, "main", Role.STANDBY)
        node.observe_epoch(5, "the backup")
        node.become_active("the backup is unreachable")
        assert (Role.ACTIVE, 6, "6") == (node.role, node.epoch, store.get_meta("epoch"))

    def test_never_serves_as_active_at_epoch_zero(self, store):
        """A server that never took an epoch takes one (1) before serving as active."""
        node = NodeState(store, "main", Role.STANDBY)
        node.become_active("serving alone")
        assert (Role.ACTIVE, 1, "1") == (node.role, node.epoch, store.get_meta("epoch"))

    def test_activate_refuses_after_a_higher_epoch(self, store):
        """activate() keeps the epoch, so it refuses once a higher one is known: promote instead."""
        store.set_meta("epoch", "3")
        node = NodeState(store, "main", Role.STANDBY)
        node.observe_epoch(4, "the backup")
        with pytest.raises(RuntimeError, match="promote"):
            node.activate("test")
        assert Role.STANDBY is node.role

    def test_becoming_active_twice_tells_once(self, store):
        """Activating an active server changes nothing and fires no second event."""
        store.set_meta("epoch", "2")
        node, events = node_with_events(store)
        node.become_active("first")
        node.become_active("second")
        assert (Role.ACTIVE, 2, 1) == (node.role, node.epoch, len(events))


class TestStepDown:
    def test_step_down_fires_only_when_active(self, store):
        """Stepping down from active tells the listeners; from standby it does not."""
        node, events = node_with_events(store)
        node.step_down("already standby")
        node.promote("test")
        node.step_down("handing back", "h:1")
        assert [Role.ACTIVE, Role.STANDBY] == [e.role for e in events]
        assert (Role.STANDBY, 1, "h:1") == (node.role, node.epoch, node.primary)


# Authentication ----------------------------------------------------------------------------------------------


class TestProofs:
    def test_round_trip(self):
        """A proof made with the secret for a nonce and purpose checks out."""
        nonce = new_nonce()
        assert proof_ok("s3cret", PEER_PURPOSE, nonce, prove("s3cret", PEER_PURPOSE, nonce))

    def test_proof_is_an_hmac_not_the_secret(self):
        """The proof is 64 hex digits and does not contain the secret."""
        proof = prove("s3cret", SERVER_PURPOSE, "abc")
        assert 64 == len(proof) and set(proof) <= set("0123456789abcdef")
        assert "s3cret" not in proof

    def test_wrong_secret_rejected(self):
        """A proof made with another secret fails."""
        assert not proof_ok("s3cret", PEER_PURPOSE, "n1", prove("guess", PEER_PURPOSE, "n1"))

    def test_wrong_nonce_rejected(self):
        """A recorded proof cannot be replayed against a fresh challenge."""
        assert not proof_ok("s3cret", PEER_PURPOSE, "n2", prove("s3cret", PEER_PURPOSE, "n1"))

    def test_wrong_purpose_rejected(self):
        """A server's proof cannot be reflected back as a peer's."""
        assert not proof_ok("s3cret", PEER_PURPOSE, "n1", prove("s3cret", SERVER_PURPOSE, "n1"))

    @pytest.mark.parametrize("proof", ["", prove("", PEER_PURPOSE, "n1")])
    def test_empty_secret_is_never_ok(self, proof):
        """With no secret configured nothing authenticates, not even a proof made with the empty secret."""
        assert False is proof_ok("", PEER_PURPOSE, "n1", proof)

    def test_empty_proof_rejected(self):
        """An empty answer (what a refusing main sends) fails the check."""
        assert False is proof_ok("s3cret", PEER_PURPOSE, "n1", "")

    def test_nonces_are_fresh(self):
        """Every challenge is new: 128 random bits as hex."""
        nonces = {new_nonce() for _ in range(100)}
        assert 100 == len(nonces)
        assert {32} == {len(n) for n in nonces}

    @given(secret=st.text(min_size=1), other=st.text(min_size=1), nonce=st.text(alphabet="0123456789abcdef"))
    @settings(max_examples=50, deadline=None)
    def test_only_the_same_secret_proves(self, secret, other, nonce):
        """For any secrets and nonce: the same secret proves, a different one does not."""
        assert proof_ok(secret, SERVER_PURPOSE, nonce, prove(secret, SERVER_PURPOSE, nonce))
        assert proof_ok(secret, SERVER_PURPOSE, nonce, prove(other, SERVER_PURPOSE, nonce)) is (secret == other)


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
        from minitorrent.wire.protocol import RemoteProtocolError

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


class TestOutlandishClaims:
    """Numbers a peer sends that are absurd are refused or outbid, never obeyed."""

    def test_absurd_epoch_in_a_hello_is_refused(self):
        """A hello claiming an epoch beyond 2**63-1 is a bad request, not a way to break promotion."""
        from minitorrent.wire import protocol
        from minitorrent.wire.protocol import RemoteProtocolError

        with pytest.raises(RemoteProtocolError):
            protocol.Hello(protocol.PROTOCOL_VERSION, "client", "x", 10**4000)

    def test_manifest_with_a_huge_chunk_size_is_refused(self):
        """A manifest from the wire may not make a receiver allocate more than the largest chunk size."""
        from integrity import Manifest

        with pytest.raises(ValueError, match="chunk_size"):
            Manifest.from_header({"size": 1, "chunk_size": 2**40, "sha256": "0" * 64, "chunks": 1}, b"\0" * 32)

    def test_main_without_backup_stays_active_after_a_client_claims_a_higher_epoch(self, server_factory):
        """A main serving alone takes an epoch above a client's claim instead of standing by for good."""
        from conftest import TLS

        from minitorrent.net.remote import ServerSession

        server = server_factory()
        host, port = server.server.address
        ServerSession.open(host, port, io_timeout_s=5, secure=TLS, epoch=99).close()
        assert ("active", 100) == (server.node.role.value, server.node.epoch)
