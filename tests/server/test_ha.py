"""The role decision as a table: a row per situation, the action expected. Pure, no sockets, milliseconds.

Each row builds an ``Observation`` from a few keywords over the defaults of
its kind of server; the invariant tests then run ``decide`` over every
combination of a grid of situations (hundreds) and check what must never
happen whatever the situation.
"""
from __future__ import annotations

import itertools

import pytest

from minitorrent.server.ha import Action, Kind, Observation, decide
from minitorrent.server.roles import Role

A, S = Role.ACTIVE, Role.STANDBY
STAY, PROMOTE, RESUME, STEP_DOWN = Action.STAY, Action.PROMOTE, Action.RESUME, Action.STEP_DOWN
FOLLOW, CATCH_UP, HAND_BACK, CAMPAIGN = Action.FOLLOW, Action.CATCH_UP, Action.HAND_BACK, Action.CAMPAIGN
TIMEOUT = 6.0


def main(role: Role = S, epoch: int = 4, **seen) -> Observation:
    """The main of a pair; by default it heard nothing yet (just started)."""
    values = {"highest_seen": epoch, "peer_address": "127.0.0.1:7002"}
    values.update(seen)
    return Observation(Kind.MAIN, role, epoch, heartbeat_timeout_s=TIMEOUT, **values)


def heard(role: Role, epoch: int) -> dict:
    """The backup answered the last heartbeat with ``role`` and ``epoch``."""
    return {"peer_reachable": True, "peer_role": role, "peer_epoch": epoch}


def backup(role: Role = S, epoch: int = 4, **seen) -> Observation:
    """The backup of a pair; by default the main at epoch 4 beat 1 s ago and is its primary."""
    values = {"highest_seen": epoch, "peer_epoch": 4, "peer_address": "127.0.0.1:7001", "peer_silent_s": 1.0,
              "primary": "127.0.0.1:7001"}
    values.update(seen)
    return Observation(Kind.BACKUP, role, epoch, heartbeat_timeout_s=TIMEOUT, **values)


def member(role: Role = S, epoch: int = 10, **seen) -> Observation:
    """A member "b" of an etcd cluster, etcd reachable; by default "a" leads at revision 10 and is followed."""
    values = {"highest_seen": epoch, "name": "b", "coordinator_ok": True, "leader": "a", "leader_epoch": 10,
              "peer_address": "127.0.0.1:7001", "primary": "127.0.0.1:7001"}
    values.update(seen)
    return Observation(Kind.MEMBER, role, epoch, **values)


