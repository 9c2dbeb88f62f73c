"""A server of a cluster of any size that elects its leader in etcd (``cluster.mode: etcd``).

Every member runs the same engine. Its ``etcd`` thread talks to etcd and
only records what it saw (who holds the leader key, whether our lease was
renewed, whether etcd answered); its decision loop (``haloop``, rules in
``ha``) turns that into a role:

* the member that wins the leader key is promoted to the key's revision as
  its epoch (persisted first) and replicates every change to every other
  member, one ``Replicator`` per follower, as the main does to its backup;
* a leader whose renewal fails, or whose lease may have run out (a freeze
  longer than the TTL), stops serving at once;
* a follower adopts the leader's epoch and takes its replication; one that
  fell behind catches up by inventory when the leader's link reconnects.

Stale writes are refused: a leader opens each replication link with a
heartbeat carrying its epoch, and a follower refuses replication on a link
whose leader proved an epoch below one it has seen.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass

from config_loader import Config, MemberConfig
from error_handler import ConfigError, ConnectionFailed, MiniTorrentError
from minitorrent.net.serving import PeerConnection, PeerHandler
from minitorrent.server.catalog import AddResult
from minitorrent.server.coordinator import (
    Acknowledgements,
    EtcdGateway,
    EtcdUnavailable,
    Leader,
    LeaderElection,
)
from minitorrent.server.engine import ServerEngine, peer_tls
from minitorrent.server.ha import Action, Decision, Kind, Observation
from minitorrent.server.haloop import DecisionLoop
from minitorrent.server.main import MainServer
from minitorrent.server.replication import PeerLink, ReplicaReceiver, Replicator
from minitorrent.wire import protocol
from minitorrent.wire.tls import Secure
from minitorrent.wire.protocol import ErrorCode, Frame, RequestFailed

log = logging.getLogger(__name__)

QUORUM_POLL_S = 0.2  # how often --add asks the members whether they hold the file yet
ETCD_POLL_MAX_S = 0.2  # every member asks etcd who leads at least this often: a lease's end is seen this fast

# Replication requests that change a follower's catalog: refused from a leader that proved a stale epoch.
WRITES = (protocol.ReplicateFile, protocol.ReplicateChunk, protocol.RemoveFile, protocol.MergeCounters)


@dataclass(frozen=True)
class EtcdView:
    """What the etcd thread saw last: etcd answered, who leads, whether the lease is ours and renewed."""

    ok: bool = False
    leader: Leader | None = None
    ours: bool = False
    error: str = "etcd not asked yet"
    missing: tuple[str, ...] = ()  # names of acknowledged files this member lacks


class FencedPeerLink(PeerLink):
    """A peer link that opens each session with a heartbeat proving our epoch; a follower ahead of us ends it."""

    def __init__(self, address: tuple[str, int], secret: str, io_timeout_s: float, node, my_address: str,
                 secure: Secure | None = None) -> None:
        super().__init__(address, secret, io_timeout_s, node, secure)
        self.my_address = my_address

    def get(self):
        """The open session, opened and fenced if needed (raises ``PEER_ERRORS``)."""
        fresh = self.session is None
        session = super().get()
        if fresh:
            try:
                ack = session.call(protocol.Heartbeat(self.node.epoch, 0, self.my_address), protocol.HeartbeatAck)
            except BaseException:
                self.drop()
                raise
            if self.node.observe_epoch(ack.message.epoch, f"member at {self.address[0]}:{self.address[1]}"):
                self.drop()
                raise ConnectionFailed(f"the member at {self.address[0]}:{self.address[1]} knows epoch "
                                       f"{ack.message.epoch}, above ours: not replicating")
        return session


class ClusterMember(ServerEngine):
    """One member of an etcd cluster: catalog, role, etcd watcher, decision loop, replication both ways.

    ``start``/``stop`` from one controlling thread; ``add_file``/``remove_file`` from any thread.
    """

    def __init__(self, config: Config, name: str = "") -> None:
        cluster = config.cluster
        if not config.server.secret:
            raise ConfigError("server.secret: must be set in etcd mode (members prove it before replicating)")
        name = name or cluster.name
        if not name:
            raise ConfigError("cluster.name: must name this server (one of cluster.servers) in etcd mode")
        self.member: MemberConfig = cluster.member(name)
        self.followers = [m for m in cluster.servers if m.name != name]
        timing = config.server.backup
        self.interval_s = timing.heartbeat_interval
        self.poll_s = min(self.interval_s, ETCD_POLL_MAX_S)
        super().__init__(config, name, self.member, secret=config.server.secret)
        self.address = f"{self.member.host}:{self.member.port}"
        gateway = EtcdGateway(cluster.etcd.endpoints, timeout_s=min(config.transfer.io_timeout, self.interval_s))
        self.election = LeaderElection(gateway, cluster.etcd.prefix, name, self.address, timing.heartbeat_timeout)
        self.acknowledgements = Acknowledgements(gateway, cluster.etcd.prefix)
        self._lock = threading.Lock()
        self._take_replication()
        self._view = EtcdView()
        self._held: tuple[int, frozenset[str]] = (-1, frozenset())  # (catalog version, sha256s held then); etcd thread
        self._campaign = threading.Event()  # the loop wants the etcd thread to bid for the key
        self._term_stop: threading.Event | None = None
        self._replicators: dict[str, Replicator] = {}
        self.loop = DecisionLoop(name, self._observe, self._apply, self.stop_event)
        self.node.listeners.append(self.loop.wake)
        self.node.hold_lease_until(0.0)  # a member serves only under a lease it holds
        self._watcher = threading.Thread(target=self._watch_etcd, name="etcd", daemon=True)

    # Files ------------------------------------------------------------------------------------------------------

    def _changed(self) -> None:
        for replicator in list(self._replicators.values()):
            replicator.notify_changed()

    # Running ------------------------------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Listen, then watch etcd and decide; returns the bound (host, port)."""
        address = self._listen()
        log.info("etcd mode: member %s of %d, etcd at %s", self.name, len(self.followers) + 1,
                 ", ".join(self.config.cluster.etcd.endpoints))
        self._watcher.start()
        self.loop.start()
        return address

    def _stop_workers(self) -> None:
        self._end_term()
        for thread in [self._watcher, self.loop.thread, *[r.thread for r in self._replicators.values()]]:
            if thread.is_alive():
                thread.join(self.config.transfer.io_timeout + 1)
        self.receiver.close()

    # The etcd thread: it records, the loop decides ------------------------------------------------------------------

    def _watch_etcd(self) -> None:
        while not self.stop_event.is_set():
            view = self._look()
            self.node.hold_lease_until(self.election.lease_deadline())  # requests check it before the loop looks
            self._record(view)
            self._campaign.wait(self.poll_s)
        if self.node.is_active():
            self.node.step_down("stopping")  # first stop serving, then free the key
        self.election.resign()  # a clean stop hands the key on at once instead of after the TTL

    def _look(self) -> EtcdView:
        try:
            if self._campaign.is_set():
                self._campaign.clear()
                leader = self.election.campaign()
            else:
                leader = self.election.leader()
            ours = leader is not None and leader.lease == self.election.lease_id
            if ours and self.election.renewal_due(self.interval_s):
                ours = self.election.renew()
            return EtcdView(True, leader, ours, "", self._missing_acknowledged())
        except EtcdUnavailable as error:
            with self._lock:
                known = self._view.leader
            return EtcdView(False, known, False, str(error))

    def _missing_acknowledged(self) -> tuple[str, ...]:
        """Acknowledged files we lack (as leader: forget those we stopped sharing). Raises ``EtcdUnavailable``."""
        acknowledged = self.acknowledgements.all()
        if not acknowledged:
            return ()
        version = self.catalog.db.catalog_version()
        if self._held[0] != version:  # the catalog is read again only when it changed
            self._held = (version, frozenset(record.sha256 for record in self.catalog.db.list_files(None)))
        missing = {sha: name for sha, name in acknowledged.items() if sha not in self._held[1]}
        if self.node.is_active():
            for sha256 in missing:
                self.acknowledgements.forget(sha256, self.node.epoch)
            return ()
        return tuple(sorted(missing.values()))

    def _record(self, view: EtcdView) -> None:
        with self._lock:
            before, self._view = self._view, view
        if before.ok and not view.ok:
            log.warning("etcd is unreachable: %s", view.error)
        elif view.ok and not before.ok:
            log.info("etcd answers")
        self.loop.wake()

    # The decision loop ----------------------------------------------------------------------------------------------

    def _observe(self) -> Observation:
        node = self.node
        with self._lock:
            view = self._view
            verified = max(node.epoch, self._highest_proven)  # etcd's and authenticated peers' epochs only
        leader = view.leader
        holder = "" if leader is None else leader.name
        if leader is not None and leader.name == self.name and not view.ours:
            holder = f"{self.name} (an earlier run, until its lease expires)"
        return Observation(
            Kind.MEMBER, node.role, node.epoch, highest_seen=verified, name=self.name,
            coordinator_ok=view.ok, lease_ok=view.ours and self.election.lease_valid(), leader=holder,
            leader_epoch=leader.epoch if leader else 0, peer_address=leader.address if leader else "",
            primary=node.primary, caught_up=not view.missing)

    def _apply(self, decision: Decision) -> None:
        action, reason = decision.action, decision.reason
        if action is Action.PROMOTE:
            self.node.promote_to(decision.epoch, reason)
            self._begin_term()
        elif action is Action.RESUME:
            self.node.activate(reason)
            self._begin_term()
        elif action is Action.STEP_DOWN:
            self._end_term()
            self.node.step_down(reason, self._leader_address())
        elif action is Action.FOLLOW:
            self.node.observe_epoch(decision.epoch, "etcd's leader key")
            self.node.follow(decision.epoch, self._leader_address())
        elif action is Action.CAMPAIGN:
            self._campaign.set()

    def _leader_address(self) -> str:
        with self._lock:
            leader = self._view.leader
        return leader.address if leader and leader.name != self.name else ""

    def _begin_term(self) -> None:
        """Leading: one replicator per follower, each starting with an inventory (anti-entropy)."""
        self._end_term()
        stop = self._term_stop = threading.Event()
        secret, io_timeout = self.secret, self.config.transfer.io_timeout
        secure = peer_tls(self.config, self.identity)
        for follower in self.followers:
            link = FencedPeerLink((follower.host, follower.port), secret, io_timeout, self.node, self.address, secure)
            replicator = Replicator(self.catalog, link, self.config.transfer.pipeline_depth, stop)
            self._replicators[follower.name] = replicator
            replicator.start()

    def _end_term(self) -> None:
        if self._term_stop is not None:
            self._term_stop.set()
            self._term_stop = None

    # Followers' side: fenced replication -----------------------------------------------------------------------------

    def _take_replication(self) -> None:
        """Answer a leader's replication like the backup does, its writes fenced by the epoch its link proved."""
        self.receiver = ReplicaReceiver(self.catalog, self.node, "auto")
        self.receiver.on_change = lambda: self.metrics.set_downloads(self.catalog.download_counts())
        self._proven: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # peer connection -> epoch its link proved
        self._highest_proven = 0  # the highest epoch any authenticated peer proved
        handlers = self.receiver.handlers()
        self.server.peer_handlers.update(handlers)
        self.server.peer_handlers.update({kind: self._fenced(handlers[kind]) for kind in WRITES})
        self.server.peer_handlers[protocol.Heartbeat] = self._on_peer_heartbeat

    def _on_peer_heartbeat(self, peer: PeerConnection, frame: Frame) -> None:
        beat: protocol.Heartbeat = frame.message
        self.node.observe_epoch(beat.epoch, f"the leader at {beat.address}", primary=beat.address)
        with self._lock:
            self._proven[peer] = beat.epoch
            self._highest_proven = max(self._highest_proven, beat.epoch)
        peer.send(protocol.HeartbeatAck(self.node.role.value, self.node.epoch))

    def _fenced(self, handle: PeerHandler) -> PeerHandler:
        """``handle``, refused on a link whose leader proved an epoch below one we know from etcd or a peer.

        Only verified epochs count (etcd's, through FOLLOW, and those proven
        on authenticated peer links): a client's claim cannot fence a leader.
        """
        def fenced(peer: PeerConnection, frame: Frame) -> None:
            with self._lock:
                proven, fence = self._proven.get(peer, -1), max(self._highest_proven, self.node.epoch)
            if proven < fence:
                raise RequestFailed(ErrorCode.STANDBY, f"replication refused: this link's leader proved epoch "
                                                       f"{proven}, the cluster is at {fence}")
            handle(peer, frame)
        return fenced

    # Status ------------------------------------------------------------------------------------------------------------

    def _status_extra(self) -> dict:
        with self._lock:
            view = self._view
        leader = view.leader
        cluster = {"mode": "etcd", "name": self.name, "etcd": "ok" if view.ok else view.error,
                   "leader": leader.name if leader else "", "leader_address": leader.address if leader else "",
                   "leader_epoch": leader.epoch if leader else 0,
                   "members": [{"name": m.name, "address": f"{m.host}:{m.port}"} for m in self.config.cluster.servers]}
        if self.node.is_active():
            cluster["followers"] = {name: r.status() for name, r in self._replicators.items()}
        return {"cluster": cluster, "decision": self.loop.last()}


