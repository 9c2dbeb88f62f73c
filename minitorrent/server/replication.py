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
against the manifest before writing it, like any download, and a file joins
its catalog only once its whole-file SHA-256 matches.

When the main comes back and finds the backup active with a higher epoch,
``catch_up_and_take_over`` fetches what the backup gained meanwhile, merges
the download counters, and asks the backup to hand the role back.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from database import ClientStore, DownloadState, FileRecord
from error_handler import (
    AuthenticationFailed,
    ConnectionFailed,
    RemoteError,
    backoff_delays,
)
from integrity import Manifest, sha256_file
from minitorrent.net.remote import ServerClient, ServerSession
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
        extra = [name for name in self._known if name not in records]
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
        with self._lock:
            self._known = known
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
                                       manifest.chunk_count, record.added_at)
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
        self._acked()


# Main side: failback -----------------------------------------------------------------------------------


def catch_up_and_take_over(catalog: Catalog, link: PeerLink, downloads: ServerClient, staging: Path,
                           store: ClientStore, cancel: threading.Event | None = None) -> bool:
    """Fetch what the active backup gained, merge counters, ask for the role back.

    Returns True when the backup handed over (the caller then promotes), False
    if it is waiting for its operator (``failback: manual``). Raises
    ``PEER_ERRORS`` or ``MiniTorrentError`` if the backup cannot be reached or
    a file cannot be fetched; the caller retries later.
    """
    from minitorrent.client.downloader import (
        Downloader,  # the downloader is a client-side module; only failback needs it here
    )

    session = link.get()
    document = decode_document(session.call(protocol.GetInventory(), protocol.Inventory).payload)
    fetcher = Downloader(downloads, store, pipeline_depth=8, report_downloads=False)
    for entry in document.get("files", []):
        _fetch_if_missing(catalog, fetcher, entry, staging, cancel)
    catalog.db.merge_download_counters(document.get("counters", {}))
    try:
        frame = session.call(protocol.HandOver(link.node.highest_seen_epoch), protocol.HandedOver)
    except RemoteError as error:
        if error.code == ErrorCode.FAILBACK_MANUAL:
            log.info("the backup waits for its operator before handing the role back")
            return False
        raise
    catalog.db.merge_download_counters(decode_document(frame.payload))
    link.node.observe_epoch(frame.message.epoch, "backup hand-over")
    shutil.rmtree(staging, ignore_errors=True)
    return True


def _fetch_if_missing(catalog: Catalog, fetcher, entry: dict, staging: Path,
                      cancel: threading.Event | None) -> None:
    name, sha256 = entry["name"], entry["sha256"]
    record = catalog.db.get_file(name)
    if record is not None and record.sha256 == sha256:
        return
    result = fetcher.download(name, staging, cancel)
    added = catalog.add_verified(result.path, result.manifest, name)
    if added.outcome == "renamed":  # the main's own file keeps the name: see docs/failover.md
        log.warning("failback: the backup's %s differs from ours; kept it as %s", name, added.record.name)
    else:
        log.info("failback: fetched %s from the backup", name)


@dataclass
class _Partial:
    """A file being received: its recorded state, its open .replica file, its catalog date."""

    state: DownloadState
    fd: int
    added_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False


# Backup side ---------------------------------------------------------------------------------------------


