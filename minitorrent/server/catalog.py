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
any moment leaves either nothing or a complete file behind. Many files go in
batches (``add_files``): copies, one round of fsyncs, renames, one folder
fsync, one transaction.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from database import FileRecord, ServerStore
from error_handler import CatalogError
from integrity import Manifest, build_manifest, chunk_count
from minitorrent.common.fs import ChunkLocation, fsync_dir, fsync_files
from minitorrent.server.folder_scan import scan_folder
from minitorrent.net.serving import ListingPage
from minitorrent.wire.protocol import (
    LIST_LAYOUT_PACKED,
    ErrorCode,
    ProtocolError,
    RequestFailed,
    check_file_name,
    check_folder_name,
    folder_of,
    pack_list_columns,
)

log = logging.getLogger(__name__)


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
        self._store_prefix = os.path.join(self.store_dir, "")  # + a sha256: a blob's path, with no Path made per file
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.db = ServerStore(self.data_dir / "catalog.db")
        self.origin = self.db.server_id()  # whose download counter this catalog increments
        self._lock = threading.Lock()  # see _commit_imports
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
        [(_, outcome)] = self._add_all([(path, name)], on_progress)
        if isinstance(outcome, CatalogError):
            raise outcome
        return outcome

    def add_files(self, paths: Iterable[str | os.PathLike], on_progress: Callable[[int], None] | None = None
                  ) -> Iterator[tuple[str | os.PathLike, AddResult | CatalogError]]:
        """Import each file as ``add_file`` does, in batches; yield ``(path, outcome)`` for each, in order.

        An outcome is an ``AddResult``, or the ``CatalogError`` that refused
        that path (the others go on). It is yielded once its batch is durable
        (copied, fsynced, renamed into the store and committed in one
        transaction), so a caller may report it as done: it survives a SIGKILL.
        Batches are what make adding 100,000 small files take seconds rather
        than an fsync and a commit each.
        """
        return self._add_all(((path, None) for path in paths), on_progress)

    def _add_all(self, files: Iterable[tuple[str | os.PathLike, str | None]],
                 on_progress: Callable[[int], None] | None) -> Iterator[tuple[str | os.PathLike, AddResult | CatalogError]]:
        """``add_files`` for (path, catalog name) pairs; a name of None means the file's base name."""
        batch: list[_Import] = []
        batch_bytes = 0
        for path, name in files:
            item = self._import(path, on_progress, name)
            batch.append(item)
            batch_bytes += item.manifest.size if item.manifest else 0
            if len(batch) >= ADD_BATCH_FILES or batch_bytes >= ADD_BATCH_BYTES:
                yield from self._commit_imports(batch)
                batch, batch_bytes = [], 0
        yield from self._commit_imports(batch)

    def add_stored(self, name: str, manifest: Manifest) -> AddResult:
        """Catalog ``name`` for content whose verified blob is already in the store (fetched into it).

        Follows the same naming rule as ``add_file``.
        """
        item = _Import(name, _catalog_name(name), manifest)
        with self._lock:
            self._catalog_all([item])
        if item.error:
            raise item.error
        return item.outcome

    def put_replica(self, name: str, manifest: Manifest, added_at: float) -> None:
        """Make ``name`` mean ``manifest`` exactly as the main says; its blob must be stored.

        Unlike ``add_file`` this replaces a different content under ``name``:
        the main is the authority for a replica's names, but not for what
        names are safe: ``CatalogError`` for a name ``check_file_name`` refuses.
        """
        _catalog_name(name)
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
        try:
            return os.stat(self._blob(sha256)).st_size == size  # one stat: --add calls this per file
        except FileNotFoundError:
            return False

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
        for _, outcome in self._add_all(scan.files, on_progress):
            if isinstance(outcome, CatalogError):
                warnings.append(str(outcome))
            else:
                results.append(outcome)
        for warning in warnings:
            log.warning("%s", warning)
        return results, warnings

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
        _catalog_name(new, check_folder_name)  # a file or a folder: each file's new name is checked below
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

    def _import(self, path: str | os.PathLike, on_progress: Callable[[int], None] | None,
                name: str | None = None) -> _Import:
        """Check ``path`` and copy it into a temp file of the store (not fsynced yet)."""
        source = Path(path)
        try:
            name = _catalog_name(source.name if name is None else name)
            _check_regular_file(source)
            manifest, temp = self._copy_to_temp(source, on_progress)
        except CatalogError as error:
            return _Import(path, error=error)
        return _Import(path, name, manifest, temp)

    def _copy_to_temp(self, source: Path, on_progress: Callable[[int], None] | None) -> tuple[Manifest, Path]:
        """Copy ``source`` to a temp file in the store while hashing it; (manifest, temp path)."""
        temp = self.store_dir / f".incoming-{uuid.uuid4().hex}"
        try:
            with open(source, "rb") as reader, open(temp, "wb") as writer:
                manifest = build_manifest(reader, self.chunk_size, copy_to=writer, on_progress=on_progress)
        except OSError as error:
            temp.unlink(missing_ok=True)
            raise CatalogError(f"{source}: cannot import: {error.strerror or error}") from error
        return manifest, temp

    def _commit_imports(self, batch: list[_Import]) -> Iterator[tuple[str | os.PathLike, AddResult | CatalogError]]:
        """Make a batch of copies durable, then catalog them in one transaction; yield each outcome."""
        copied = [item for item in batch if not item.error]
        try:
            fsync_files([item.temp for item in copied])
        except OSError as error:
            for item in copied:
                item.fail(CatalogError(f"{item.path}: cannot import: {error.strerror or error}"))
        # Placing the bytes and naming them happen under one lock: two imports
        # racing for one name would otherwise both take it (and one fail), and a
        # removal could delete a blob an import has just decided to share.
        with self._lock:
            self._place_blobs([item for item in copied if not item.error])
            self._catalog_all([item for item in copied if not item.error])
        for item in batch:
            yield item.path, item.error or item.outcome

    def _place_blobs(self, items: list[_Import]) -> None:
        """Rename each temp file to its blob, or drop it if those bytes are stored already,
        then fsync the store folder once. Caller holds _lock."""
        for item in items:
            try:
                if self.has_blob(item.manifest.sha256, item.manifest.size):
                    item.temp.unlink()  # the same bytes are already stored under another name
                else:
                    os.replace(item.temp, self._blob(item.manifest.sha256))
            except OSError as error:
                item.fail(CatalogError(f"{item.path}: cannot import: {error.strerror or error}"))
        if items:
            fsync_dir(self.store_dir)

    def _catalog_all(self, items: list[_Import]) -> None:
        """Name each import by the module's rules; add the new names in one transaction. Caller holds _lock."""
        chosen: dict[str, FileRecord] = {}  # names taken by this batch, so two of its files never share one
        added_at = time.time()
        for item in items:
            try:
                item.outcome = self._choose_name(item.name, item.manifest, chosen, added_at)
            except CatalogError as error:
                item.error = error
        new = [item for item in items if item.outcome and item.outcome.outcome != "unchanged"]
        try:
            self.db.add_files([(item.outcome.record.name, item.manifest, added_at) for item in new])
        except CatalogError as error:
            if len(new) == 1:
                new[0].outcome, new[0].error = None, error
                return
            for item in new:  # another process took one of these names meanwhile: one at a time
                item.outcome = None
                self._catalog_all([item])
            return
        for item in new:
            _log_added(item.name, item.outcome)

    def _choose_name(self, name: str, manifest: Manifest, chosen: dict[str, FileRecord],
                     added_at: float) -> AddResult:
        """``name``, or the first free ``numbered_name`` of it, unless one of them holds this content already."""
        self._refuse_file_as_folder(name)
        candidate = name
        for attempt in range(2, 10_000):
            existing = chosen.get(candidate) or self.db.get_file(candidate)
            if existing is None and self.db.names_under(candidate + "/"):
                candidate = numbered_name(name, attempt)  # a folder has that name: the file takes the next
                continue
            if existing is None:
                _catalog_name(candidate)  # "report (2).pdf" is longer than "report.pdf"
                record = FileRecord(candidate, manifest.size, manifest.chunk_size, manifest.sha256,
                                    added_at, 0, manifest.chunk_count, manifest.root)
                chosen[candidate] = record
                return AddResult(record, "added" if candidate == name else "renamed")
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

    def list_page(self, search: str, after: str, limit: int, matches: int, under: str = "", layout: str = "",
                  counts: bool = True) -> ListingPage:
        """Up to ``limit`` entries whose names contain ``search`` and sort after ``after``, encoded by SQLite.

        ``under`` (a folder ending in ``/``, or ""): only the names in it.
        ``counts`` false: a packed page of every name or of a folder leaves the download counts 0.
        Packed if ``layout`` asks for it, else JSON objects; also JSON for a
        page the packed layout cannot carry: a row written behind the
        catalog's checks, whose name holds a "\n" or whose digest is not hex
        (the client then refuses that name or file, and gets the others).
        """
        if layout == LIST_LAYOUT_PACKED:
            try:
                columns, count, last, more = self.db.list_packed(search or None, after, limit, matches, under, counts)
                return ListingPage(pack_list_columns(*columns), count, last, more, LIST_LAYOUT_PACKED)
            except ValueError as error:
                log.warning("listing page after %r sent as JSON: %s", after, error)
        return ListingPage(*self.db.list_json(search or None, after, limit, matches, under))

    def count_matching(self, search: str, under: str = "") -> int:
        """How many names contain ``search`` (any case); every name for "" (only those under ``under``, if given;
        a listing's first page asks)."""
        return self.db.count_listing(search or None, under)

    def count_files(self) -> tuple[int, int]:
        """(number of files, total bytes)."""
        return self.db.file_count(), self.db.total_bytes()

    def manifest(self, name: str) -> tuple[dict, bytes]:
        """(manifest header, chunk digests) of ``name``; ``RequestFailed`` if unknown."""
        try:
            manifest = self.db.get_manifest(name)
        except CatalogError as error:  # a damaged digest list is never handed out
            raise RequestFailed(ErrorCode.STORAGE_ERROR, str(error)) from error
        if manifest is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no file named {name!r}")
        return manifest.to_header(), manifest.chunk_digests

    def locate_chunk(self, name: str, sha256: str, index: int) -> ChunkLocation:
        """Where chunk ``index`` of ``name`` is stored; ``RequestFailed`` if not served."""
        return self._locate(name, sha256, index, self.db.file_layout(name))  # not _record: no count needed

    def locate_files(self, names: list[str], sha256s: list[str]) -> list[ChunkLocation | RequestFailed]:
        """Where each of a ``get_files`` batch is stored (its one chunk), or why it is not served: one query."""
        layouts = self.db.file_layouts(names)
        located: list[ChunkLocation | RequestFailed] = []
        for name, sha256 in zip(names, sha256s):
            try:
                located.append(self._locate(name, sha256, 0, layouts.get(name)))
            except RequestFailed as error:
                located.append(error)
        return located

    def _locate(self, name: str, sha256: str, index: int, layout: tuple[int, int, str] | None) -> ChunkLocation:
        if layout is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no file named {name!r}")
        size, chunk_size, stored_sha256 = layout
        if stored_sha256 != sha256:
            raise RequestFailed(ErrorCode.STALE_VERSION, f"{name} has changed on the server; fetch its manifest again")
        chunks = chunk_count(size, chunk_size)
        if not 0 <= index < chunks:
            raise RequestFailed(ErrorCode.OUT_OF_RANGE, f"{name} has no chunk {index} (it has {chunks})")
        offset = index * chunk_size
        # a plain string, not _blob's Path: a get_batch locates a thousand small files, and Path costs more than the read
        return ChunkLocation(self._store_prefix + sha256, offset, min(chunk_size, size - offset))

    def record_download(self, name: str, sha256: str) -> None:
        """Count a finished download of ``name`` (persisted)."""
        if self._record(name).sha256 == sha256:
            self.db.record_download(name, self.origin)

    def shared_versions(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Those of the (name, sha256) pairs shared as that version, in order: one query for the lot."""
        layouts = self.db.file_layouts([name for name, _ in pairs])
        return [(name, sha256) for name, sha256 in pairs if layouts.get(name, (0, 0, ""))[2] == sha256]

    def record_downloads(self, pairs: list[tuple[str, str]]) -> list[str]:
        """Count finished downloads of many (name, sha256) in one commit (a folder's small files); the names counted."""
        return self.db.record_downloads(pairs, self.origin)

    def download_counts(self) -> dict[str, int]:
        """Downloads per file name, as persisted."""
        return {record.name: record.downloads for record in self.db.list_files(None)}

    def _record(self, name: str) -> FileRecord:
        record = self.db.get_file(name)
        if record is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"no file named {name!r}")
        return record


# An --add of 100,000 small files goes in batches: one round of fsyncs and one commit each.
ADD_BATCH_FILES = 1000
ADD_BATCH_BYTES = 256 * 1024 * 1024  # so a batch of big files is acknowledged without a long wait


@dataclass
class _Import:
    """One file on its way into the catalog, and what became of it."""

    path: str | os.PathLike
    name: str = ""
    manifest: Manifest | None = None
    temp: Path | None = None  # the copy in the store, until it is renamed to its blob
    error: CatalogError | None = None
    outcome: AddResult | None = None

    def fail(self, error: CatalogError) -> None:
        """Refuse this file with ``error``, dropping its copy."""
        self.error = error
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)