ROWS = [
    # The main of a pair --------------------------------------------------------------------------------------
    ("main alone, just started", main(epoch=0, has_peer=False), PROMOTE),
    ("main alone, restarted at its epoch", main(has_peer=False), RESUME),
    ("main alone after a client claimed a higher epoch", main(has_peer=False, highest_seen=9), PROMOTE),
    ("main alone, active", main(A, has_peer=False), STAY),
    ("main just started, backup silent so far", main(peer_silent_s=1.0), STAY),
    ("main started, backup unreachable past the timeout", main(peer_silent_s=6.5), RESUME),
    ("main first start, backup unreachable past the timeout", main(epoch=0, peer_silent_s=6.5), PROMOTE),
    ("main active, backup stops answering", main(A, peer_silent_s=60.0), STAY),
    ("main started, backup on standby at our epoch", main(**heard(S, 4)), RESUME),
    ("main first start, backup on standby at 0", main(epoch=0, **heard(S, 0)), PROMOTE),
    ("main started, backup on standby below us", main(**heard(S, 2)), RESUME),
    ("main active, backup follows", main(A, **heard(S, 4)), STAY),
    ("main active, backup stale-active below us", main(A, **heard(A, 3)), STAY),
    ("main on standby, backup stale-active below us", main(**heard(A, 3)), RESUME),
    ("main back, backup took over (higher epoch)", main(**heard(A, 5)), CATCH_UP),
    ("main active (frozen), backup took over", main(A, **heard(A, 5)), STEP_DOWN),
    ("tie: backup that never heard the main is active at our epoch", main(A, **heard(A, 4)), STEP_DOWN),
    ("tie, main already on standby", main(**heard(A, 4)), CATCH_UP),
    ("main back with an empty folder, backup on standby ahead", main(epoch=0, **heard(S, 6)), CATCH_UP),
    ("main back with an empty folder, backup active", main(epoch=0, **heard(A, 7)), CATCH_UP),
    ("main catching up, backup still active", main(catching_up=True, **heard(A, 5)), STAY),
    ("main catching up, backup unreachable past the timeout", main(catching_up=True, peer_silent_s=9.0), STAY),
    ("main caught up and handed the role", main(handed_back=True, highest_seen=5, **heard(A, 5)), PROMOTE),
    ("main handed the role, backup now standby", main(handed_back=True, highest_seen=5, **heard(S, 5)), PROMOTE),
    ("main active after taking the role back, last answer stale", main(A, epoch=6, **heard(A, 5)), STAY),
    ("main on standby, catching up, backup handed over but not yet seen", main(catching_up=True, **heard(S, 4)),
     STAY),
    # The backup of a pair -------------------------------------------------------------------------------------
    ("backup on standby, main beats", backup(), STAY),
    ("backup on standby, main silent just under the timeout", backup(peer_silent_s=5.9), STAY),
    ("backup on standby, main silent past the timeout", backup(peer_silent_s=6.1), PROMOTE),
    ("backup that never heard the main", backup(epoch=0, peer_epoch=0, peer_address="", primary="",
                                                peer_silent_s=6.1), PROMOTE),
    ("backup that never heard the main, within the timeout", backup(epoch=0, peer_epoch=0, peer_address="",
                                                                    primary="", peer_silent_s=2.0), STAY),
    ("backup hears a main with a higher epoch", backup(peer_epoch=5), FOLLOW),
    ("backup hears a main at a new address", backup(peer_address="127.0.0.1:7101"), FOLLOW),
    ("backup active, main back and asks (failback auto)", backup(A, epoch=5, handback_requested=True), HAND_BACK),
    ("backup active, main asks (failback manual)", backup(A, epoch=5, failback="manual", handback_requested=True),
     STAY),
    ("backup active, main asks (manual, approved)", backup(A, epoch=5, failback="manual", handback_requested=True,
                                                          handback_approved=True), HAND_BACK),
    ("backup on standby, main asks for a role it holds", backup(handback_requested=True), HAND_BACK),
    ("backup active, files added here since the main read our inventory",
     backup(A, epoch=5, handback_requested=True, changed_since_inventory=True), STAY),
    ("backup active, added since inventory, manual and approved",
     backup(A, epoch=5, failback="manual", handback_requested=True, handback_approved=True,
            changed_since_inventory=True), STAY),
    ("backup active hears a higher epoch", backup(A, epoch=5, peer_epoch=6), STEP_DOWN),
    ("backup active, stale main beats below it", backup(A, epoch=5, peer_epoch=4), STAY),
    ("operator promotes, main silent", backup(peer_silent_s=30.0, operator_promote=True), PROMOTE),
    ("operator promotes while the main lives (failback auto)", backup(operator_promote=True), PROMOTE),
    ("after the operator's promotion, the main asks (failback auto)",
     backup(A, epoch=5, operator_term=True, handback_requested=True), STAY),
    ("after the operator's promotion, approved", backup(A, epoch=5, operator_term=True, handback_requested=True,
                                                        handback_approved=True), HAND_BACK),
    ("operator promotes an active backup", backup(A, epoch=5, operator_promote=True), STAY),
    # A member of an etcd cluster ------------------------------------------------------------------------------
    ("member follows the leader", member(), STAY),
    ("member learns a newer leader", member(leader_epoch=12), FOLLOW),
    ("member sees nobody leads", member(leader=""), CAMPAIGN),
    ("member behind sees nobody leads", member(leader="", caught_up=False), STAY),
    ("member won the key", member(leader="b", leader_epoch=12, lease_ok=True), PROMOTE),
    ("member won the key at a revision below an epoch seen", member(leader="b", leader_epoch=9, lease_ok=True,
                                                                     highest_seen=11), STAY),
    ("member still holds the key when etcd comes back", member(leader="b", leader_epoch=10, lease_ok=True), RESUME),
    ("member cannot reach etcd", member(coordinator_ok=False, leader=""), STAY),
    ("leader leads", member(A, leader="b", lease_ok=True), STAY),
    ("leader's lease renewal failed", member(A, leader="b", lease_ok=False), STEP_DOWN),
    ("leader loses etcd", member(A, leader="b", lease_ok=True, coordinator_ok=False), STEP_DOWN),
    ("leader (after SIGCONT) finds another leader", member(A, leader="c", leader_epoch=15, lease_ok=False),
     STEP_DOWN),
    ("leader finds the key gone", member(A, leader="", lease_ok=True), STEP_DOWN),
]


class TestDecisionTable:
    @pytest.mark.parametrize("situation, observation, expected", ROWS, ids=[row[0] for row in ROWS])
    def test_row(self, situation, observation, expected):
        """Each situation of the table gives the action written beside it."""
        assert expected == decide(observation).action

    def test_every_decision_gives_a_reason(self):
        """A role change is always logged with its reason: no row decides without one."""
        assert [] == [row[0] for row in ROWS if not decide(row[1]).reason]


class TestOperatorPromotion:
    def test_promotion_while_the_main_lives_says_so(self):
        """An operator's promotion while the main beats says the main is alive and the role stays until approved."""
        reason = decide(backup(operator_promote=True)).reason
        assert (True, True) == ("is alive" in reason, "until the operator approves" in reason)

    def test_failback_auto_does_not_undo_the_operators_promotion(self):
        """With failback auto the main's request is refused with a reason naming the operator's promotion."""
        decision = decide(backup(A, epoch=5, operator_term=True, handback_requested=True))
        assert (STAY, True) == (decision.action, "operator promoted" in decision.reason)


