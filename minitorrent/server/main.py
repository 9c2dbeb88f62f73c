"""The main server's engine: serves the catalog, replicates to the backup, sends heartbeats.

It imports no tkinter: a window (or a test) holds one and calls its methods.
With ``server.secret`` set it replicates to the backup and sends it
heartbeats; see docs/failover.md for the roles and epochs.
"""
from __future__ import annotations

import logging
import threading
import time

from config_loader import Config
from database import PartialStore
from error_handler import MiniTorrentError
from minitorrent.server.access import AccessSync, Pairing
from minitorrent.server.engine import ServerEngine, peer_tls
from minitorrent.server.failback import (
    catch_up_and_take_over,
    remove_old_failback_staging,
)
from minitorrent.server.ha import Action, Decision, Kind, Observation
from minitorrent.server.haloop import DecisionLoop
from minitorrent.server.replication import (
    PEER_ERRORS,
    Heartbeater,
    PeerLink,
    Replicator,
    open_receiving_store,
)
from minitorrent.server.roles import Role
from minitorrent.wire import protocol

log = logging.getLogger(__name__)


class MainServer(ServerEngine):
    """The main server's engine: catalog, role, replication and the request server.

    ``start``/``stop`` are called from one controlling thread; ``add_file``
    and ``remove_file`` from any thread (imports run in the caller's thread).
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config, "main", config.server.main)
        backup = config.server.backup
        self.backup_address = (backup.host, backup.port)
        self.replicating = backup.port != 0  # the cluster key file stands in for an empty server.secret
        self._peer_secure = peer_tls(config, self.identity)  # TLS to the backup, each side pinned if configured
        self.replicator: Replicator | None = None
        self._lock = threading.Lock()
        self.server.client_handlers.update(Pairing(self.access).handlers())
        self._access_sync: AccessSync | None = None
        self._last_ack: tuple[float, protocol.HeartbeatAck] | None = None
        self._backup_answered = False  # the last heartbeat round got an answer
        self._handed_back = False  # the failback thread got the role handed over: the loop promotes
        self._catch_up_thread: threading.Thread | None = None
        self._started_at = time.monotonic()
        self.loop = DecisionLoop("main", self._observe, self._apply, self.stop_event)
        self.node.listeners.append(self.loop.wake)

    # Files --------------------------------------------------------------------------

    def _changed(self) -> None:  # the catalog changed: the replicator compares versions and sends the news
        if self.replicator:
            self.replicator.notify_changed()

    # Access (server.access: paired) ----------------------------------------------------

    def offer_pairing_code(self) -> str:
        """A new one-time code for one client to pair with (replaces any earlier one); any thread."""
        return self.access.offer_code()

    def paired_clients(self) -> list[tuple[str, float]]:
        """(identity, paired at) of every paired client; any thread."""
        return self.access.paired()

    def revoke_client(self, identity: str) -> bool:
        """Stop accepting ``identity`` (the backup follows); True if it was paired. Any thread."""
        return self.access.revoke(identity)

    # Running --------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Start serving (and replicating); returns the bound (host, port).

        Raises ``MiniTorrentError`` if another main server runs on this data
        folder or the address cannot be bound.
        """
        address = self._listen()
        with self._lock:
            self._started_at = time.monotonic()
        remove_old_failback_staging(self.catalog.data_dir)
        if self.replicating:
            log.info("asking the backup who is active before serving (up to %g s)",
                     self.config.server.backup.heartbeat_timeout)
            self._start_replication(f"{address[0]}:{address[1]}")
        else:
            reason = "no backup configured"
            log.info("replication off: %s", reason)
        self.loop.start()
        return address

    def _stop_workers(self) -> None:
        for thread in self._threads():
            thread.join(self.config.transfer.io_timeout + 1)

    def _threads(self) -> list[threading.Thread]:
        threads = [self._catch_up_thread, self.loop.thread] + (
            [self.replicator.thread, self._heartbeater.thread, self._access_sync.thread] if self.replicator else [])
        return [t for t in threads if t is not None and t.is_alive()]

    def _start_replication(self, my_address: str) -> None:
        heartbeat_link = self._peer_link()
        self.replicator = Replicator(self.catalog, self._peer_link(),
                                     self.config.transfer.pipeline_depth, self.stop_event)
        self._heartbeater = Heartbeater(heartbeat_link, self.config.server.backup.heartbeat_interval,
                                        self.catalog.db.catalog_version, my_address, self._on_heartbeat_ack,
                                        self.stop_event)
        self._access_sync = AccessSync(self.access, self._peer_link(), self.stop_event)
        self.replicator.start()
        self._heartbeater.start()
        self._access_sync.start()

    def _peer_link(self) -> PeerLink:
        """A new link to the backup: TLS, and both sides prove the cluster key over it."""
        return PeerLink(self.backup_address, self.secret, self.config.transfer.io_timeout, self.node,
                        self._peer_secure, self.secret_hint)

    # Observations: the heartbeat and failback threads record, the loop decides -------------------------------

    def _on_heartbeat_ack(self, ack: protocol.HeartbeatAck | None) -> None:
        """Record the backup's answer, or its silence (heartbeat thread)."""
        if ack is not None:
            backup_active = ack.role == Role.ACTIVE.value
            # Fencing, at once: the backup is our authenticated peer, and its epoch may beat ours.
            self.node.observe_epoch(ack.epoch, "the backup", primary=self._backup_name() if backup_active else "")
        with self._lock:
            self._backup_answered = ack is not None
            if ack is not None:
                self._last_ack = (time.monotonic(), ack)
        self.loop.wake()

    def _backup_name(self) -> str:
        return f"{self.backup_address[0]}:{self.backup_address[1]}"

    def _observe(self) -> Observation:
        node = self.node
        with self._lock:
            last_contact = self._last_ack[0] if self._last_ack else self._started_at
            ack = self._last_ack[1] if self._last_ack else None
            return Observation(
                Kind.MAIN, node.role, node.epoch, highest_seen=node.highest_seen_epoch,
                heartbeat_timeout_s=self.config.server.backup.heartbeat_timeout, has_peer=self.replicating,
                peer_reachable=self._backup_answered, peer_role=Role(ack.role) if ack else None,
                peer_epoch=ack.epoch if ack else 0, peer_address=self._backup_name(),
                peer_silent_s=time.monotonic() - last_contact, catching_up=self._catching_up(),
                handed_back=self._handed_back)

    def _apply(self, decision: Decision) -> None:
        action, reason = decision.action, decision.reason
        if action in (Action.PROMOTE, Action.RESUME):
            self._take_role(action, reason)
        elif action is Action.STEP_DOWN:
            backup_active = self._last_ack is not None and self._last_ack[1].role == Role.ACTIVE.value
            self.node.step_down(reason, self._backup_name() if backup_active else "")
        elif action is Action.CATCH_UP:
            log.info("%s", reason)
            self._start_catch_up()

    def _take_role(self, action: Action, reason: str) -> None:
        if action is Action.PROMOTE:
            self.node.promote(reason)
        else:
            try:
                self.node.activate(reason)
            except RuntimeError:  # a higher epoch arrived since the view was taken: decide again
                return
        with self._lock:
            self._handed_back = False
        self.metrics.set_downloads(self.catalog.download_counts())  # counters merged from the backup
        self._changed()

    def _catching_up(self) -> bool:
        return self._catch_up_thread is not None and self._catch_up_thread.is_alive()

    def _start_catch_up(self) -> None:
        if self._catching_up():
            return
        self._catch_up_thread = threading.Thread(target=self._catch_up_loop, name="failback", daemon=True)
        self._catch_up_thread.start()

    def _catch_up_loop(self) -> None:
        """Fetch what the backup gained and ask for the role back; retry until handed over or stopped."""
        config = self.config
        link = self._peer_link()
        partials = open_receiving_store(self.catalog.data_dir / "failback.db", self.catalog)
        try:
            while not self.stop_event.is_set() and self.node.role is Role.STANDBY:
                if self._try_catch_up(link, partials):
                    return
                self.stop_event.wait(config.server.backup.heartbeat_interval)
        finally:
            link.drop()
            partials.close()

    def _try_catch_up(self, link: PeerLink, partials: PartialStore) -> bool:
        """One round: True once the backup handed the role over (recorded for the loop)."""
        try:
            handed_over = catch_up_and_take_over(self.catalog, link, partials, self.stop_event)
        except (*PEER_ERRORS, MiniTorrentError, OSError) as error:  # OSError: our disk; the part file is kept
            link.drop()
            log.warning("failback not done yet: %s", error)
            return False
        if handed_over:
            with self._lock:
                self._handed_back = True
            self.loop.wake()
        return handed_over

    def backup_link(self) -> dict:
        """The backup link as status replies show it: replicating, address, role, epoch, lag (any thread)."""
        return self._status_extra()["backup"]

    def backup_holds(self) -> dict[str, str] | None:
        """name -> sha256 of what the backup holds, as the replicator last learnt; None if it does not know.

        Any thread. None while the replication link is down (the replicator
        asks for a fresh inventory on reconnection) or replication is off.
        """
        return self.replicator.backup_holds() if self.replicator else None

    def _status_extra(self) -> dict:
        if not self.replicating:
            return {"backup": {"replicating": False}, "decision": self.loop.last()}
        backup = {"replicating": True, "address": self._backup_name()}
        with self._lock:
            last_ack = self._last_ack
        if last_ack:
            seen_at, ack = last_ack
            backup.update(role=ack.role, epoch=ack.epoch, last_heartbeat_ack_age_s=round(time.monotonic() - seen_at, 3))
        if self.replicator:
            backup.update(self.replicator.status())
        return {"backup": backup, "decision": self.loop.last()}
