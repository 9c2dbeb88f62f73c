"""Replication between the main server and the backup (see docs/failover.md).

The main dials the backup's port and opens two authenticated peer links:

* the **heartbeat** link (``Heartbeater``): every ``heartbeat_interval`` a
  ``heartbeat`` carrying the main's epoch and catalog version; the backup's
  answer carries its own role and epoch, which is how a main that was away
  learns that the backup has taken over;
* the **replication** link (``Replicator``): anti-entropy, then real time. It
  asks the backup for its inventory (what it holds), then sends what differs:
  files the backup lacks (only the chunks it has not verified yet, so a cut
  transfer resumes where it stopped), names the main no longer shares, and
  download counters. It then waits for the next change and sends that.
  Every item is acknowledged, so the main knows how far behind the backup is.

The backup's side is ``ReplicaReceiver``: it verifies every replicated chunk
against the manifest before writing it, and keeps a file being received in a
part file with the same lifecycle as a client's download
(``minitorrent.common.partfile``): recorded chunks are hashed again when a
transfer resumes, and a file joins its catalog only once its whole-file
SHA-256 matches.

The way back, when the main returns and finds the backup active, is in
``failback.py``.
"""
from __future__ import annotations

import json
import logging
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from database import FileRecord, PartialState, PartialStore
from error_handler import (
    AuthenticationFailed,
    ConnectionFailed,
    IntegrityError,
    RemoteError,
    backoff_delays,
)
from integrity import Manifest
from minitorrent.common.partfile import (
    FinalNameTaken,
    PartFile,
    PartFileClosed,
    discard_recorded,
    finish_interrupted_installs,
)
from minitorrent.net.remote import ServerSession
from minitorrent.net.serving import PeerConnection
from minitorrent.server.catalog import Catalog
from minitorrent.server.roles import NodeState
from minitorrent.wire import protocol
from minitorrent.wire.protocol import ErrorCode, Frame, RequestFailed
from minitorrent.wire.tls import Secure
from minitorrent.wire.transport import ConnectionClosed

log = logging.getLogger(__name__)

PEER_ERRORS = (ConnectionFailed, RemoteError, protocol.ProtocolError, AuthenticationFailed)
CHANGE_POLL_S = 0.5  # how often the replicator looks for changes made by another process
MAX_RETRY_DELAY_S = 2.0


def encode_document(document: object) -> bytes:
    """A JSON payload (inventories and counters can be larger than a header)."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def decode_document(payload: bytes | memoryview) -> dict:
    """Parse a JSON payload; ``RemoteProtocolError`` if it is not a JSON object."""
    try:
        document = json.loads(bytes(payload).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise protocol.RemoteProtocolError(f"bad JSON payload: {error}", ErrorCode.BAD_REQUEST, True)
    if not isinstance(document, dict):
        raise protocol.RemoteProtocolError("JSON payload must be an object", ErrorCode.BAD_REQUEST, True)
    return document


class PeerLink:
    """An authenticated session from the main to the backup, reopened on demand."""

    def __init__(self, address: tuple[str, int], secret: str, io_timeout_s: float, node: NodeState,
                 secure: Secure | None = None, secret_hint: str = "") -> None:
        self.address = address
        self.secret = secret
        self.secure = secure  # TLS; the backup is recognised by its proof of the secret over it
        self.secret_hint = secret_hint  # what to do when the proofs fail (which file to copy, which key to set)
        self.io_timeout_s = io_timeout_s
        self.node = node
        self.session: ServerSession | None = None

    def get(self) -> ServerSession:
        """The open session, opening one if needed (raises ``PEER_ERRORS``)."""
        if self.session is None:
            host, port = self.address
            try:
                self.session = ServerSession.open(host, port, io_timeout_s=self.io_timeout_s, secure=self.secure,
                                                  epoch=self.node.highest_seen_epoch, secret=self.secret)
            except AuthenticationFailed as error:
                raise AuthenticationFailed(f"{error}: {self.secret_hint}" if self.secret_hint else str(error)) from error
        return self.session

    def drop(self) -> None:
        """Close the session after a failure."""
        if self.session is not None:
            self.session.close()
            self.session = None


# Main side: heartbeats ---------------------------------------------------------------------------


class Heartbeater:
    """Sends the main's heartbeat every ``interval_s`` and hands each answer (or None) to ``on_ack``."""

    def __init__(self, link: PeerLink, interval_s: float, catalog_version: Callable[[], int], address: str,
                 on_ack: Callable[[protocol.HeartbeatAck | None], None], stop: threading.Event) -> None:
        self.link = link
        self.interval_s = interval_s
        self.catalog_version = catalog_version
        self.address = address
        self.on_ack = on_ack
        self.stop = stop
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._failing_with: type[BaseException] | None = None  # the kind of failure last logged

    def start(self) -> None:
        """Start beating in a background thread."""
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.on_ack(self._beat_once())
            except Exception:  # a local fault (disk, database) must not silence the heartbeat for good
                log.exception("heartbeat round failed; trying again next interval")
            self.stop.wait(self.interval_s)
        self.link.drop()

    def _beat_once(self) -> protocol.HeartbeatAck | None:
        node = self.link.node
        try:
            beat = protocol.Heartbeat(node.epoch, self.catalog_version(), self.address)
            ack = self.link.get().call(beat, protocol.HeartbeatAck).message
        except PEER_ERRORS as error:
            self.link.drop()
            # Once per streak of one kind of failure: a backup that was down and
            # now refuses our secret must still be reported.
            if type(error) is not self._failing_with:
                log.warning("no heartbeat contact with the backup at %s:%d: %s", *self.link.address, error)
            self._failing_with = type(error)
            return None
        if self._failing_with is not None:
            log.info("heartbeat contact with the backup restored")
        self._failing_with = None
        return ack


