"""The leader key in a real etcd (started on free ports per test) through the v3 JSON gateway."""
from __future__ import annotations

import time

import pytest
from conftest import LONG_TIMEOUT, wait_until

from minitorrent.common.launcher import free_port
from minitorrent.server.coordinator import (
    EtcdGateway,
    LEASE_SAFETY_FRACTION,
    EtcdUnavailable,
    Leader,
    LeaderElection,
)

TTL_S = 2


def election(etcd, name: str, prefix: str = "/t") -> LeaderElection:
    return LeaderElection(EtcdGateway([etcd.endpoint], timeout_s=1.0), prefix, name, f"{name}:1", TTL_S)


class TestCampaign:
    def test_first_member_wins_with_the_revision_as_epoch(self, etcd):
        """The first campaign creates the key: its epoch is etcd's revision; the next member sees it as leader."""
        a, b = election(etcd, "a"), election(etcd, "b")
        won = a.campaign()
        assert (Leader("a", "a:1", won.epoch, won.lease), True) == (won, won.epoch > 0)
        assert (won, won, True) == (b.campaign(), b.leader(), a.lease_valid())

    def test_renewal_keeps_the_key(self, etcd):
        """A leader that renews keeps the key past its TTL."""
        a = election(etcd, "a")
        won = a.campaign()
        renewals = []
        end = time.monotonic() + 2 * TTL_S
        while time.monotonic() < end:  # renew every half second for two TTLs
            renewals.append(a.renew())
            due = time.monotonic() + 0.5
            wait_until(lambda due=due: time.monotonic() >= due, what="the next renewal")
        assert (won, {True}) == (a.leader(), set(renewals))

    def test_expired_lease_lets_another_win_with_a_higher_epoch(self, etcd):
        """A leader that stops renewing loses the key after its TTL; another wins it with a higher epoch; the old renewal fails."""
        a, b = election(etcd, "a"), election(etcd, "b")
        first = a.campaign()
        second = wait_until(lambda: (b.campaign() or Leader("", "", 0, 0)).name == "b" and b.leader(),
                            LONG_TIMEOUT, "the key to expire and b to win it")
        assert (True, False, False) == (second.epoch > first.epoch, a.renew(), a.lease_valid())

    def test_the_local_deadline_ends_a_margin_before_the_ttl(self, etcd):
        """The lease deadline a leader serves under is its TTL from the grant less the safety margin; none without a lease."""
        a = election(etcd, "a")
        assert 0.0 == a.lease_deadline()
        before = time.monotonic()
        a.campaign()
        after = time.monotonic()
        granted_at = a.lease_deadline() - TTL_S * (1 - LEASE_SAFETY_FRACTION)  # when the grant was sent
        assert True is (before <= granted_at <= after), (before, granted_at, after)

    def test_resign_frees_the_key_at_once(self, etcd):
        """A leader that resigns frees the key without waiting for its TTL."""
        a, b = election(etcd, "a"), election(etcd, "b")
        a.campaign()
        a.resign()
        assert "b" == b.campaign().name

    def test_prefixes_keep_clusters_apart(self, etcd):
        """Two clusters with different prefixes on one etcd each elect their own leader."""
        assert ("a", "b") == (election(etcd, "a", "/one").campaign().name, election(etcd, "b", "/two").campaign().name)


class TestUnavailable:
    def test_no_etcd_raises_naming_the_endpoint(self):
        """With nothing listening, every call raises EtcdUnavailable naming the endpoint tried."""
        endpoint = f"http://127.0.0.1:{free_port()}"
        lonely = LeaderElection(EtcdGateway([endpoint], timeout_s=0.5), "/t", "a", "a:1", TTL_S)
        with pytest.raises(EtcdUnavailable, match=endpoint):
            lonely.campaign()

    def test_second_endpoint_answers_when_the_first_is_dead(self, etcd):
        """Endpoints are tried in turn: a dead first one does not stop the election."""
        dead = f"http://127.0.0.1:{free_port()}"
        a = LeaderElection(EtcdGateway([dead, etcd.endpoint], timeout_s=0.5), "/t", "a", "a:1", TTL_S)
        assert "a" == a.campaign().name

    def test_renewal_fails_when_etcd_is_gone(self, etcd):
        """A leader whose etcd dies gets EtcdUnavailable on renewal, and its lease is no longer valid after the TTL."""
        a = election(etcd, "a")
        a.campaign()
        etcd.stop()
        with pytest.raises(EtcdUnavailable):
            a.renew()
        wait_until(lambda: not a.lease_valid(), TTL_S + 1, "the local lease deadline to pass")
