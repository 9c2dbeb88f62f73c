"""Who should serve: every role transition of every server, as one pure decision.

A server's decision loop (``minitorrent.server.haloop``) gathers what the
server observed into one ``Observation``, calls ``decide`` and applies the
one ``Decision`` it returns. Threads that talk to the network only record
what they heard. ``decide`` does no I/O and reads no clock: the table of
cases in tests/server/test_ha.py runs in milliseconds.

Three kinds of server decide here:

* the **main** of a pair: it follows what the backup said in its last
  heartbeat answer (or that it did not answer);
* the **backup** of a pair: it follows the main's heartbeats, the main's
  requests for the role back, and its operator;
* a **member** of an etcd cluster: it follows the leader key in etcd.

One rule is enforced outside this function, at once, by ``NodeState``: an
epoch above ours heard from a source we can verify makes an active server
stop serving before the next request (a tick of this loop would be too
late for a request already in flight). The rows that say STEP_DOWN for
that case are here so the whole picture is on one screen; applying them
to a server already on standby changes nothing.

Epochs only ever grow: PROMOTE takes one above every epoch seen (persisted
before use); RESUME serves again at our own epoch, allowed only when no
higher one has been seen and we took one before.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from minitorrent.server.roles import Role


class Kind(str, enum.Enum):
    """Which rules a server follows."""

    MAIN = "main"
    BACKUP = "backup"
    MEMBER = "member"


class Action(str, enum.Enum):
    """What the loop does next. Requests are imperative."""

    STAY = "stay"  # change nothing (a pending hand-back request is refused)
    PROMOTE = "promote"  # become active with an epoch above every one seen (etcd: the leader key's revision)
    RESUME = "resume"  # become active again at our own epoch
    STEP_DOWN = "step_down"  # stop serving as active
    FOLLOW = "follow"  # on standby: adopt the active server's epoch and address
    CATCH_UP = "catch_up"  # fetch what the active peer gained, then ask for the role back
    HAND_BACK = "hand_back"  # give the active role to the main that asked for it
    CAMPAIGN = "campaign"  # etcd: try to win the leader key


@dataclass(frozen=True)
class Decision:
    """One action, why, and (FOLLOW, etcd PROMOTE) the epoch it concerns."""

    action: Action
    reason: str
    epoch: int = 0


@dataclass(frozen=True)
class Observation:
    """What one server knows at one tick. Durations in seconds.

    ``peer_*`` is the other server of a pair: for the main, the backup's
    last heartbeat answer; for the backup, the last heartbeat of a main
    whose epoch was not below ours. ``peer_silent_s`` counts from our own
    start when the peer was never heard, so a silent peer gets a full
    timeout. ``leader_*``/``lease_ok`` are etcd's answers (member only).
    """

    kind: Kind
    role: Role
    epoch: int
    highest_seen: int = 0
    heartbeat_timeout_s: float = 6.0
    # The peer of a pair.
    has_peer: bool = True
    peer_reachable: bool = False
    peer_role: Role | None = None
    peer_epoch: int = 0
    peer_address: str = ""
    peer_silent_s: float = 0.0
    primary: str = ""
    # Failback.
    catching_up: bool = False
    handed_back: bool = False
    failback: str = "auto"
    handback_requested: bool = False
    handback_approved: bool = False
    changed_since_inventory: bool = False  # backup: files were added, removed or renamed here since the main last
    # read our inventory
    # The operator.
    operator_promote: bool = False
    operator_term: bool = False  # our active term began with the operator's promotion
    # etcd (member).
    name: str = ""
    coordinator_ok: bool = False
    lease_ok: bool = False
    leader: str = ""  # who holds the leader key ("" nobody)
    leader_epoch: int = 0  # the revision at which the key was won
    caught_up: bool = True


def decide(obs: Observation) -> Decision:
    """The one action a server takes now, given ``obs``. Pure; any thread."""
    if obs.kind is Kind.MAIN:
        return _decide_main(obs)
    if obs.kind is Kind.BACKUP:
        return _decide_backup(obs)
    return _decide_member(obs)


def _take_role(obs: Observation, reason: str) -> Decision:
    """PROMOTE if a higher epoch was seen or none was ever taken, else RESUME at our epoch."""
    if max(obs.highest_seen, obs.peer_epoch) > obs.epoch or obs.epoch == 0:
        return Decision(Action.PROMOTE, reason)
    return Decision(Action.RESUME, reason)


# The main of a pair ---------------------------------------------------------------------------------------------


def _decide_main(obs: Observation) -> Decision:
    active = obs.role is Role.ACTIVE
    if not obs.has_peer:
        if active:
            return Decision(Action.STAY, "no backup: serving alone")
        return _take_role(obs, "no backup to hand over to: serving alone")
    if not active and obs.handed_back:
        return Decision(Action.PROMOTE, "the backup handed the active role back")
    if obs.peer_reachable:
        return _main_heard_backup(obs)
    if active:
        return Decision(Action.STAY, "active; the backup does not answer")
    if obs.catching_up:
        return Decision(Action.STAY, "catching up from the backup")
    if obs.peer_silent_s > obs.heartbeat_timeout_s:
        # Counted from our own start, as the backup counts: a backup that took over while we were away
        # and is briefly unreachable must not find us serving a stale catalog beside it.
        return _take_role(obs, f"the backup is unreachable for {obs.peer_silent_s:.1f} s")
    return Decision(Action.STAY, "asking the backup who is active before serving")


def _main_heard_backup(obs: Observation) -> Decision:
    active = obs.role is Role.ACTIVE
    backup_active = obs.peer_role is Role.ACTIVE
    # It took over while we were away, or we lost our state; or it promoted itself to our own epoch
    # without ever hearing it (no heartbeat reached it before we went silent): a tie nothing else breaks.
    tie = backup_active and obs.peer_epoch == obs.epoch
    if obs.peer_epoch > obs.epoch or tie:
        if active:
            why = "also active with our epoch" if tie else "ahead"
            return Decision(Action.STEP_DOWN, f"the backup is {why}: epoch {obs.peer_epoch}, ours {obs.epoch}")
        if obs.catching_up:
            return Decision(Action.STAY, "catching up from the backup")
        return Decision(Action.CATCH_UP, f"the backup knows epoch {obs.peer_epoch} (ours is {obs.epoch}): "
                                         "catching up from it before serving")
    if active:
        return Decision(Action.STAY, "active; the backup follows")
    if obs.catching_up:
        return Decision(Action.STAY, "catching up from the backup")
    return _take_role(obs, "the backup is on standby" if not backup_active
                      else f"the backup is active with an older epoch ({obs.peer_epoch})")


# The backup of a pair -----------------------------------------------------------------------------------------


def _decide_backup(obs: Observation) -> Decision:
    if obs.role is Role.ACTIVE:
        return _active_backup(obs)
    if obs.operator_promote:
        return Decision(Action.PROMOTE, _operator_promote_reason(obs))
    if obs.handback_requested:
        return Decision(Action.HAND_BACK, "on standby: the main already holds the role")
    if obs.peer_silent_s > obs.heartbeat_timeout_s:
        return Decision(Action.PROMOTE, f"no heartbeat from the main for {obs.peer_silent_s:.1f} s")
    heard = obs.peer_address and obs.peer_silent_s <= obs.heartbeat_timeout_s
    if heard and (obs.peer_epoch > obs.epoch or obs.primary != obs.peer_address):
        return Decision(Action.FOLLOW, f"following the main at {obs.peer_address}", obs.peer_epoch)
    return Decision(Action.STAY, "on standby; the main beats")


def _active_backup(obs: Observation) -> Decision:
    if obs.peer_epoch > obs.epoch:
        return Decision(Action.STEP_DOWN, f"the main's heartbeat carries epoch {obs.peer_epoch}, above ours")
    if obs.handback_requested:
        if obs.changed_since_inventory:
            return Decision(Action.STAY, "the catalog changed here since the main read our inventory: "
                                         "it catches up again before taking the role")
        if _handback_needs_operator(obs) and not obs.handback_approved:
            why = "failback is manual" if obs.failback == "manual" else "the operator promoted this backup"
            return Decision(Action.STAY, f"{why}: waiting for the operator to approve the hand-back")
        return Decision(Action.HAND_BACK, "handing the active role back to the main")
    if obs.operator_promote:
        return Decision(Action.STAY, f"already active with epoch {obs.epoch}")
    return Decision(Action.STAY, "active")


def _handback_needs_operator(obs: Observation) -> bool:
    """An operator's promotion is what the operator asked for: failback auto does not undo it behind their back."""
    return obs.failback == "manual" or obs.operator_term


