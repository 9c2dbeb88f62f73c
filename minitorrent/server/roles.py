"""Who is active: roles, epochs, and how the two servers prove who they are.

An **epoch** is a number that grows with every change of active server. It is
written to the server's SQLite ``meta`` table *before* it is used, so a
server that crashes and restarts never reuses one. Every heartbeat, welcome
and status carries it. The rule that keeps two servers from accepting writes
at once (DESIGN principle 4):

* a server that learns of an epoch higher than its own from a source it can
  verify (its authenticated peer, or a proof a server issued that a client
  relays in its hello) stops serving as active at once; an epoch it cannot
  verify changes nothing;
* a server becomes active only by taking an epoch higher than every epoch it
  has seen (``promote``).

How the two servers prove who they are lives on the wire floor
(``minitorrent.wire.auth``).
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from database import ServerStore
from error_handler import MiniTorrentError
from minitorrent.wire.protocol import MAX_EPOCH, ErrorCode, RequestFailed

log = logging.getLogger(__name__)


class Role(str, enum.Enum):
    """Whether a server serves clients (ACTIVE) or stands by (STANDBY)."""

    ACTIVE = "active"
    STANDBY = "standby"


@dataclass(frozen=True)
class RoleChanged:
    """Event: a server's role or epoch changed, and why."""

    role: Role
    epoch: int
    reason: str


