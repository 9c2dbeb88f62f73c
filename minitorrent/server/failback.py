"""The main's way back after a failover (see docs/failover.md).

When the main returns and finds the backup active, ``catch_up_and_take_over``
asks the backup for its inventory over the authenticated peer link, applies
what the backup removed, fetches every file the main lacks or holds with
other content (unless the main removed it since), merges the download
counters, and asks the backup to hand the role back.

Which side's change wins is decided by epochs, in one pure function,
``plan_catch_up`` (its table of cases is in tests/server/test_failback.py):
every name's last change and every tombstone (a content a name stopped
holding) carries the epoch it was made under, and the later epoch wins. A
tie goes to the main: within one epoch only the main writes, the backup
only copying it.

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
import shutil
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from database import PartialStore
from error_handler import IntegrityError, MiniTorrentError, RemoteError
from integrity import Manifest
from minitorrent.common.partfile import FinalNameTaken, PartFile
from minitorrent.net.remote import ServerSession
from minitorrent.server.catalog import Catalog
from minitorrent.server.replication import PeerLink, decode_document
from minitorrent.wire import protocol
from minitorrent.wire.protocol import ErrorCode, ProtocolError, check_file_name

log = logging.getLogger(__name__)

FETCH_PIPELINE_DEPTH = 8  # chunk requests in flight on the peer link: enough to keep loopback and a LAN busy
OLD_STAGING_FOLDER = "failback"  # data_dir/failback: where versions up to fb1c0ba fetched; nothing uses it now


class FetchStopped(MiniTorrentError):
    """The main is stopping: the fetch ended early (its verified chunks are kept)."""


@dataclass(frozen=True)
class Change:
    """A name holding (or, in a tombstone, having stopped holding) a content, as of an epoch.

    ``epoch`` is None when the other side did not say (a version from before tombstones).
    """

    name: str
    sha256: str
    epoch: int | None


@dataclass(frozen=True)
class CatchUpPlan:
    """What the main does to its catalog before taking the role back (in the order ``_apply`` gives)."""

    remove: tuple[str, ...] = ()
    fetch: tuple[tuple[str, str], ...] = ()  # (name, sha256) as the backup holds them


def plan_catch_up(ours: dict[str, tuple[str, int]], our_removals: list[Change], theirs: list[Change],
                  their_removals: list[Change]) -> CatchUpPlan:
    """What the main applies of the active backup's catalog. Pure.

    ``ours`` is name -> (sha256, epoch of its last change) of the main's
    catalog; the rest is the two sides' tombstones and the backup's files.

    * A name the backup removed (or renamed away) goes from the main too if
      the main holds that very content under it and changed it at a lower
      epoch: the main's own later change (another content, or the same one
      added again at its epoch) is kept.
    * A file the backup holds is fetched if the main lacks it or holds other
      content there, unless the main removed that content from that name at
      the backup's epoch for it or later (a removal the main made while the
      backup merely kept the copy it had).
    """
    remove = []
    for tomb in their_removals:
        held = ours.get(tomb.name)
        if held is not None and held[0] == tomb.sha256 and tomb.epoch is not None and held[1] < tomb.epoch:
            remove.append(tomb.name)
    removed_here = {(tomb.name, tomb.sha256): tomb.epoch for tomb in our_removals}
    fetch = []
    for entry in theirs:
        held = ours.get(entry.name)
        if held is not None and held[0] == entry.sha256:
            continue
        buried_at = removed_here.get((entry.name, entry.sha256))
        if buried_at is not None and entry.epoch is not None and buried_at >= entry.epoch:
            continue
        fetch.append((entry.name, entry.sha256))
    return CatchUpPlan(tuple(remove), tuple(fetch))


def catch_up_and_take_over(catalog: Catalog, link: PeerLink, partials: PartialStore,
                           cancel: threading.Event) -> bool:
    """Take over what the active backup changed (``plan_catch_up``), merge counters, ask for the role back.

    Returns True when the backup handed over (the caller then promotes), False
    if it is waiting for its operator (``failback: manual``). Raises
    ``PEER_ERRORS`` or ``MiniTorrentError`` if the backup cannot be reached or
    a file cannot be fetched; the caller retries later.
    """
    session = link.get()
    document = decode_document(session.call(protocol.GetInventory(), protocol.Inventory).payload)
    db = catalog.db
    plan = plan_catch_up(db.change_epochs(), [Change(*each) for each in db.removals()],
                         _inventory_changes(document, "files"), _inventory_changes(document, "removed"))
    _apply(plan, catalog, session, partials, cancel)
    db.merge_download_counters(document.get("counters", {}))
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


def _apply(plan: CatchUpPlan, catalog: Catalog, session: ServerSession, partials: PartialStore,
           cancel: threading.Event) -> None:
    """Fetch the files whose names no removal stands in the way of, remove, then fetch the rest.

    In that order a rename's bytes are never copied again: the new name is
    catalogued on the blob the old one still holds before the old one goes.
    A name the backup gave other content, or another shape (the file ``a``
    removed and the folder ``a/`` shared, or the other way round), must be
    free before its fetch: else the naming rule would keep ours under it, or
    refuse a file inside a shared file, and the failback would never end.
    """
    in_the_way = _in_the_way(plan.remove)
    for entry in plan.fetch:
        if not in_the_way(entry[0]):
            _fetch_if_missing(catalog, session, partials, entry, cancel)
    for name in plan.remove:
        if catalog.remove_file(name):
            log.info("failback: removed %s, as the backup did while it was active", name)
    for entry in plan.fetch:
        if in_the_way(entry[0]):
            _fetch_if_missing(catalog, session, partials, entry, cancel)


def _in_the_way(removed: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a name can be catalogued only once ``removed`` are gone: it is one of them, the folder of one,
    or a file inside one."""
    files = set(removed)
    folders = {folder for name in removed for folder in _folders_of(name)}
    return lambda name: name in files or name in folders or any(folder in files for folder in _folders_of(name))