# Main side: replication ----------------------------------------------------------------------------


@dataclass
class _Lag:
    """What the backup has not acknowledged yet."""

    files: int = 0
    bytes: int = 0
    oldest_since: float | None = None


def _names(value: object) -> set[str]:
    """The strings of a JSON list (anything else in it, or a non-list, counts for nothing)."""
    return {name for name in value if isinstance(name, str)} if isinstance(value, list) else set()


class Replicator:
    """Keeps the backup's replica equal to the main's catalog. One background thread."""

    def __init__(self, catalog: Catalog, link: PeerLink, pipeline_depth: int, stop: threading.Event) -> None:
        self.catalog = catalog
        self.link = link
        self.pipeline_depth = pipeline_depth
        self.stop = stop
        self.changed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="replicate", daemon=True)
        self._lock = threading.Lock()
        self._known: dict[str, str] | None = None  # name -> sha256 the backup holds (None: ask it)
        self._known_counters: dict = {}
        self._receiving: set[str] = set()  # names the backup has partial replicas of (its inventory says)
        self._pending_since: dict[str, float] = {}
        self._lag = _Lag()
        self._bytes_in_flight_acked = 0
        self._last_ack: float | None = None
        self._connected = False
        self._in_sync = False  # the last look found nothing to send

    def start(self) -> None:
        """Start replicating in a background thread."""
        self.thread.start()

    def notify_changed(self) -> None:
        """Something changed in the catalog: replicate it now."""
        self.changed.set()

    def backup_holds(self) -> dict[str, str] | None:
        """name -> sha256 of what the backup holds, as last learnt; None while that is unknown (any thread).

        Unknown while the link is down: the replicator asks for a fresh
        inventory on reconnection.
        """
        with self._lock:
            return dict(self._known) if self._known is not None else None

    def status(self) -> dict:
        """How far behind the backup is, for status replies and windows."""
        now = time.time()
        with self._lock:
            lag = self._lag
            return {
                "connected": self._connected,
                "files_pending": lag.files,
                "bytes_pending": max(0, lag.bytes - self._bytes_in_flight_acked),
                "oldest_pending_s": round(now - lag.oldest_since, 3) if lag.oldest_since else 0.0,
                "last_ack_age_s": round(now - self._last_ack, 3) if self._last_ack else None,
                "in_sync": self._connected and self._in_sync,
            }

    def _run(self) -> None:
        delays = backoff_delays(cap_s=MAX_RETRY_DELAY_S)
        seen_version = -1
        while not self.stop.is_set():
            if not self.link.node.is_active():
                self._wait_for_change()
                continue
            try:
                seen_version = self.catalog.db.catalog_version()
                self._in_sync = not self._sync_once()
                if self._in_sync:
                    if self.catalog.db.catalog_version() == seen_version:
                        self._wait_for_change()
                delays = backoff_delays(cap_s=MAX_RETRY_DELAY_S)
            except PEER_ERRORS as error:
                self._disconnected(error)
                self.stop.wait(next(delays))
            except Exception as error:  # a local fault must not end replication for good: retry from scratch
                log.exception("replication round failed")
                self._disconnected(error)
                self.stop.wait(next(delays))
        self.link.drop()

    def _wait_for_change(self) -> None:
        self.changed.wait(CHANGE_POLL_S)
        self.changed.clear()

    def _disconnected(self, error: BaseException) -> None:
        self.link.drop()
        with self._lock:
            if self._connected:
                log.warning("replication link to the backup lost: %s", error)
            self._connected = False
            self._known = None  # ask for a fresh inventory on reconnection (anti-entropy)

    def _sync_once(self) -> bool:
        """Send every difference found now; True if there was any."""
        session = self.link.get()
        if self._known is None:
            self._load_inventory(session)
        records = {record.name: record for record in self.catalog.db.list_files(None)}
        missing = [r for name, r in records.items() if self._known.get(name) != r.sha256]
        # A name the main no longer has goes from the backup, held whole or only partly received.
        extra = sorted({name for name in self._known if name not in records}
                       | {name for name in self._receiving if name not in records})
        self._update_lag(missing)
        for record in missing:
            if self.stop.is_set() or not self.link.node.is_active():
                return True
            self._push_file(session, record)
        for name in extra:
            self._push_removal(session, name)
        counters = self.catalog.db.download_counters()
        pushed_counters = counters != self._known_counters
        if pushed_counters:
            session.call(protocol.MergeCounters(), protocol.Ok, encode_document(counters))
            self._known_counters = counters
            self._acked()
        self._update_lag([])
        return bool(missing or extra or pushed_counters)

    def _load_inventory(self, session: ServerSession) -> None:
        frame = session.call(protocol.GetInventory(), protocol.Inventory)
        document = decode_document(frame.payload)
        known = {entry["name"]: entry["sha256"] for entry in document.get("files", [])}
        receiving = _names(document.get("receiving", []))  # absent from an older backup's inventory
        with self._lock:
            self._known = known
            self._receiving = receiving
            self._known_counters = document.get("counters", {})
            if not self._connected:
                log.info("replication link to the backup up: it holds %d files", len(known))
            self._connected = True

    def _update_lag(self, missing: list[FileRecord]) -> None:
        now = time.time()
        names = {record.name for record in missing}
        with self._lock:
            self._pending_since = {name: self._pending_since.get(name, now) for name in names}
            self._lag = _Lag(len(missing), sum(r.size for r in missing), min(self._pending_since.values(), default=None))
            self._bytes_in_flight_acked = 0

    def _acked(self, nbytes: int = 0) -> None:
        with self._lock:
            self._last_ack = time.time()
            self._bytes_in_flight_acked += nbytes

    def _push_file(self, session: ServerSession, record: FileRecord) -> None:
        manifest = self.catalog.db.get_manifest(record.name)
        if manifest is None or manifest.sha256 != record.sha256:
            return  # changed meanwhile; the next round sends the new state
        offer = protocol.ReplicateFile(record.name, manifest.size, manifest.chunk_size, manifest.sha256,
                                       manifest.chunk_count, record.added_at, manifest.root)
        frame = session.call(offer, protocol.ReplicaState, manifest.chunk_digests)
        if not frame.message.complete:
            held = protocol.bitmap_to_chunks(frame.payload, manifest.chunk_count)
            self._acked(sum(manifest.chunk_span(i)[1] for i in held))
            missing = [i for i in range(manifest.chunk_count) if i not in held]
            self._send_chunks(session, record.name, manifest, missing)
        with self._lock:
            self._known[record.name] = record.sha256
            self._pending_since.pop(record.name, None)
        self._acked()
        log.debug("replicated %s to the backup", record.name)

    def _send_chunks(self, session: ServerSession, name: str, manifest: Manifest, missing: list[int]) -> None:
        """Pipelined: keep ``pipeline_depth`` chunks in flight, each payload sent with sendfile."""
        blob = str(self.catalog.blob_path(manifest.sha256))
        in_flight: deque[int] = deque()
        queue = deque(missing)
        try:
            file = open(blob, "rb")
        except FileNotFoundError:  # removed since it was offered: the next round sends the removal
            raise ConnectionClosed(f"{name} was removed while being replicated") from None
        with file:
            while queue or in_flight:
                if self.stop.is_set():
                    raise ConnectionClosed("stopping")  # the caller drops the link: replies in flight go with it
                while queue and len(in_flight) < self.pipeline_depth:
                    index = queue.popleft()
                    offset, length = manifest.chunk_span(index)
                    session.connection.send_file_payload(protocol.ReplicateChunk(manifest.sha256, index),
                                                         file, offset, length)
                    in_flight.append(index)
                index = in_flight.popleft()
                stored = session.receive(protocol.ChunkStored).message
                if stored.index != index:
                    raise protocol.RemoteProtocolError(f"backup acknowledged chunk {stored.index}, expected {index}")
                self._acked(manifest.chunk_span(index)[1])
        log.info("sent %d chunks of %s to the backup", len(missing), name)

    def _push_removal(self, session: ServerSession, name: str) -> None:
        session.call(protocol.RemoveFile(name), protocol.Ok)
        with self._lock:
            self._known.pop(name, None)
            self._receiving.discard(name)
        self._acked()