def _log_added(name: str, result: AddResult) -> None:
    if result.outcome == "renamed":
        log.warning("%s already shares other content; added the new file as %s", name, result.record.name)
    else:
        log.info("added %s (%d bytes, %d chunks)", name, result.record.size, result.record.chunks)


def numbered_name(name: str, number: int) -> str:
    """``"report.pdf", 2`` -> ``"report (2).pdf"``; the suffix stays at the end (of the last component)."""
    folder = folder_of(name)
    stem, dot, suffix = name[len(folder):].rpartition(".")
    if not stem:  # no dot, or a dot-file such as ".bashrc"
        return f"{name} ({number})"
    return f"{folder}{stem} ({number}){dot}{suffix}"


def _check_regular_file(source: Path) -> None:
    """Raise ``CatalogError`` unless ``source`` is a regular file (one stat: --add calls this per file)."""
    try:
        mode = os.stat(source).st_mode
    except FileNotFoundError:
        raise CatalogError(f"{source}: no such file") from None
    except OSError as error:
        raise CatalogError(f"{source}: cannot import: {error.strerror or error}") from error
    if not stat.S_ISREG(mode):
        raise CatalogError(f"{source}: not a regular file")


def _catalog_name(name: str, check: Callable[[object], str] = check_file_name) -> str:
    try:
        return check(name)
    except ProtocolError as error:
        raise CatalogError(str(error)) from error


def _entry(record: FileRecord) -> dict:
    return {
        "name": record.name,
        "size": record.size,
        "chunks": record.chunks,
        "sha256": record.sha256,
        "root": record.root,
        "downloads": record.downloads,
        "added_at": record.added_at,
    }
