"""The main's way back after a failover (see docs/failover.md).

When the main returns and finds the backup active, ``catch_up_and_take_over``
asks the backup for its inventory over the authenticated peer link, fetches
every file the main lacks or holds with other content, merges the download
counters, and asks the backup to hand the role back.

A file comes from that one source, the backup, through ``fetch_file``: the
part-file lifecycle every receiver uses (``minitorrent.common.partfile``),
with the part file ``.failback-<sha256>`` in the store and its verified
chunks recorded in ``failback.db``. Every chunk is checked against the
manifest before it is written and the whole file before it becomes the
content's blob, so a fetch cut off (the backup gone, the main stopped)
resumes on the next attempt and never leaves a wrong blob behind.
"""
from __future__ import annotations

import logging
import threading
from collections import deque

from database import PartialStore
from error_handler import IntegrityError, MiniTorrentError, RemoteError
from integrity import Manifest
from minitorrent.common.partfile import FinalNameTaken, PartFile
from minitorrent.net.remote import ServerSession
from minitorrent.server.catalog import Catalog
from minitorrent.server.replication import PeerLink, decode_document
from minitorrent.wire import protocol
from minitorrent.wire.protocol import ErrorCode

log = logging.getLogger(__name__)

FETCH_PIPELINE_DEPTH = 8  # chunk requests in flight on the peer link: enough to keep loopback and a LAN busy


class FetchStopped(MiniTorrentError):
    """The main is stopping: the fetch ended early (its verified chunks are kept)."""


def catch_up_and_take_over(catalog: Catalog, link: PeerLink, partials: PartialStore,
                           cancel: threading.Event) -> bool:
    """Fetch what the active backup gained, merge counters, ask for the role back.

    Returns True when the backup handed over (the caller then promotes), False
    if it is waiting for its operator (``failback: manual``). Raises
    ``PEER_ERRORS`` or ``MiniTorrentError`` if the backup cannot be reached or
    a file cannot be fetched; the caller retries later.
    """
    session = link.get()
    document = decode_document(session.call(protocol.GetInventory(), protocol.Inventory).payload)
    for entry in document.get("files", []):
        _fetch_if_missing(catalog, session, partials, entry, cancel)
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
    return True


def _fetch_if_missing(catalog: Catalog, session: ServerSession, partials: PartialStore, entry: dict,
                      cancel: threading.Event) -> None:
    name, sha256 = entry["name"], entry["sha256"]
    record = catalog.db.get_file(name)
    if record is not None and record.sha256 == sha256:
        return
    manifest = fetch_file(session, name, catalog, partials, cancel)
    added = catalog.add_stored(name, manifest)
    if added.outcome == "renamed":  # the main's own file keeps the name: see docs/failover.md
        log.warning("failback: the backup's %s differs from ours; kept it as %s", name, added.record.name)
    else:
        log.info("failback: fetched %s from the backup", name)


def fetch_file(session: ServerSession, name: str, catalog: Catalog, partials: PartialStore,
               cancel: threading.Event) -> Manifest:
    """Fetch ``name`` from the server at the other end of ``session`` into ``catalog``'s store, verified.

    Returns the file's manifest; its content is then stored as a blob (not
    yet catalogued under any name). Raises ``IntegrityError`` when a chunk
    or the whole file fails verification, ``FetchStopped`` when ``cancel``
    is set, and the session's errors when the link fails; verified chunks
    are kept for the next attempt.
    """
    manifest = _manifest(session, name)
    if catalog.has_blob(manifest.sha256, manifest.size):
        return manifest
    part = PartFile.open(partials, catalog.blob_path(manifest.sha256), name, manifest,
                         catalog.store_dir / f".failback-{manifest.sha256}")
    try:
        _receive_missing(session, part, cancel)
        part.install()
    except FinalNameTaken:  # the blob is content-addressed: the same bytes were stored meanwhile
        if not catalog.has_blob(manifest.sha256, manifest.size):
            raise
        part.discard()
    finally:
        part.close()
    return manifest


def _manifest(session: ServerSession, name: str) -> Manifest:
    frame = session.call(protocol.GetManifest(name), protocol.ManifestInfo)
    try:
        return Manifest.from_header(frame.message.to_header(), bytes(frame.payload))
    except ValueError as error:
        raise protocol.RemoteProtocolError(f"the backup sent a bad manifest for {name}: {error}") from error


def _receive_missing(session: ServerSession, part: PartFile, cancel: threading.Event) -> None:
    """Request the chunks ``part`` lacks, ``FETCH_PIPELINE_DEPTH`` in flight, and write each once verified."""
    manifest = part.manifest
    missing = deque(i for i in range(manifest.chunk_count) if not part.has(i))
    in_flight: deque[int] = deque()
    buffer = bytearray(manifest.chunk_size)
    while missing or in_flight:
        if cancel.is_set():
            raise FetchStopped(f"{part.name}: stopped; verified chunks are kept")  # the caller drops the link
        wanted = [missing.popleft() for _ in range(min(len(missing), FETCH_PIPELINE_DEPTH - len(in_flight)))]
        if wanted:
            session.connection.send_many([protocol.GetChunk(part.name, manifest.sha256, i) for i in wanted])
            in_flight.extend(wanted)
        index = in_flight.popleft()
        frame = session.receive(protocol.ChunkData, buffer)
        if frame.message.index != index or not manifest.verify_chunk(index, frame.payload):
            raise IntegrityError(f"{part.name}: chunk {index} from the backup failed SHA-256 verification")
        part.write_verified(index, frame.payload)
