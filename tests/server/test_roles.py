"""Unit tests for roles.py (roles, epochs) and peer authentication; replication has tests/server/test_replication.py.

In-process and fast: a real SQLite ``ServerStore`` under ``tmp_path``, no sockets.
"""
from __future__ import annotations

import sqlite3
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from database import ServerStore
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


class TestLeaseDeadline:
    """A leader under a coordinator's lease serves only before its deadline (etcd mode; see member.py)."""

    def test_serves_before_the_deadline(self, store):
        """Active with a lease deadline still ahead: it serves."""
        node = NodeState(store, "a", Role.STANDBY)
        node.promote("test")
        node.hold_lease_until(time.monotonic() + 60)
        node.check_serving()
        assert (True, Role.ACTIVE) == (node.is_active(), node.role)

    def test_refuses_past_the_deadline_before_any_step_down(self, store):
        """Past its deadline an active leader refuses as on standby, saying why; its role is the loop's to change."""
        node = NodeState(store, "a", Role.STANDBY)
        node.promote("test")
        node.hold_lease_until(time.monotonic() - 0.001)
        with pytest.raises(RequestFailed, match="leader lease may have run out") as refused:
            node.check_serving()
        assert (ErrorCode.STANDBY, False, Role.ACTIVE) == (refused.value.code, node.is_active(), node.role)

    def test_a_renewal_serves_again(self, store):
        """A later deadline (the lease renewed) makes the same leader serve again."""
        node = NodeState(store, "a", Role.STANDBY)
        node.promote("test")
        node.hold_lease_until(0.0)
        node.hold_lease_until(time.monotonic() + 60)
        assert True is node.is_active()

    def test_without_a_lease_the_role_alone_decides(self, store):
        """A pair's server never holds a lease: active means serving."""
        node = NodeState(store, "main", Role.STANDBY)
        node.promote("test")
        assert True is node.is_active()


class TestActivate:
    """Whether to promote or resume is ha.decide's (tests/server/test_ha.py); activate only applies RESUME."""

    def test_keeps_its_epoch(self, store):
        """A restarted server with epoch 3 and nothing newer heard activates at 3, without a new epoch."""
        store.set_meta("epoch", "3")
        node, events = node_with_events(store)
        node.activate("the backup is on standby")
        assert (Role.ACTIVE, 3, "3") == (node.role, node.epoch, store.get_meta("epoch"))
        assert [RoleChanged(Role.ACTIVE, 3, "the backup is on standby")] == events

    def test_activate_refuses_after_a_higher_epoch(self, store):
        """activate() keeps the epoch, so it refuses once a higher one is known: promote instead."""
        store.set_meta("epoch", "3")
        node = NodeState(store, "main", Role.STANDBY)
        node.observe_epoch(4, "the backup")
        with pytest.raises(RuntimeError, match="promote"):
            node.activate("test")
        assert Role.STANDBY is node.role

    def test_activating_twice_tells_once(self, store):
        """Activating an active server changes nothing and fires no second event."""
        store.set_meta("epoch", "2")
        node, events = node_with_events(store)
        node.activate("first")
        node.activate("second")
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
        """A main serving alone keeps its role and epoch when a client claims a higher one it cannot prove."""
        from conftest import TLS

        from minitorrent.net.remote import EpochClaim, ServerSession

        server = server_factory()
        host, port = server.server.address
        epoch = server.node.epoch
        ServerSession.open(host, port, io_timeout_s=5, claim=EpochClaim(99, "x", "f" * 64), secure=TLS).close()
        assert ("active", epoch) == (server.node.role.value, server.node.epoch)

    def test_stored_epoch_past_the_wire_limit_is_refused_at_start(self, tmp_path):
        """A catalog holding an epoch past 2**63-1 (as an old attack could leave) stops the start with a way out."""
        from error_handler import MiniTorrentError

        store = ServerStore(tmp_path / "catalog.db")
        store.set_meta("epoch", str(2**63))
        with pytest.raises(MiniTorrentError, match="outside 0..2\\*\\*63-1; to recover.*UPDATE meta"):
            NodeState(store, "main", Role.STANDBY)
        store.close()

    def test_promotion_never_passes_the_wire_limit(self, tmp_path):
        """A server at the last epoch the wire carries refuses to promote rather than take 2**63."""
        from error_handler import MiniTorrentError
        from minitorrent.wire.protocol import MAX_EPOCH

        store = ServerStore(tmp_path / "catalog.db")
        node = NodeState(store, "backup", Role.STANDBY)
        node.observe_epoch(MAX_EPOCH, "the authenticated peer")
        with pytest.raises(MiniTorrentError, match="wire limit"):
            node.promote("test")
        assert (Role.STANDBY, str(0)) == (node.role, store.get_meta("epoch", "0"))
        store.close()


class TestPromoteTo:
    def test_takes_the_coordinators_epoch_persisted(self, store_path):
        """promote_to takes exactly the epoch given (etcd's revision) and a restarted server reads it back."""
        with ServerStore(store_path) as first:
            node = NodeState(first, "a", Role.STANDBY)
            node.promote_to(42, "won the key")
            assert (Role.ACTIVE, 42) == (node.role, node.epoch)
        with ServerStore(store_path) as reopened:
            assert 42 == NodeState(reopened, "a", Role.STANDBY).epoch

    def test_never_goes_back(self, store):
        """An epoch not above the one held is refused and changes nothing."""
        node = NodeState(store, "a", Role.STANDBY)
        node.promote_to(10, "first")
        node.step_down("test")
        with pytest.raises(ValueError):
            node.promote_to(10, "again")
        assert (Role.STANDBY, 10) == (node.role, node.epoch)

    def test_an_epoch_merely_heard_of_does_not_block_it(self, store):
        """A higher epoch heard from an unverified source does not stop the coordinator's promotion."""
        node = NodeState(store, "a", Role.STANDBY)
        node.observe_epoch(10**6, "a client")
        node.promote_to(7, "won the key")
        assert (Role.ACTIVE, 7) == (node.role, node.epoch)
