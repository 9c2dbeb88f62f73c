"""The main server's catalog: files imported into its store, served by name.

Imported bytes live in a content-addressed store, ``<data_dir>/store/<sha256>``,
so a user's file name (spaces, accents, ``|``, ``:``, emoji) never becomes a
path on the server's disk, and one content added under two names is stored
once. The names live in the SQLite catalog (``database.ServerStore``).

Adding follows one rule that loses nothing:

* the same name with the same content is a no-op;
* the same content under a new name adds the name, sharing the bytes;
* a *different* content under a name already taken is added as
  ``"stem (2).ext"`` (then ``(3)``, ...), and the log says so. The file
  already shared keeps its name, so clients that are downloading it are not
  disturbed.

An import copies the file into the store while hashing it (one read), fsyncs
it, and renames it into place before the catalog row is written: a crash at
any moment leaves either nothing or a complete file behind.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from database import FileRecord, ServerStore
from error_handler import CatalogError
from integrity import Manifest, build_manifest
from minitorrent.common.fs import ChunkLocation, fsync_dir, sync_filesystem
from minitorrent.server.folder_scan import scan_folder
from minitorrent.wire.protocol import (
    ErrorCode,
    ProtocolError,
    RequestFailed,
    check_file_name,
    folder_of,
)

log = logging.getLogger(__name__)

IMPORT_BATCH = 1000  # files of a folder imported per flush: bounds the temp copies a failure leaves to clean


@dataclass(frozen=True)
class AddResult:
    """What ``Catalog.add_file`` did: ``outcome`` is added, unchanged or renamed."""

    record: FileRecord
    outcome: str


class Catalog:
    """The files a server shares. Thread-safe: a ``FileSource`` for ``RequestServer``."""

    def __init__(self, data_dir: Path, chunk_size: int) -> None:
        self.data_dir = Path(data_dir)
        self.chunk_size = chunk_size
        self.store_dir = self.data_dir / "store"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.db = ServerStore(self.data_dir / "catalog.db")
        self.origin = self.db.server_id()  # whose download counter this catalog increments
        self._lock = threading.Lock()  # see add_file
        self._remove_leftover_temp_files()

    def close(self) -> None:
        """Close the catalog database."""
        self.db.close()

    # Adding and removing ----------------------------------------------------------

    def add_file(self, path: str | os.PathLike, on_progress: Callable[[int], None] | None = None,
                 name: str | None = None) -> AddResult:
        """Import the file at ``path`` under ``name`` (default: its base name; see the module rules).

        Raises ``CatalogError`` if it is not a readable regular file or its
        name is unsafe. ``on_progress(nbytes)`` is called as bytes are copied.
        """
        source = Path(path)
        name = _catalog_name(source.name if name is None else name)
        if not source.exists():
            raise CatalogError(f"{source}: no such file")
        if not source.is_file():
            raise CatalogError(f"{source}: not a regular file")
        manifest, temp = self._copy_to_temp(source, on_progress)
        # Placing the bytes and naming them happen under one lock: two imports
        # racing for one name would otherwise both take it (and one fail), and a
        # removal could delete a blob an import has just decided to share.
        with self._lock:
            self._place_blob(source, temp, manifest)
            return self._catalog(name, manifest)

    def add_stored(self, name: str, manifest: Manifest) -> AddResult:
        """Catalog ``name`` for content whose verified blob is already in the store (fetched into it).

        Follows the same naming rule as ``add_file``.
        """
        with self._lock:
            return self._catalog(_catalog_name(name), manifest)

    def put_replica(self, name: str, manifest: Manifest, added_at: float) -> None:
        """Make ``name`` mean ``manifest`` exactly as the main says; its blob must be stored.

        Unlike ``add_file`` this replaces a different content under ``name``:
        the main is the authority for a replica's names.
        """
        with self._lock:
            existing = self.db.get_file(name)
            if existing is not None and existing.sha256 == manifest.sha256:
                return
            if existing is not None:
                self._forget(name, existing.sha256)
            self.db.add_file(name, manifest, added_at=added_at)
        log.info("replicated %s (%d bytes)", name, manifest.size)

    def has_blob(self, sha256: str, size: int) -> bool:
        """True if the bytes of that content are stored complete."""
        blob = self._blob(sha256)
        return blob.exists() and blob.stat().st_size == size

    def remove_damaged_blob(self, sha256: str, size: int) -> bool:
        """Delete the stored bytes of that content if they are not ``size`` bytes long; True if it did.

        A blob of the wrong size can only be damage (blobs are renamed or
        linked into place whole), and it blocks installing a good copy.
        """
        with self._lock:
            blob = self._blob(sha256)
            if not blob.is_file() or self.has_blob(sha256, size):
                return False
            found = blob.stat().st_size
            blob.unlink()
        log.warning("removed the damaged stored copy of %s (%d bytes instead of %d)", sha256[:12], found, size)
        return True

    def blob_path(self, sha256: str) -> Path:
        """Where the bytes of that content live in the store."""
        return self._blob(sha256)

    def remove_file(self, name: str) -> bool:
        """Stop sharing ``name``; its bytes go too unless another name shares them."""
        with self._lock:
            record = self.db.get_file(name)
            if record is None or not self._forget(name, record.sha256):
                return False
        log.info("removed %s", name)
        return True

    def add_folder(self, path: str | os.PathLike,
                   on_progress: Callable[[int], None] | None = None) -> tuple[list[AddResult], list[str]]:
        """Import every file under the folder ``path`` under its relative name (see folders.py).

        Returns the results and one warning per file skipped or refused; a
        bad file never stops the rest of the tree.
        """
        source = Path(path)
        if not source.is_dir():
            raise CatalogError(f"{source}: not a folder")
        scan = scan_folder(source)
        results: list[AddResult] = []
        warnings = list(scan.skipped)
        for start in range(0, len(scan.files), IMPORT_BATCH):
            self._import_batch(scan.files[start:start + IMPORT_BATCH], on_progress, results, warnings)
        for warning in warnings:
            log.warning("%s", warning)
        return results, warnings

    def _import_batch(self, batch: list[tuple[Path, str]], on_progress: Callable[[int], None] | None,
                      results: list[AddResult], warnings: list[str]) -> None:
        """``add_file`` for many files, with one flush of the copies and one of the store folder.

        The order that loses nothing is kept: every copy is durable before any
        is renamed into the store, and every rename before any catalog row.
        """
        copied = []
        for file, name in batch:
            try:
                copied.append((file, name, *self._copy_to_temp(file, on_progress, durable=False)))
            except CatalogError as error:
                warnings.append(str(error))
        if not copied:
            return
        sync_filesystem(self.store_dir)
        with self._lock:
            placed = []
            for file, name, manifest, temp in copied:
                try:
                    self._place_blob(file, temp, manifest, durable=False)
                    placed.append((name, manifest))
                except CatalogError as error:
                    warnings.append(str(error))
            fsync_dir(self.store_dir)
            for name, manifest in placed:
                try:
                    results.append(self._catalog(name, manifest))
                except CatalogError as error:
                    warnings.append(str(error))

    def names_at(self, path: str) -> list[str]:
        """The names ``path`` means: a file's own, or every name in the folder ``path`` (with or without ``/``)."""
        folder = path if path.endswith("/") else path + "/"
        exact = [] if path.endswith("/") else [path] if self.db.get_file(path) is not None else []
        return exact or self.db.names_under(folder)

    def remove_path(self, path: str) -> int:
        """Stop sharing a file or a whole folder; how many files went."""
        return sum(1 for name in self.names_at(path) if self.remove_file(name))

    def rename_path(self, old: str, new: str) -> int:
        """Rename a file, or a folder and everything in it, at once; how many names changed.

        Raises ``CatalogError`` if nothing is at ``old``, a new name is unsafe
        or taken, or a folder would move inside itself. Clients see the new
        names at once; the replicator sends them to the backup.
        """
        old, new = old.rstrip("/"), new.rstrip("/")
        _catalog_name(new)
        if new == old or new.startswith(old + "/"):
            raise CatalogError(f"cannot rename {old} to {new}: the same place or inside itself")
        with self._lock:
            names = self.names_at(old)
            if not names:
                raise CatalogError(f"{old}: no such file or folder in the catalog")
            renames = [(name, new + name[len(old):]) for name in names]
            for _, renamed in renames:
                _catalog_name(renamed)
                if self.db.get_file(renamed) is not None or self.db.names_under(renamed + "/"):
                    raise CatalogError(f"cannot rename {old} to {new}: {renamed} is already shared")
                self._refuse_file_as_folder(renamed)
            self.db.rename_files(renames)
        log.info("renamed %s to %s (%d files)", old, new, len(renames))
        return len(renames)

    def _forget(self, name: str, sha256: str) -> bool:
        """Drop ``name`` and, unless another name shares them, its bytes. Caller holds _lock."""
        if not self.db.remove_file(name):
            return False
        if not self.db.names_with_sha256(sha256):
            self._blob(sha256).unlink(missing_ok=True)
        return True

    def _copy_to_temp(self, source: Path, on_progress: Callable[[int], None] | None,
                      durable: bool = True) -> tuple[Manifest, Path]:
        """Copy ``source`` to a temp file in the store while hashing it; (manifest, temp path).

        ``durable=False`` leaves the flush to the caller (one for a whole batch).
        """
        temp = self.store_dir / f".incoming-{uuid.uuid4().hex}"
        try:
            with open(source, "rb") as reader, open(temp, "wb") as writer:
                manifest = build_manifest(reader, self.chunk_size, copy_to=writer, on_progress=on_progress)
                writer.flush()
                if durable:
                    os.fsync(writer.fileno())
        except OSError as error:
            temp.unlink(missing_ok=True)
            raise CatalogError(f"{source}: cannot import: {error.strerror or error}") from error
        return manifest, temp

    def _place_blob(self, source: Path, temp: Path, manifest: Manifest, durable: bool = True) -> None:
        """Rename ``temp`` to its blob, or drop it if those bytes are stored already. Caller holds _lock.

        ``durable=False`` leaves the store folder's fsync to the caller.
        """
        try:
            blob = self._blob(manifest.sha256)
            if self.has_blob(manifest.sha256, manifest.size):
                temp.unlink()  # the same bytes are already stored under another name
            else:
                os.replace(temp, blob)
                if durable:
                    fsync_dir(self.store_dir)
        except OSError as error:
            temp.unlink(missing_ok=True)
            raise CatalogError(f"{source}: cannot import: {error.strerror or error}") from error

    def _catalog(self, name: str, manifest: Manifest) -> AddResult:
        self._refuse_file_as_folder(name)
        candidate = name
        for attempt in range(2, 10_000):
            existing = self.db.get_file(candidate)
            if existing is None and self.db.names_under(candidate + "/"):
                candidate = numbered_name(name, attempt)  # a folder has that name: the file takes the next
                continue
            if existing is None:
                record = self.db.add_file(candidate, manifest, added_at=time.time())
                outcome = "added" if candidate == name else "renamed"
                if outcome == "renamed":
                    log.warning("%s already shares other content; added the new file as %s", name, candidate)
                else:
                    log.info("added %s (%d bytes, %d chunks)", candidate, record.size, record.chunks)
                return AddResult(record, outcome)
            if existing.sha256 == manifest.sha256:
                return AddResult(existing, "unchanged")
            candidate = numbered_name(name, attempt)
        raise CatalogError(f"{name}: too many different files share this name")

    def _refuse_file_as_folder(self, name: str) -> None:
        """A file already shared as ``photos`` cannot also be the folder of ``photos/x``: no disk holds both."""
        parts = name.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if self.db.get_file(folder) is not None:
                raise CatalogError(f"{name}: {folder} is a shared file, so it cannot also be a folder")

    def _blob(self, sha256: str) -> Path:
        return self.store_dir / sha256

    def _remove_leftover_temp_files(self) -> None:
        # An import killed mid-copy leaves a temp file that no catalog row points to.
        for leftover in self.store_dir.glob(".incoming-*"):
            leftover.unlink(missing_ok=True)

    # FileSource: what RequestServer calls -------------------------------------------------

    def list_files(self, search: str = "", offset: int = 0, limit: int | None = None) -> tuple[list[dict], int]:
        """A page of the entries whose names contain ``search``, as JSON-safe dicts by name, and the match count."""
        records = self.db.list_files(search or None, offset, limit)
        return [_entry(record) for record in records], self.db.count_matching(search or None)

    def count_files(self) -> tuple[int, int]:
        """(number of files, total bytes)."""
        return self.db.file_count(), self.db.total_bytes()

    def manifest(self, name: str) -> tuple[dict, bytes]:
        """(manifest header, chunk digests) of ``name``; ``RequestFailed`` if unknown."""
        manifest = self.db.get_manifest(name)
        if manifest is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no file named {name!r}")
        return manifest.to_header(), manifest.chunk_digests

    def locate_chunk(self, name: str, sha256: str, index: int) -> ChunkLocation:
        """Where chunk ``index`` of ``name`` is stored; ``RequestFailed`` if not served."""
        record = self._record(name)
        if record.sha256 != sha256:
            raise RequestFailed(ErrorCode.STALE_VERSION, f"{name} has changed on the server; fetch its manifest again")
        if not 0 <= index < record.chunks:
            raise RequestFailed(ErrorCode.OUT_OF_RANGE, f"{name} has no chunk {index} (it has {record.chunks})")
        offset = index * record.chunk_size
        return ChunkLocation(str(self._blob(sha256)), offset, min(record.chunk_size, record.size - offset))

    def record_download(self, name: str, sha256: str) -> None:
        """Count a finished download of ``name`` (persisted)."""
        if self._record(name).sha256 == sha256:
            self.db.record_download(name, self.origin)

    def record_downloads(self, pairs: list[tuple[str, str]]) -> None:
        """Count finished downloads of many (name, sha256) in one commit (a folder's small files)."""
        self.db.record_downloads(pairs, self.origin)

    def download_counts(self) -> dict[str, int]:
        """Downloads per file name, as persisted."""
        return {record.name: record.downloads for record in self.db.list_files(None)}

    def _record(self, name: str) -> FileRecord:
        record = self.db.get_file(name)
        if record is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no file named {name!r}")
        return record


def numbered_name(name: str, number: int) -> str:
    """``"report.pdf", 2`` -> ``"report (2).pdf"``; the suffix stays at the end (of the last component)."""
    folder = folder_of(name)
    stem, dot, suffix = name[len(folder):].rpartition(".")
    if not stem:  # no dot, or a dot-file such as ".bashrc"
        return f"{name} ({number})"
    return f"{folder}{stem} ({number}){dot}{suffix}"


def _catalog_name(name: str) -> str:
    try:
        return check_file_name(name)
    except ProtocolError as error:
        raise CatalogError(str(error)) from error


def _entry(record: FileRecord) -> dict:
    return {
        "name": record.name,
        "size": record.size,
        "chunks": record.chunks,
        "sha256": record.sha256,
        "downloads": record.downloads,
        "added_at": record.added_at,
    }