def build_server(config: Config) -> ServerEngine:
    """The engine ``main_server.py`` runs: the pair's main, or an etcd member (``cluster.mode``)."""
    if config.cluster.mode == "etcd":
        return ClusterMember(config)
    return MainServer(config)


def leader_name(config: Config) -> str:
    """Who holds the leader key now ("" nobody); ``EtcdUnavailable`` if etcd cannot say."""
    etcd = config.cluster.etcd
    election = LeaderElection(EtcdGateway(etcd.endpoints, config.transfer.io_timeout), etcd.prefix, "", "", 0)
    leader = election.leader()
    return leader.name if leader else ""


def holders(config: Config, sha256: str) -> list[str]:
    """Names of the members whose catalog holds content ``sha256`` (verified), asked over peer links."""
    found = []
    for member in config.cluster.servers:
        files = inventory_of(config, member)
        if files is not None and any(entry.get("sha256") == sha256 for entry in files):
            found.append(member.name)
    return found


def inventory_of(config: Config, member: MemberConfig) -> list[dict] | None:
    """Member ``member``'s catalog as its inventory lists it (name, sha256...); None if it does not answer."""
    link = PeerLink((member.host, member.port), config.server.secret, config.transfer.io_timeout, _NO_NODE,
                    peer_tls(config))
    try:
        frame = link.get().call(protocol.GetInventory(), protocol.Inventory)
        files = json.loads(bytes(frame.payload)).get("files", [])
        return [entry for entry in files if isinstance(entry, dict)] if isinstance(files, list) else None
    except (MiniTorrentError, protocol.ProtocolError, ValueError):
        return None  # a member that does not answer does not hold it, as far as an acknowledgement goes
    finally:
        link.drop()