class ReplicaReceiver:
    """The backup's answers to the main's replication requests.

    Partially received files live in the store as ``.replica-<sha256>`` with
    their verified chunks recorded in ``replica.db``, so a transfer cut off by
    a crash on either side resumes where it stopped.
    """

    def __init__(self, catalog: Catalog, node: NodeState, failback: str, main_address: Callable[[], str]) -> None:
        self.catalog = catalog
        self.node = node
        self.failback = failback
        self.main_address = main_address
        self.handback_approved = threading.Event()
        self.partials = ClientStore(catalog.data_dir / "replica.db")
        self._lock = threading.Lock()
        self._open: dict[str, _Partial] = {}  # by sha256
        self.on_change: Callable[[], None] = lambda: None

    def handlers(self) -> dict:
        """The peer handlers to give ``RequestServer``."""
        return {
            protocol.GetInventory: self.inventory,
            protocol.ReplicateFile: self.replicate_file,
            protocol.ReplicateChunk: self.replicate_chunk,
            protocol.RemoveFile: self.remove_file,
            protocol.MergeCounters: self.merge_counters,
            protocol.HandOver: self.hand_over,
        }

    def close(self) -> None:
        """Close open partial files and the partials database."""
        with self._lock:
            for partial in self._open.values():
                with partial.lock:
                    partial.closed = True
                    os.close(partial.fd)
            self._open.clear()
        self.partials.close()

    def inventory(self, handler, frame: Frame) -> None:
        files = [{"name": r.name, "sha256": r.sha256, "size": r.size, "added_at": r.added_at}
                 for r in self.catalog.db.list_files(None)]
        document = {"files": files, "counters": self.catalog.db.download_counters()}
        handler.connection.send(protocol.Inventory(), encode_document(document))

    def _refuse_while_active(self) -> None:
        """An active backup is the authority for its catalog: a main must catch up and take over first.

        Without this fence a main that was frozen (split brain) replicates its
        catalog into the active backup in the moment before its next heartbeat
        reply tells it to step down, overwriting files only the backup holds.
        """
        if self.node.is_active():
            raise RequestFailed(ErrorCode.STANDBY, f"the backup is active with epoch {self.node.epoch}: it takes no "
                                                   "replication until the main has caught up and taken the role back")

    def replicate_file(self, handler, frame: Frame) -> None:
        self._refuse_while_active()
        offer: protocol.ReplicateFile = frame.message
        try:
            manifest = Manifest.from_header(offer.to_header(), bytes(frame.payload))
        except ValueError as error:
            raise RequestFailed(ErrorCode.BAD_REQUEST, f"bad manifest for {offer.name}: {error}") from error
        if self.catalog.has_blob(manifest.sha256, manifest.size):
            self.catalog.put_replica(offer.name, manifest, offer.added_at)
            self.on_change()
            handler.connection.send(protocol.ReplicaState(manifest.sha256, True))
            return
        state = self._open_partial(offer.name, manifest, offer.added_at).state
        bitmap = protocol.chunks_to_bitmap(state.verified, manifest.chunk_count)
        handler.connection.send(protocol.ReplicaState(manifest.sha256, False), bitmap)

    def replicate_chunk(self, handler, frame: Frame) -> None:
        self._refuse_while_active()
        request: protocol.ReplicateChunk = frame.message
        with self._lock:
            partial = self._open.get(request.sha256)
        if partial is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no replication of {request.sha256[:12]} in progress")
        state, manifest = partial.state, partial.state.manifest
        if not 0 <= request.index < manifest.chunk_count:
            raise RequestFailed(ErrorCode.OUT_OF_RANGE, f"chunk {request.index} is out of range")
        if not manifest.verify_chunk(request.index, frame.payload):
            log.warning("replicated chunk %d of %s failed verification; refused", request.index, state.name)
            raise RequestFailed(ErrorCode.INTEGRITY, f"chunk {request.index} of {state.name} failed SHA-256")
        with partial.lock:  # another connection may be finishing (and closing) this very file
            if partial.closed:
                raise RequestFailed(ErrorCode.NOT_FOUND, f"replication of {state.name} already ended")
            os.pwrite(partial.fd, frame.payload, manifest.chunk_span(request.index)[0])
            self.partials.mark_verified(state.id, [request.index])
            state.verified.add(request.index)
            complete = len(state.verified) == manifest.chunk_count and self._finish(partial)
        handler.connection.send(protocol.ChunkStored(request.sha256, request.index, complete))

    def remove_file(self, handler, frame: Frame) -> None:
        self._refuse_while_active()
        self.catalog.remove_file(frame.message.name)
        self.on_change()
        handler.connection.send(protocol.Ok())

    def merge_counters(self, handler, frame: Frame) -> None:
        self.catalog.db.merge_download_counters(decode_document(frame.payload))
        self.on_change()
        handler.connection.send(protocol.Ok())

    def hand_over(self, handler, frame: Frame) -> None:
        if self.node.is_active():
            if self.failback == "manual" and not self.handback_approved.is_set():
                raise RequestFailed(ErrorCode.FAILBACK_MANUAL, "failback is manual: waiting for the backup's operator")
            self.node.step_down("handing the active role back to the main", self.main_address())
            self.handback_approved.clear()
        counters = self.catalog.db.download_counters()
        handler.connection.send(protocol.HandedOver(self.node.epoch), encode_document(counters))

    # Partial files --------------------------------------------------------------------------------------

    def _part_path(self, sha256: str) -> Path:
        return self.catalog.store_dir / f".replica-{sha256}"

    def _open_partial(self, name: str, manifest: Manifest, added_at: float) -> _Partial:
        path = self._part_path(manifest.sha256)
        with self._lock:
            if manifest.sha256 in self._open:
                return self._open[manifest.sha256]
            state = self.partials.begin_download(str(path), name, manifest)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not state.verified:
                os.ftruncate(fd, 0)
            os.ftruncate(fd, manifest.size)
            partial = self._open[manifest.sha256] = _Partial(state, fd, added_at)
        if state.verified:
            log.info("resuming replication of %s: %d of %d chunks already verified",
                     name, len(state.verified), manifest.chunk_count)
        return partial

    def _finish(self, partial: _Partial) -> bool:
        """All chunks are in: check the whole file, move it into the store, catalog it. Caller holds partial.lock."""
        state, manifest = partial.state, partial.state.manifest
        path = self._part_path(manifest.sha256)
        os.fsync(partial.fd)
        with self._lock:
            self._open.pop(manifest.sha256, None)
        partial.closed = True
        os.close(partial.fd)
        if sha256_file(path) != manifest.sha256:
            self.partials.abandon_download(str(path))
            path.unlink(missing_ok=True)
            raise RequestFailed(ErrorCode.INTEGRITY, f"{state.name}: whole-file SHA-256 mismatch; replica discarded")
        self.catalog.install_blob(path, manifest)
        self.catalog.put_replica(state.name, manifest, partial.added_at)
        self.partials.abandon_download(str(path))
        self.on_change()
        return True