def _operator_promote_reason(obs: Observation) -> str:
    if obs.peer_address and obs.peer_silent_s <= obs.heartbeat_timeout_s:
        return (f"promoted by the operator while the main at {obs.peer_address} is alive (heard "
                f"{obs.peer_silent_s:.1f} s ago): the main steps down, and this backup keeps the role "
                "until the operator approves the hand-back")
    return "promoted by the operator"


# A member of an etcd cluster -------------------------------------------------------------------------------------


def _decide_member(obs: Observation) -> Decision:
    if obs.role is Role.ACTIVE:
        if not obs.coordinator_ok:
            return Decision(Action.STEP_DOWN, "etcd is unreachable: the leader lease cannot be renewed")
        if not obs.lease_ok:
            return Decision(Action.STEP_DOWN, "the leader lease was not renewed in time")
        if obs.leader != obs.name:
            return Decision(Action.STEP_DOWN, f"{obs.leader or 'nobody'} holds the leader key")
        return Decision(Action.STAY, "leading")
    if not obs.coordinator_ok:
        return Decision(Action.STAY, "etcd is unreachable: waiting for it")
    if obs.leader == obs.name and obs.lease_ok:
        if obs.leader_epoch > max(obs.epoch, obs.highest_seen):
            return Decision(Action.PROMOTE, f"won the leader key at revision {obs.leader_epoch}", obs.leader_epoch)
        if obs.leader_epoch == obs.epoch >= obs.highest_seen:  # etcd came back and our lease outlived the outage
            return Decision(Action.RESUME, f"etcd answers again and this member still holds the leader key "
                                           f"(epoch {obs.epoch})")
        return Decision(Action.STAY, f"the key's revision {obs.leader_epoch} is below an epoch already seen")
    if not obs.leader:
        if not obs.caught_up:
            return Decision(Action.STAY, "no leader, but this member is behind: not campaigning")
        return Decision(Action.CAMPAIGN, "nobody holds the leader key")
    if obs.leader_epoch > obs.epoch or obs.primary != obs.peer_address:
        return Decision(Action.FOLLOW, f"following the leader {obs.leader}", obs.leader_epoch)
    return Decision(Action.STAY, f"following the leader {obs.leader}")