# Backup side ---------------------------------------------------------------------------------------------


def open_receiving_store(path: Path, catalog: Catalog) -> PartialStore:
    """A server's record of files being received into its store (``replica.db``, ``failback.db``), tidied.

    Opening it finishes the installs a killed run had done, and discards the
    records earlier versions left for files received elsewhere than at the
    content's blob (see ``_discard_old_layout``).
    """
    store = PartialStore(path)
    try:
        for state in store.in_progress():
            if state.dest_path != str(catalog.blob_path(state.manifest.sha256)):
                _discard_old_layout(store, state)
        finish_interrupted_installs(store)
    except BaseException:
        store.close()
        raise
    return store


def _discard_old_layout(store: PartialStore, state: PartialState) -> None:
    """Forget progress recorded by a version that received into another place; nothing uses it now.

    Up to fb1c0ba the backup received into ``store/.replica-<sha256>`` itself
    (the record's destination), and the failback fetch into
    ``data_dir/failback/NAME.part`` (the record's part file, deleted here if
    it is ours by size; the folder goes with ``remove_old_failback_staging``).
    An old ``.replica-`` file goes only if it is a regular file of the size
    that version gave it: anything else there is not ours.
    """
    discard_recorded(store, Path(state.dest_path))
    old = Path(state.dest_path)
    if old.name.startswith(".replica-") and _regular_file_of_size(old, state.manifest.size):
        old.unlink()
        log.info("removed %s, left by an earlier version's replication", old.name)