def _folders_of(name: str) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b"]``: the folders ``name`` lies in, outermost first."""
    folders, end = [], name.find("/")
    while end != -1:
        folders.append(name[:end])
        end = name.find("/", end + 1)
    return folders


def remove_old_failback_staging(data_dir: Path) -> None:
    """Delete the staging folder versions up to fb1c0ba fetched into (their own files only; nothing reads it now)."""
    staging = Path(data_dir) / OLD_STAGING_FOLDER
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging)
        log.info("removed %s, left by an earlier version's failback", staging)


def _inventory_changes(document: dict, key: str) -> list[Change]:
    """Each well-formed entry of the backup's inventory list ``key`` ("files" or "removed"); a malformed one is
    logged and skipped. An entry without an epoch (a backup from before tombstones) has ``epoch`` None."""
    entries = document.get(key, [])
    if not isinstance(entries, list):
        log.warning("failback: the backup's inventory has no list of %s; taking none", key)
        return []
    changes = []
    for entry in entries:
        try:
            name, sha256, epoch = check_file_name(entry["name"]), entry["sha256"], entry.get("epoch")
            if not isinstance(sha256, str):  # only compared with ours: the manifest fetched by name is checked
                raise TypeError(f"bad sha256 {sha256!r}")
            if epoch is not None and (type(epoch) is not int or not 0 <= epoch <= protocol.MAX_EPOCH):
                raise TypeError(f"bad epoch {epoch!r}")
        except (TypeError, KeyError, AttributeError, ProtocolError) as error:
            log.warning("failback: skipped a malformed inventory entry %.200r: %s", entry, error)
            continue
        changes.append(Change(name, sha256, epoch))
    return changes


def _fetch_if_missing(catalog: Catalog, session: ServerSession, partials: PartialStore, entry: tuple[str, str],
                      cancel: threading.Event) -> None:
    name, sha256 = entry
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
        _receive_missing(session, name, part, cancel)
        part.install()
    except FinalNameTaken:  # the blob is content-addressed: the same bytes were stored meanwhile
        if not catalog.has_blob(manifest.sha256, manifest.size):
            catalog.remove_damaged_blob(manifest.sha256, manifest.size)  # so that the next attempt installs ours
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


def _receive_missing(session: ServerSession, name: str, part: PartFile, cancel: threading.Event) -> None:
    """Request the chunks ``part`` lacks of ``name`` (as the backup calls it now), ``FETCH_PIPELINE_DEPTH``
    in flight, and write each once verified."""
    manifest = part.manifest
    missing = deque(i for i in range(manifest.chunk_count) if not part.has(i))
    in_flight: deque[int] = deque()
    buffer = bytearray(manifest.chunk_size)
    while missing or in_flight:
        if cancel.is_set():
            raise FetchStopped(f"{name}: stopped; verified chunks are kept")  # the caller drops the link
        wanted = [missing.popleft() for _ in range(min(len(missing), FETCH_PIPELINE_DEPTH - len(in_flight)))]
        if wanted:
            session.connection.send_many([protocol.GetChunk(name, manifest.sha256, i) for i in wanted])
            in_flight.extend(wanted)
        index = in_flight.popleft()
        frame = session.receive(protocol.ChunkData, buffer)
        if frame.message.index != index or not manifest.verify_chunk(index, frame.payload):
            raise IntegrityError(f"{name}: chunk {index} from the backup failed SHA-256 verification")
        part.write_verified(index, frame.payload)