def acknowledge_by_quorum(config: Config, records: list[AddResult], stop: threading.Event,
                          timeout_s: float) -> list[str]:
    """Wait until a majority of the members holds each added file, then record it in etcd.

    Returns one line per file that did not reach a quorum within
    ``timeout_s`` (empty: all acknowledged). ``EtcdUnavailable`` if etcd
    cannot record an acknowledgement.
    """
    majority = len(config.cluster.servers) // 2 + 1
    etcd = config.cluster.etcd
    acknowledgements = Acknowledgements(EtcdGateway(etcd.endpoints, config.transfer.io_timeout), etcd.prefix)
    deadline = time.monotonic() + timeout_s
    failures = []
    for result in records:
        record = result.record
        while len(held := holders(config, record.sha256)) < majority:
            if time.monotonic() > deadline or stop.wait(QUORUM_POLL_S):
                failures.append(f"{record.name}: held by {len(held)} of {majority} members needed ({', '.join(held)})")
                break
        else:
            acknowledgements.add(record.sha256, record.name)
            log.info("%s is held by a quorum: %s", record.name, ", ".join(held))
    return failures


class _NoNode:
    """What a peer link says of its sender's epochs when the sender is no server (``--add`` asking members)."""

    highest_seen_epoch = 0
    epoch = 0


_NO_NODE = _NoNode()