def _regular_file_of_size(path: Path, size: int) -> bool:
    try:
        status = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(status.st_mode) and status.st_size == size


@dataclass
class _Incoming:
    """A file being received: its part file, and its name and date as the main's latest offer gives them."""

    part: PartFile
    name: str
    added_at: float


class ReplicaReceiver:
    """The backup's answers to the main's replication requests.

    A file being received lives in the store as the part file
    ``.replica-<sha256>``, with its verified chunks recorded in
    ``replica.db``, so a transfer cut off by a crash on either side resumes
    where it stopped (after the recorded chunks are hashed again).
    """

    def __init__(self, catalog: Catalog, node: NodeState, failback: str) -> None:
        self.catalog = catalog
        self.node = node
        self.failback = failback
        self.handback_approved = threading.Event()
        self.partials = open_receiving_store(catalog.data_dir / "replica.db", catalog)
        self._lock = threading.Lock()
        self._open: dict[str, _Incoming] = {}  # by sha256
        self.on_change: Callable[[], None] = lambda: None

    def handlers(self) -> dict:
        """The peer handlers to give ``RequestServer``."""
        return {
            protocol.GetInventory: self.inventory,
            protocol.ReplicateFile: self.replicate_file,
            protocol.ReplicateChunk: self.replicate_chunk,
            protocol.RemoveFile: self.remove_file,
            protocol.MergeCounters: self.merge_counters,
        }

    def in_progress(self) -> list[dict]:
        """Files being received now: name, size, chunks, chunks_done (any thread)."""
        with self._lock:
            incoming = list(self._open.values())
        return [{"name": each.name, "size": each.part.manifest.size, "chunks": each.part.manifest.chunk_count,
                 "chunks_done": each.part.verified_count} for each in incoming]

    def close(self) -> None:
        """Close the part files being received (they resume on the next start) and the partials database."""
        with self._lock:
            incoming, self._open = list(self._open.values()), {}
        for each in incoming:
            each.part.close()
        self.partials.close()

    def inventory(self, peer: PeerConnection, frame: Frame) -> None:
        db = self.catalog.db
        epochs = db.change_epochs()
        files = [{"name": r.name, "sha256": r.sha256, "size": r.size, "added_at": r.added_at,
                  "epoch": epochs.get(r.name, ("", 0))[1]} for r in db.list_files(None)]
        # Partial replicas too, by name: one the main no longer has is then removed, not kept for good.
        receiving = {each["name"] for each in self.in_progress()} | {s.name for s in self.partials.in_progress()}
        # The tombstones: what this server removed, and when, for a main catching up after a failover.
        removed = [{"name": name, "sha256": sha256, "epoch": epoch} for name, sha256, epoch in db.removals()]
        document = {"files": files, "counters": db.download_counters(), "receiving": sorted(receiving),
                    "removed": removed}
        peer.send(protocol.Inventory(), encode_document(document))

    def _refuse_while_active(self) -> None:
        """An active backup is the authority for its catalog: a main must catch up and take over first.

        Without this fence a main that was frozen (split brain) replicates its
        catalog into the active backup in the moment before its next heartbeat
        reply tells it to step down, overwriting files only the backup holds.
        """
        if self.node.is_active():
            raise RequestFailed(ErrorCode.STANDBY, f"the backup is active with epoch {self.node.epoch}: it takes no "
                                                   "replication until the main has caught up and taken the role back")

    def replicate_file(self, peer: PeerConnection, frame: Frame) -> None:
        self._refuse_while_active()
        offer: protocol.ReplicateFile = frame.message
        try:
            manifest = Manifest.from_header(offer.to_header(), bytes(frame.payload))
        except ValueError as error:
            raise RequestFailed(ErrorCode.BAD_REQUEST, f"bad manifest for {offer.name}: {error}") from error
        self._drop_other_versions(offer.name, manifest.sha256)
        if self.catalog.has_blob(manifest.sha256, manifest.size):
            self.catalog.put_replica(offer.name, manifest, offer.added_at)
            self.on_change()
            peer.send(protocol.ReplicaState(manifest.sha256, True))
            return
        incoming = self._open_partial(offer.name, manifest, offer.added_at)
        # Every chunk recorded but never installed (a restart, or an install that failed): install it now,
        # else the main, told we hold every chunk, would send nothing and the file would never arrive.
        if incoming.part.complete and self._finish(incoming):
            peer.send(protocol.ReplicaState(manifest.sha256, True))
            return
        bitmap = protocol.chunks_to_bitmap(set(incoming.part.verified), manifest.chunk_count)
        peer.send(protocol.ReplicaState(manifest.sha256, False), bitmap)

    def replicate_chunk(self, peer: PeerConnection, frame: Frame) -> None:
        self._refuse_while_active()
        request: protocol.ReplicateChunk = frame.message
        with self._lock:
            incoming = self._open.get(request.sha256)
        if incoming is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no replication of {request.sha256[:12]} in progress")
        part = incoming.part
        if not 0 <= request.index < part.manifest.chunk_count:
            raise RequestFailed(ErrorCode.OUT_OF_RANGE, f"chunk {request.index} is out of range")
        if not part.manifest.verify_chunk(request.index, frame.payload):
            log.warning("replicated chunk %d of %s failed verification; refused", request.index, part.name)
            raise RequestFailed(ErrorCode.INTEGRITY, f"chunk {request.index} of {part.name} failed SHA-256")
        try:
            # Another connection may be finishing (and closing) this very file.
            complete = part.write_verified(request.index, frame.payload) and self._finish(incoming)
        except PartFileClosed:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"replication of {part.name} already ended") from None
        peer.send(protocol.ChunkStored(request.sha256, request.index, complete))

    def remove_file(self, peer: PeerConnection, frame: Frame) -> None:
        self._refuse_while_active()
        self.catalog.remove_file(frame.message.name)
        self._drop_other_versions(frame.message.name, None)
        self.on_change()
        peer.send(protocol.Ok())

    def merge_counters(self, peer: PeerConnection, frame: Frame) -> None:
        self.catalog.db.merge_download_counters(decode_document(frame.payload))
        self.on_change()
        peer.send(protocol.Ok())

    # Part files ------------------------------------------------------------------------------------------

    def _open_partial(self, name: str, manifest: Manifest, added_at: float) -> _Incoming:
        with self._lock:
            incoming = self._open.get(manifest.sha256)
            if incoming is not None:  # the main may have renamed it since: its latest offer says how to catalog it
                incoming.name, incoming.added_at = name, added_at
                return incoming
            part = PartFile.open(self.partials, self.catalog.blob_path(manifest.sha256), name, manifest,
                                 self.catalog.store_dir / f".replica-{manifest.sha256}")
            incoming = self._open[manifest.sha256] = _Incoming(part, name, added_at)
        if part.resumed:
            log.info("resuming replication of %s: %d of %d chunks already verified",
                     name, len(part.resumed), manifest.chunk_count)
        return incoming

    def _drop_other_versions(self, name: str, keep_sha256: str | None) -> None:
        """Discard progress on content ``name`` no longer means (offered with another SHA-256, or removed).

        A version replaced while it was being received would otherwise keep
        its open part file, hasher thread, sparse file and record for good.
        """
        with self._lock:
            stale = [sha for sha, each in self._open.items() if each.name == name and sha != keep_sha256]
            dropped = [self._open.pop(sha) for sha in stale]
            receiving = set(self._open)
        for incoming in dropped:
            log.info("%s changed or went on the main: dropped its partial replica", name)
            incoming.part.discard()
        for state in self.partials.partials_named(name):  # those not open since the last restart
            if state.manifest.sha256 not in receiving and state.manifest.sha256 != keep_sha256:
                discard_recorded(self.partials, Path(state.dest_path))

    def _finish(self, incoming: _Incoming) -> bool:
        """All chunks are in: prove the whole file, install it as the content's blob, catalog it.

        True once catalogued; False if another connection is finishing it.
        Raises ``RequestFailed`` when it cannot be installed now; the part
        file and its record are then kept (unless the whole file proved
        wrong), so the main's next offer installs it.
        """
        part = incoming.part
        with self._lock:
            if self._open.get(part.manifest.sha256) is not incoming:
                return False
            del self._open[part.manifest.sha256]  # claimed: the next offer reopens what install() leaves
        try:
            part.install()
        except IntegrityError as error:
            raise RequestFailed(ErrorCode.INTEGRITY, f"{error}; replica discarded") from error
        except FinalNameTaken as error:  # the blob is content-addressed: the same bytes may be stored already
            if not self.catalog.has_blob(part.manifest.sha256, part.manifest.size):
                self.catalog.remove_damaged_blob(part.manifest.sha256, part.manifest.size)
                raise RequestFailed(ErrorCode.STORAGE_ERROR, f"{incoming.name}: a damaged copy was in the "
                                                             "store; removed, the next offer installs") from error
            part.discard()
        except OSError as error:
            reason = error.strerror or error
            raise RequestFailed(ErrorCode.STORAGE_ERROR,
                                f"{incoming.name}: cannot install: {reason}; kept for the next offer") from error
        self.catalog.put_replica(incoming.name, part.manifest, incoming.added_at)
        self.on_change()
        return True