class NodeState:
    """The role and epoch of one server, the epoch durable. Thread-safe.

    ``listeners`` are called (outside the lock, from whichever thread made
    the change) with a ``RoleChanged`` event.
    """

    def __init__(self, store: ServerStore, server: str, role: Role) -> None:
        self._store = store
        self.server = server
        self._lock = threading.Lock()
        self.server_id = store.server_id()
        self._epoch = _stored_epoch(store)
        self._highest_seen = self._epoch
        self._role = role
        self._primary = ""
        self._lease_deadline: float | None = None  # monotonic; None: no lease (a pair), the role alone decides
        self.listeners: list[Callable[[RoleChanged], None]] = []

    @property
    def role(self) -> Role:
        """The role last taken (whether to serve *now* is ``is_active``: a lease may have run out since)."""
        with self._lock:
            return self._role

    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    @property
    def highest_seen_epoch(self) -> int:
        """The highest epoch this server has heard of, its own included."""
        with self._lock:
            return self._highest_seen

    @property
    def primary(self) -> str:
        """host:port of the server believed active, when this one is not."""
        with self._lock:
            return self._primary

    def is_active(self) -> bool:
        """True while this server may serve clients and accept writes: active, and its lease (if any) certainly alive."""
        with self._lock:
            return self._serving()

    def check_serving(self) -> None:
        """Raise ``RequestFailed(STANDBY)`` naming the primary unless ``is_active``."""
        with self._lock:
            if self._serving():
                return
            if self._role is Role.ACTIVE:
                why = f"this {self.server} server's leader lease may have run out: not serving until it is renewed"
            else:
                where = f"the active server is {self._primary}" if self._primary else "no active server is known"
                why = f"this {self.server} server is on standby; {where}"
        raise RequestFailed(ErrorCode.STANDBY, why)

    def hold_lease_until(self, deadline: float) -> None:
        """Serve as active only until ``deadline`` (``time.monotonic``) unless called again with a later one.

        A leader under a coordinator's lease (etcd mode) calls this after
        every grant and renewal: a process that wakes from a freeze (SIGSTOP,
        a long pause) past its deadline refuses every request at once, before
        its decision loop has even looked, until it renews or steps down.
        ``role`` still says what the loop last decided; ``is_active`` and
        ``check_serving`` say whether to serve now. Any thread.
        """
        with self._lock:
            self._lease_deadline = deadline

    def _serving(self) -> bool:
        """Caller holds _lock."""
        return self._role is Role.ACTIVE and (self._lease_deadline is None or time.monotonic() < self._lease_deadline)

    def promote(self, reason: str) -> int:
        """Become active with an epoch above every one seen; persisted first. Returns it."""
        with self._lock:
            epoch = max(self._epoch, self._highest_seen) + 1
            if epoch > MAX_EPOCH:  # only a verified peer could have taken us here; never past the wire limit
                raise MiniTorrentError(f"cannot promote: epoch {epoch} would be past the wire limit 2**63-1")
            self._store.set_meta("epoch", str(epoch))
            self._epoch = self._highest_seen = epoch
            self._role = Role.ACTIVE
            self._primary = ""
        log.warning("%s server is now ACTIVE with epoch %d: %s", self.server, epoch, reason)
        self._tell(RoleChanged(Role.ACTIVE, epoch, reason))
        return epoch

    def promote_to(self, epoch: int, reason: str) -> None:
        """Become active at ``epoch`` handed out by a coordinator (etcd's revision); persisted first.

        ``ValueError`` if ``epoch`` is not above the epoch we hold: a fencing
        token that goes back would let two leaders write. Epochs merely heard
        of are not checked: the coordinator's revision is above every earlier
        leader's by construction, and an unverified claim must not block it.
        """
        with self._lock:
            if not self._epoch < epoch <= MAX_EPOCH:
                raise ValueError(f"epoch {epoch} is not above the epoch held, {self._epoch}, within 2**63-1")
            self._store.set_meta("epoch", str(epoch))
            self._epoch = epoch
            self._highest_seen = max(self._highest_seen, epoch)
            self._role = Role.ACTIVE
            self._primary = ""
        log.warning("%s server is now ACTIVE with epoch %d: %s", self.server, epoch, reason)
        self._tell(RoleChanged(Role.ACTIVE, epoch, reason))

    def activate(self, reason: str) -> None:
        """Become active keeping the current epoch (no higher one has been seen)."""
        with self._lock:
            if self._highest_seen > self._epoch:
                raise RuntimeError("a higher epoch was seen: promote() instead")
            if self._role is Role.ACTIVE:
                return
            self._role = Role.ACTIVE
            self._primary = ""
            epoch = self._epoch
        log.info("%s server is ACTIVE with epoch %d: %s", self.server, epoch, reason)
        self._tell(RoleChanged(Role.ACTIVE, epoch, reason))

    def step_down(self, reason: str, primary: str = "") -> None:
        """Stop serving as active (if active); ``primary`` names who is."""
        with self._lock:
            was_active = self._role is Role.ACTIVE
            self._role = Role.STANDBY
            if primary:
                self._primary = primary
            epoch = self._epoch
        if was_active:
            log.warning("%s server steps down to STANDBY: %s", self.server, reason)
            self._tell(RoleChanged(Role.STANDBY, epoch, reason))

    def follow(self, epoch: int, primary: str) -> None:
        """On standby: adopt the active server's epoch (persisted) and remember who it is.

        A standby that keeps the primary's epoch lets a primary that comes
        back with less (its data folder lost, say) see at once that it must
        catch up rather than impose its empty catalog.
        """
        with self._lock:
            if self._role is not Role.STANDBY:
                return
            if epoch > self._epoch:
                self._store.set_meta("epoch", str(epoch))
                self._epoch = epoch
            self._highest_seen = max(self._highest_seen, epoch)
            self._primary = primary

    def observe_epoch(self, epoch: int, source: str, primary: str = "") -> bool:
        """Note an epoch heard from ``source``; step down if it beats ours. True if it did."""
        with self._lock:
            self._highest_seen = max(self._highest_seen, epoch)
            newer = epoch > self._epoch
            if newer and primary:
                self._primary = primary
        if newer:
            self.step_down(f"{source} reported epoch {epoch}, higher than ours", primary)
        return newer

    def _tell(self, event: RoleChanged) -> None:
        for listener in list(self.listeners):
            listener(event)


def _stored_epoch(store: ServerStore) -> int:
    """The durable epoch; ``MiniTorrentError`` naming the way out if it is outside what the wire carries."""
    text = store.get_meta("epoch", "0")
    try:
        epoch = int(text)
    except ValueError:
        epoch = -1
    if not 0 <= epoch <= MAX_EPOCH:
        raise MiniTorrentError(
            f"{store.path} holds epoch {text[:40]}, outside 0..2**63-1; to recover, stop both servers and run: "
            f"sqlite3 {store.path} \"UPDATE meta SET value='0' WHERE key='epoch'\" (the peer's epoch is relearned)")
    return epoch
