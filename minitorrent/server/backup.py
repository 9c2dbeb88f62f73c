"""The backup server's engine: a replica that watches heartbeats, takes over, and hands the role back.

Every role change goes through one decision loop (``haloop``, rules in
``ha``): the heartbeat and hand-over handlers and the operator's requests
only record what happened and wait for the loop's answer when they need one.
"""
from __future__ import annotations

import logging
import threading
import time

from config_loader import Config
from error_handler import ConfigError
from minitorrent.net.serving import PeerConnection
from minitorrent.server.access import receive_paired_list
from minitorrent.server.engine import ServerEngine
from minitorrent.server.ha import Action, Decision, Kind, Observation
from minitorrent.server.haloop import DecisionLoop, Pending
from minitorrent.server.replication import ReplicaReceiver, encode_document
from minitorrent.wire import protocol
from minitorrent.wire.protocol import ErrorCode, Frame, RequestFailed

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0  # how long a request waits for the decision loop (it answers within a tick)


class BackupServer(ServerEngine):
    """The backup's engine: replica catalog, role, decision loop and request server.

    ``start``/``stop`` from one controlling thread; ``promote_now`` and
    ``approve_handback`` from any thread (a window's buttons, a signal).
    """

    def __init__(self, config: Config) -> None:
        if config.cluster.mode == "etcd":
            raise ConfigError("cluster.mode: etcd has no backup server: run main_server.py for every member")
        settings = config.server.backup
        self.heartbeat_timeout_s = settings.heartbeat_timeout
        self.heartbeat_interval_s = settings.heartbeat_interval
        self._handback_asked_at: float | None = None
        self._lock = threading.Lock()
        self._last_heartbeat = time.monotonic()  # counting starts at start-up: the main gets a full timeout
        self._main_address = f"{config.server.main.host}:{config.server.main.port}"
        self._main_epoch = 0  # from the last heartbeat of a current main
        self._main_heard = False
        self._promote_request: Pending | None = None
        self._handback_request: Pending | None = None
        self._operator_term = False  # the active term began with the operator's promotion
        super().__init__(config, "backup", settings)
        self.server.secret = self.secret  # what the main must prove (the cluster key file if server.secret is empty)
        self.receiver = ReplicaReceiver(self.catalog, self.node, settings.failback)
        self.receiver.on_change = lambda: self.metrics.set_downloads(self.catalog.download_counts())
        self.server.peer_handlers.update(self.receiver.handlers())  # the receiver needs our catalog: added now
        self.server.peer_handlers[protocol.GetInventory] = self._on_inventory
        self._inventory_version = -1  # our catalog version when the main last read our inventory
        self.server.peer_handlers.update({protocol.Heartbeat: self._on_heartbeat,
                                          protocol.HandOver: self._on_hand_over,
                                          protocol.PairedClients: receive_paired_list(self.access)})
        self.loop = DecisionLoop("backup", self._observe, self._apply, self.stop_event)
        self.node.listeners.append(self.loop.wake)

    def start(self) -> tuple[str, int]:
        """Listen and start the decision loop; returns the bound (host, port)."""
        address = self._listen()
        with self._lock:
            self._last_heartbeat = time.monotonic()
        self.loop.start()
        return address

    def _stop_workers(self) -> None:
        if self.loop.thread.is_alive():
            self.loop.thread.join()
        self.receiver.close()

    def seconds_since_heartbeat(self) -> float:
        """Time since the last heartbeat from a current main (or since start-up)."""
        with self._lock:
            return time.monotonic() - self._last_heartbeat

    def seconds_since_handback_request(self) -> float | None:
        """Time since the main last asked for the active role back (None: never); any thread."""
        with self._lock:
            return None if self._handback_asked_at is None else time.monotonic() - self._handback_asked_at

    def replication_in_progress(self) -> list[dict]:
        """Files being received from the main now: name, size, chunks, chunks_done (any thread)."""
        return self.receiver.in_progress()

    # Requests (any thread) ---------------------------------------------------------------------------------

    def promote_now(self) -> int:
        """Manual failover: become active at once; returns our epoch (the new one, or the current if active).

        If the main is alive the backup still takes the role, says so in its
        log, and keeps it until the operator approves the hand-back, whatever
        ``failback`` says: the operator asked for this server to serve.
        """
        request = self._ask("_promote_request")
        return request.wait(REQUEST_TIMEOUT_S)

    def approve_handback(self) -> None:
        """Let the main take the active role back (failback manual, or after the operator's promotion)."""
        log.info("the operator approved handing the active role back to the main")
        self.receiver.handback_approved.set()
        self.loop.wake()

    def _ask(self, slot: str) -> Pending:
        request = Pending()
        with self._lock:
            setattr(self, slot, request)
        self.loop.wake()
        return request

    def _take_request(self, slot: str) -> Pending | None:
        with self._lock:
            request = getattr(self, slot)
            setattr(self, slot, None)
        return request

    # Handlers: they record, the loop decides --------------------------------------------------------------

    def _on_heartbeat(self, peer: PeerConnection, frame: Frame) -> None:
        beat: protocol.Heartbeat = frame.message
        self.node.observe_epoch(beat.epoch, "the main's heartbeat", primary=beat.address)  # fencing: at once
        if beat.epoch >= self.node.epoch:  # a current main; a stale one is answered but not trusted
            self._main_is_alive(beat.address, beat.epoch)
        peer.send(protocol.HeartbeatAck(self.node.role.value, self.node.epoch))

    def _on_inventory(self, peer: PeerConnection, frame: Frame) -> None:
        version = self.catalog.db.catalog_version()  # read first: an add during the answer makes it stale
        self.receiver.inventory(peer, frame)
        with self._lock:
            self._inventory_version = version

    def _main_is_alive(self, address: str = "", epoch: int | None = None) -> None:
        with self._lock:
            self._last_heartbeat = time.monotonic()
            self._main_heard = True
            if address:
                self._main_address = address
            if epoch is not None:
                self._main_epoch = epoch
        self.loop.wake()

    def _on_hand_over(self, peer: PeerConnection, frame: Frame) -> None:
        with self._lock:
            self._handback_asked_at = time.monotonic()
        self._main_is_alive()  # first: once we stand down, the loop must not count the main's silence
        refusal = self._ask("_handback_request").wait(REQUEST_TIMEOUT_S)
        if refusal:
            raise RequestFailed(ErrorCode.FAILBACK_MANUAL, refusal)
        counters = self.catalog.db.download_counters()
        peer.send(protocol.HandedOver(self.node.epoch), encode_document(counters))

    # The decision loop --------------------------------------------------------------------------------------

    def _observe(self) -> Observation:
        node = self.node
        with self._lock:
            silent_s = time.monotonic() - self._last_heartbeat
            return Observation(
                Kind.BACKUP, node.role, node.epoch, highest_seen=node.highest_seen_epoch,
                heartbeat_timeout_s=self.heartbeat_timeout_s, peer_epoch=self._main_epoch,
                peer_address=self._main_address if self._main_heard else "", peer_silent_s=silent_s,
                primary=node.primary, failback=self.receiver.failback,
                handback_requested=self._handback_request is not None,
                handback_approved=self.receiver.handback_approved.is_set(),
                operator_promote=self._promote_request is not None, operator_term=self._operator_term,
                changed_since_inventory=self.catalog.db.catalog_version() != self._inventory_version)

    def _apply(self, decision: Decision) -> None:
        action, reason = decision.action, decision.reason
        if action is Action.PROMOTE:
            operator = self._take_request("_promote_request")
            epoch = self.node.promote(reason)
            with self._lock:
                self._operator_term = operator is not None
            if operator:
                self.receiver.handback_approved.clear()  # an approval given before this promotion does not count
                operator.answer(epoch)
        elif action is Action.STEP_DOWN:
            self.node.step_down(reason, self._main_address)
        elif action is Action.FOLLOW:
            self.node.follow(decision.epoch, self._main_address)
        elif action is Action.HAND_BACK:
            self._hand_back(reason)
        else:
            self._answer_while_staying(reason)

    def _hand_back(self, reason: str) -> None:
        request = self._take_request("_handback_request")
        if self.node.is_active():
            self.node.step_down(reason, self._main_address)
            self.receiver.handback_approved.clear()
            with self._lock:
                self._operator_term = False
        if request:
            request.answer("")

    def _answer_while_staying(self, reason: str) -> None:
        """STAY: a pending hand-back is refused with the reason; an operator's promotion gets our epoch."""
        handback = self._take_request("_handback_request")
        if handback:
            handback.answer(reason)
        promote = self._take_request("_promote_request")
        if promote:
            promote.answer(self.node.epoch)

    # Status ---------------------------------------------------------------------------------------------------

    def main_link(self) -> dict:
        """What this backup knows of the main, as status replies show it (any thread)."""
        return self._status_extra()["main"]

    def _status_extra(self) -> dict:
        with self._lock:
            operator_term = self._operator_term and self.node.is_active()
        # ``failback`` is the rule that holds now: an operator's promotion waits for the operator.
        return {"main": {"address": self._main_address,
                         "seconds_since_heartbeat": round(self.seconds_since_heartbeat(), 3),
                         "heartbeat_timeout_s": self.heartbeat_timeout_s,
                         "failback": "manual" if operator_term else self.receiver.failback,
                         "failback_configured": self.receiver.failback},
                "decision": self.loop.last()}