class TestFollow:
    def test_follow_carries_the_epoch_to_adopt(self):
        """FOLLOW names the epoch of the server followed."""
        assert (FOLLOW, 7) == (decide(backup(peer_epoch=7)).action, decide(backup(peer_epoch=7)).epoch)

    def test_promote_in_etcd_carries_the_revision(self):
        """A member that won the key is promoted to the key's revision, not to a number of its own."""
        decision = decide(member(leader="b", leader_epoch=42, lease_ok=True))
        assert (PROMOTE, 42) == (decision.action, decision.epoch)


# Invariants over a grid of situations ----------------------------------------------------------------------------

ROLES = (A, S)
EPOCHS = (0, 4, 5)
PEER_ROLES = (None, A, S)


def main_grid():
    for role, epoch, peer_role, peer_epoch, reachable, silent, catching, handed in itertools.product(
            ROLES, EPOCHS, PEER_ROLES, EPOCHS, (True, False), (0.5, 7.0), (True, False), (True, False)):
        if reachable and peer_role is None:
            continue
        yield main(role, epoch, peer_reachable=reachable, peer_role=peer_role, peer_epoch=peer_epoch,
                   peer_silent_s=silent, catching_up=catching, handed_back=handed and role is S)


def backup_grid():
    for role, epoch, peer_epoch, silent, asked, manual, approved, operator, term, added in itertools.product(
            ROLES, EPOCHS, EPOCHS, (0.5, 7.0), (True, False), (True, False), (True, False), (True, False),
            (True, False), (True, False)):
        yield backup(role, epoch, peer_epoch=peer_epoch, peer_silent_s=silent, handback_requested=asked,
                     failback="manual" if manual else "auto", handback_approved=approved,
                     operator_promote=operator, operator_term=term and role is A, changed_since_inventory=added)


def member_grid():
    for role, epoch, ok, lease, leader, leader_epoch, caught_up in itertools.product(
            ROLES, (0, 10, 12), (True, False), (True, False), ("", "a", "b"), (9, 10, 12), (True, False)):
        yield member(role, epoch, coordinator_ok=ok, lease_ok=lease, leader=leader, leader_epoch=leader_epoch,
                     caught_up=caught_up)


class TestInvariants:
    def test_grids_cover_hundreds_of_situations(self):
        """The invariants below are checked over several hundred situations."""
        assert True is (len(list(main_grid())) + len(list(backup_grid())) + len(list(member_grid())) > 500)

    def test_main_never_takes_the_role_beside_a_backup_at_or_above_its_epoch(self):
        """A main whose backup just answered active with an epoch >= its own never promotes or resumes, unless handed the role."""
        wrong = [o for o in main_grid() if o.peer_reachable and o.peer_role is A and o.peer_epoch >= o.epoch
                 and not o.handed_back and decide(o).action in (PROMOTE, RESUME)]
        assert [] == wrong

    def test_main_never_resumes_below_a_higher_epoch(self):
        """RESUME (keep our epoch) only when nothing higher was heard and an epoch was taken before."""
        wrong = [o for o in main_grid() if decide(o).action is RESUME and (o.peer_epoch > o.epoch or o.epoch == 0)]
        assert [] == wrong

    def test_active_servers_never_catch_up_or_promote(self):
        """An active server never starts a catch-up, a campaign or a new promotion."""
        wrong = [o for o in itertools.chain(main_grid(), backup_grid(), member_grid())
                 if o.role is A and decide(o).action in (CATCH_UP, CAMPAIGN, PROMOTE, RESUME)]
        assert [] == wrong

    def test_backup_never_promotes_while_the_main_beats_unless_asked(self):
        """A backup that heard the main within the timeout promotes only at its operator's request."""
        wrong = [o for o in backup_grid() if o.peer_silent_s <= TIMEOUT and not o.operator_promote
                 and decide(o).action is PROMOTE]
        assert [] == wrong

    def test_backup_hands_back_only_when_allowed(self):
        """An active backup hands the role back only when asked, and with failback manual or an operator's term only once approved."""
        wrong = [o for o in backup_grid() if o.role is A and decide(o).action is HAND_BACK
                 and (not o.handback_requested or o.changed_since_inventory
                      or ((o.failback == "manual" or o.operator_term) and not o.handback_approved))]
        assert [] == wrong

    def test_member_leads_only_while_holding_the_key(self):
        """A member is promoted, or stays leader, only with etcd reachable, its lease renewed and the key its own."""
        wrong = [o for o in member_grid() if (decide(o).action in (PROMOTE, RESUME)
                                              or (o.role is A and decide(o).action is STAY))
                 and not (o.coordinator_ok and o.lease_ok and o.leader == o.name)]
        assert [] == wrong

    def test_member_promotion_never_goes_back_in_epochs(self):
        """A member's promotion epoch is never below an epoch it has already held or seen."""
        wrong = [o for o in member_grid() if decide(o).action is PROMOTE and decide(o).epoch < o.epoch]
        assert [] == wrong

    def test_member_without_etcd_never_campaigns(self):
        """No campaign while etcd is unreachable: etcd is the only referee."""
        assert [] == [o for o in member_grid() if not o.coordinator_ok and decide(o).action is CAMPAIGN]
