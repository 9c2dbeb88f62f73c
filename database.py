"""Durable state in SQLite: the server's catalog, partial files being received, the client's downloads.

DESIGN principle 5: WAL mode, one connection per thread, schema versioned with
``PRAGMA user_version``. Every write is one short ``BEGIN IMMEDIATE``
transaction, so a process killed at any moment leaves either the old state or
the new one, never half of each.

Every public method may be called from any thread: each thread lazily gets its
own connection. ``close()`` is for shutdown, once worker threads have stopped.
"""
from __future__ import annotations

import bisect
import json
import os
import sqlite3
import sys
import threading
import time
import unicodedata
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from error_handler import CatalogError
from integrity import Manifest, chunk_count, hash_list_root

# How long a writer waits for another connection's write lock before giving
# up with "database is locked". Writes are short; 5 s means something is stuck.
BUSY_TIMEOUT_MS = 5000


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into statements.

    Splitting at every ';' would break a quoted ';' or a trigger body, so
    pieces are joined until SQLite itself calls the statement complete.
    """
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending  # a trailing comment runs as a no-op; anything else fails loudly


class SQLiteStore:
    """One SQLite file, one connection per thread, versioned schema.

    A subclass lists ``MIGRATIONS``: SQL scripts where script ``i`` brings the
    schema from ``user_version`` ``i`` to ``i + 1``. Opening applies the
    missing ones in one transaction, so a failure leaves the file as it was.
    Raises ``CatalogError`` when the file is not a database, its schema is
    newer than this code knows, or a migration fails.
    """

    MIGRATIONS: Sequence[str] = ()

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every connection opened, with the thread it belongs to, so close()
        # can close them all and connections of finished threads get closed.
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._closed = False
        try:
            self._migrate()
        except sqlite3.DatabaseError as error:
            self.close()
            raise CatalogError(f"{self.path}: cannot open database: {error}") from error
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close every connection this store opened; later calls raise
        ``CatalogError``. Call once the threads using the store have stopped."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for _thread, connection in connections:
            connection.close()

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        """The database's ``PRAGMA user_version``."""
        return self._connection().execute("PRAGMA user_version").fetchone()[0]

    # ---------------------------------------------------------- connections

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise CatalogError(f"{self.path}: database is closed")
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._open()
            self._local.connection = connection
        return connection

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; _transaction() says
        # exactly where each begins and ends. check_same_thread=False only so
        # close() and the pruning below may close a connection from another
        # thread; each connection is still used by its own thread alone.
        connection = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        try:
            self._configure(connection)
        except BaseException:
            connection.close()
            raise
        with self._lock:
            if self._closed:
                connection.close()
                raise CatalogError(f"{self.path}: database is closed")
            self._close_orphans()
            self._connections.append((threading.current_thread(), connection))
        return connection

    @staticmethod
    def _configure(connection: sqlite3.Connection) -> None:
        # For migrations that derive a column from the chunk digests (see ServerStore).
        connection.create_function("hash_list_root", 3, hash_list_root, deterministic=True)
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL loses nothing when a process is killed, only
        # (possibly the last commits) on power loss, and saves an fsync per commit.
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute("PRAGMA foreign_keys = ON")

    def _close_orphans(self) -> None:
        """Close connections whose threads have ended (caller holds _lock), so
        a server starting a thread per client does not leak file handles."""
        alive = []
        for thread, connection in self._connections:
            if thread.is_alive():
                alive.append((thread, connection))
            else:
                connection.close()
        self._connections = alive

    @contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """``BEGIN <mode>`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises.

        IMMEDIATE (the default, for writes) takes the write lock up front, so
        two writers never deadlock upgrading read locks. DEFERRED gives reads a
        consistent snapshot across several queries. Do not nest.
        """
        connection = self._connection()
        connection.execute(f"BEGIN {mode}")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        known = len(self.MIGRATIONS)
        with self._transaction() as connection:
            found = connection.execute("PRAGMA user_version").fetchone()[0]
            if found > known:
                raise CatalogError(
                    f"{self.path}: database schema version {found} is newer than "
                    f"this program understands ({known}); upgrade MiniTorrent or "
                    f"use another data_dir"
                )
            for version in range(found, known):
                for statement in _statements(self.MIGRATIONS[version]):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {version + 1}")


# The trigram index answers searches of at least 3 characters; a shorter one
# matches so many names that scanning the (covering) listing index is as fast.
MIN_INDEXED_SEARCH = 3
# A page of a search is read by looking up every match the trigram index
# finds (about 3 us each), or by walking the listing index from the cursor and
# testing each name (about 0.25 us each, limit * files / matches of them). At
# 1,000,000 files and pages of 5,000 the two cost the same near 20,000 matches.
LOOKUP_MAX_MATCHES = 20_000


def _search_condition(search: str | None, matches: int | None = None) -> tuple[str, tuple]:
    """A WHERE condition (and its arguments) for names containing ``search``; ("1", ()) for all.

    Both forms test the same thing, a substring of ``fold(name)``: the
    trigram index (FTS5, ``files_search``) when the search is long enough
    and known to match at most ``LOOKUP_MAX_MATCHES`` names, else ``instr``.
    """
    if not search:
        return "1", ()
    phrase = _indexed_phrase(search)
    if phrase is None or (matches or 0) > LOOKUP_MAX_MATCHES:
        return "instr(name_folded, ?) > 0", (fold(search),)
    return _TRIGRAM_CONDITION, (phrase,)


_TRIGRAM_CONDITION = "rowid IN (SELECT rowid FROM files_search WHERE files_search MATCH ?)"


def _indexed_phrase(search: str) -> str | None:
    """The FTS5 phrase that finds ``search`` in the trigram index; None if the index cannot.

    In an FTS5 phrase every character is literal once double quotes are
    doubled, so ``%``, ``_``, ``*`` and ``"`` stay plain.
    """
    folded = fold(search)
    if len(folded) < MIN_INDEXED_SEARCH or "\x00" in folded:  # FTS5 query text ends at a NUL
        return None
    return '"' + folded.replace('"', '""') + '"'


# How many (catalog version, search) counts ``ServerStore.count_matching`` remembers.
COUNTS_REMEMBERED = 256
# How many searches' matching names (at most LOOKUP_MAX_MATCHES each) ``ServerStore`` remembers for
# their pages: 8 x 20,000 names, a few MiB at most.
MATCHES_REMEMBERED = 8
# Bytes of packed pages of every name or of a folder's (all but their download counts) ``ServerStore`` keeps for
# the current catalog version, so a listing asked again, or by many clients, is read from SQLite once:
# about the first 500,000 entries of a catalog (some 130 bytes each).
PAGES_REMEMBERED_BYTES = 64 * 1024 * 1024
# What a remembered page costs beyond its columns and the texts of its key: the dict slot, the key and page
# tuples, the objects' headers (~200 bytes measured). Counted so that empty pages (a made-up folder, a cursor
# past the last name), which a client can ask for by the thousand, fill the bound as well.
_PAGE_SLOT_BYTES = 256
# Tombstones kept (the newest): each rides in every inventory, which must stay under the protocol's 64 MiB
# document limit (a tombstone is about 150 bytes of JSON); one older than this many newer removals is forgotten.
MAX_TOMBSTONES = 100_000
_CATALOG_VERSION = "SELECT value FROM meta WHERE key = 'catalog_version'"


def _search_in_folder(search: str | None, under: str) -> str | None:
    """``search`` as a listing of the folder ``under`` reads it: None when every name there holds it (a client asks
    for a folder by both, see ``protocol.ListFiles``), so such a listing is one of the whole folder (remembered)."""
    return None if under and search and fold(search) in fold(under) else search


def _folder_condition(under: str, search: str | None) -> tuple[str, tuple]:
    """A WHERE condition for names under the folder ``under`` (ending in ``/``) that contain ``search``.

    A range scan of the name key (``names_under``), never the trigram index:
    a folder's listing reads its own names only, however many match
    ``search`` elsewhere (the index would look up every ``photos/`` in the
    catalog and sort them, five times the cost for a folder of 10,000).
    """
    condition, arguments = "name >= ? AND name < ?", (under, _after_prefix(under))
    if search:
        condition, arguments = f"{condition} AND instr(name_folded, ?) > 0", (*arguments, fold(search))
    return condition, arguments


def _after_prefix(prefix: str) -> str:
    """The least string after every string that starts with ``prefix`` (``photos/`` gives ``photos0``)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _count_sql(search: str | None, under: str = "") -> tuple[str, tuple]:
    """The SQL (and its arguments) that counts the names containing ``search`` (under the folder ``under``)."""
    if under:
        condition, arguments = _folder_condition(under, search)
        return f"SELECT COUNT(*) FROM files WHERE {condition}", arguments
    if not search:  # no WHERE: SQLite counts the smallest index's entries without reading them
        return "SELECT COUNT(*) FROM files", ()
    phrase = _indexed_phrase(search)
    if phrase is not None:
        return "SELECT COUNT(*) FROM files_search WHERE files_search MATCH ?", (phrase,)
    condition, arguments = _search_condition(search)
    return f"SELECT COUNT(*) FROM files WHERE {condition}", arguments


def _bump_catalog_version(connection: sqlite3.Connection) -> None:
    connection.execute(
        "INSERT INTO meta (key, value) VALUES ('catalog_version', '1')"
        " ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
    )


# The epoch the server holds now, read inside the transaction that changes a name: every change is stamped
# with the epoch it was made under, whichever process makes it (``--add`` beside a running server too).
_CURRENT_EPOCH = "COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'epoch'), 0)"


def _bury(connection: sqlite3.Connection, name: str, sha256: str) -> None:
    """Record that ``name`` stopped holding ``sha256`` now, at the current epoch."""
    connection.execute(
        "INSERT INTO removals (name, sha256, epoch, removed_at) VALUES (?, ?, " + _CURRENT_EPOCH + ", ?)"
        " ON CONFLICT (name, sha256) DO UPDATE SET epoch = excluded.epoch, removed_at = excluded.removed_at",
        (name, sha256, time.time()))


def fold(text: str) -> str:
    """Caseless, normalisation-proof form of ``text`` for substring search (the catalog's and the windows').

    Plain ``casefold`` would miss "café" typed with a combining accent (as
    macOS file names are) when the catalog holds the precomposed one.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


# --------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A catalog entry as listed: everything but the chunk digests."""

    name: str
    size: int
    chunk_size: int
    sha256: str
    added_at: float
    downloads: int
    chunks: int
    root: str  # the hash list root of the chunk digests (integrity.hash_list_root)


@dataclass(frozen=True, slots=True)
class TorrentPieces:
    """The hashes a BitTorrent client checks for one content (see minitorrent/web/torrents.py)."""

    piece_length: int
    pieces_root: bytes
    v1_pieces: bytes
    piece_layer: bytes


# A file's downloads are the sum of its per-origin counters (see ServerStore).
_DOWNLOADS_OF = "(SELECT COALESCE(SUM(count), 0) FROM download_counts d WHERE d.name = {}.name)"
_FILE_COLUMNS = "name, size, chunk_size, sha256, added_at, " + _DOWNLOADS_OF.format("files") + ", root"
_DOWNLOADS_OF_PAGE = _DOWNLOADS_OF.format("page")

# The keys of an entry of ``ServerStore.list_json``: a ``FileRecord`` without its chunk size.
LISTING_KEYS = ("name", "size", "chunks", "sha256", "root", "downloads", "added_at")
# One entry of ``list_json``, built by SQLite from a row of the page (keys in ``LISTING_KEYS``' order).
_LISTING_OBJECT = ("json_object('name', name, 'size', size, 'chunks', (size + chunk_size - 1) / chunk_size,"
                   f" 'sha256', sha256, 'root', root, 'downloads', {_DOWNLOADS_OF_PAGE}, 'added_at', added_at)")
# The aggregates of a page, "{rows}" standing where a search read by its trigram index restricts
# them to the page's rows (``ServerStore._trigram_page``). For ``list_json``: one JSON array.
_JSON_AGGREGATES = (f"CAST(json_group_array({_LISTING_OBJECT}) {{rows}} AS BLOB)",)
# For ``list_packed``, one column each: an entry's three numbers as 48 hex digits (size, chunks,
# added_at in microseconds), the hex digests, the names; and the download counts, 16 hex digits each.
_PACKED_AGGREGATES = (
    "group_concat(printf('%016x%016x%016x', size, (size + chunk_size - 1) / chunk_size,"
    " CAST(round(added_at * 1000000) AS INTEGER)), '') {rows}",
    "group_concat(sha256, '') {rows}", "group_concat(root, '') {rows}",
    "CAST(group_concat(name, char(10)) {rows} AS BLOB)")
_PACKED_DOWNLOADS = f"group_concat(printf('%016x', {_DOWNLOADS_OF_PAGE}), '') {{rows}}"


# A JSON array of (name, sha256) pairs as one text each, the digest first (``version_texts``), read back in SQL
# over json_each by cutting ``j.value``: a pair as a JSON array would be parsed twice a row.
VERSION_SHA256 = "substr(j.value, 1, 64)"
VERSION_NAME = "substr(j.value, 65)"


def version_texts(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], str]:
    """(the pairs kept, their JSON array of ``sha256 + name`` texts) for ``VERSION_SHA256`` and ``VERSION_NAME``.

    Kept: a 64-character digest, so that no part of a digest can pass for
    part of a name; and a name holding no NUL, where substr ends its text
    ("a.txt\x00..." would be read as a.txt; a shared name never holds one).
    """
    kept = [(name, sha256) for name, sha256 in pairs if len(sha256) == 64 and "\x00" not in name]
    return kept, json.dumps([sha256 + name for name, sha256 in kept], ensure_ascii=False)


def _file_record(row: tuple) -> FileRecord:
    name, size, chunk_size, sha256, added_at, downloads, root = row
    return FileRecord(
        name, size, chunk_size, sha256, added_at, downloads, chunk_count(size, chunk_size), root
    )


class ServerStore(SQLiteStore):
    """The server's catalog: one row per file name, with its manifest.

    Several names may share one sha256 (the same content under two names).

    Download counts are a grow-only counter per origin server (a G-counter):
    each server only ever increments its own row, replicas exchange rows and
    keep the larger value of each, and a file's count is the sum. Two servers
    that both counted downloads while cut off from each other (split brain)
    therefore merge to the right total, with nothing counted twice.

    ``meta`` holds small durable values: the server's ``epoch``, its
    ``server_id``, and ``catalog_version``, bumped by every add and remove in
    the same transaction, so a replicator can tell cheaply that something
    changed, even when another process changed it.

    Every change of a name is stamped with the epoch held when it was made:
    a file's ``changed_epoch``, and a tombstone in ``removals`` for each
    content a name stopped holding (removed, or renamed away). A failback
    compares them (``minitorrent/server/failback.py``).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._counts: dict[tuple[int, str, str], int] = {}  # see count_matching
        self._matches: dict[tuple[int, str], list[str]] = {}  # see _matching_names
        self._pages: dict[tuple[str, str, int], tuple] = {}  # see _remembered_page: (under, after, limit) -> page
        self._pages_version = -1  # the catalog version of those pages
        self._pages_bytes = 0
        self._remembered_lock = threading.Lock()  # guards the three above

    MIGRATIONS = (
        """
        CREATE TABLE files (
            name          TEXT PRIMARY KEY,
            name_folded   TEXT NOT NULL,   -- fold(name), for search
            size          INTEGER NOT NULL CHECK (size >= 0),
            chunk_size    INTEGER NOT NULL CHECK (chunk_size > 0),
            sha256        TEXT NOT NULL,
            added_at      REAL NOT NULL,
            -- Last, because SQLite must walk a big blob's overflow pages to
            -- reach any column after it; listing never reads the digests.
            chunk_digests BLOB NOT NULL
        );
        CREATE INDEX files_sha256 ON files (sha256);
        CREATE TABLE download_counts (
            name   TEXT NOT NULL,
            origin TEXT NOT NULL,          -- server_id of the server that counted
            count  INTEGER NOT NULL CHECK (count >= 0),
            PRIMARY KEY (name, origin)
        ) WITHOUT ROWID;
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID;
        """,
        # 1 -> 2: what BitTorrent clients check (minitorrent/web/torrents.py), computed once per
        # content by the web face's indexer; a catalog from before simply has none yet: the
        # indexer fills them in. Rows of a content or name no longer shared are pruned by it.
        """
        CREATE TABLE torrent_pieces (
            sha256       TEXT PRIMARY KEY,
            piece_length INTEGER NOT NULL CHECK (piece_length > 0),
            pieces_root  BLOB NOT NULL,    -- BEP 52 merkle root of the file (empty for an empty file)
            v1_pieces    BLOB NOT NULL,    -- SHA-1 of every piece, 20 bytes each
            piece_layer  BLOB NOT NULL     -- BEP 52 root of every piece, 32 bytes each (empty: one piece)
        );
        CREATE TABLE torrent_names (
            name         TEXT PRIMARY KEY,  -- a name of files; its info hashes depend on the name
            sha256       TEXT NOT NULL,
            info_hash_v1 BLOB NOT NULL,     -- SHA-1 of the info dictionary
            info_hash_v2 BLOB NOT NULL      -- first 20 bytes of its SHA-256, as trackers see it
        );
        CREATE INDEX torrent_names_v1 ON torrent_names (info_hash_v1);
        CREATE INDEX torrent_names_v2 ON torrent_names (info_hash_v2);
        """,
        # Version 3: listing and search that stay fast at millions of files.
        # Only new objects, so another migration may add columns to files.
        """
        -- A page of the listing, in name order from a name on (keyset paging),
        -- is read from this index alone: the rows, with their digests, stay untouched.
        CREATE INDEX files_listing ON files (name, name_folded, size, chunk_size, sha256, added_at);
        -- Substring search: trigrams of the folded names (case_sensitive 1:
        -- name_folded is folded already, by fold). Its rows are the files
        -- rows' rowids, kept in step by the triggers. (A VACUUM may renumber
        -- those rowids: after one, run INSERT INTO files_search
        -- (files_search) VALUES ('rebuild').)
        CREATE VIRTUAL TABLE files_search USING fts5(
            name_folded, content='files', content_rowid='rowid', tokenize='trigram case_sensitive 1'
        );
        CREATE TRIGGER files_search_insert AFTER INSERT ON files BEGIN
            INSERT INTO files_search (rowid, name_folded) VALUES (new.rowid, new.name_folded);
        END;
        CREATE TRIGGER files_search_delete AFTER DELETE ON files BEGIN
            INSERT INTO files_search (files_search, rowid, name_folded) VALUES ('delete', old.rowid, old.name_folded);
        END;
        CREATE TRIGGER files_search_update AFTER UPDATE OF name_folded ON files BEGIN
            INSERT INTO files_search (files_search, rowid, name_folded) VALUES ('delete', old.rowid, old.name_folded);
            INSERT INTO files_search (rowid, name_folded) VALUES (new.rowid, new.name_folded);
        END;
        INSERT INTO files_search (files_search) VALUES ('rebuild');
        """,
        # Version 4: the root of every file's chunk digests (integrity.hash_list_root).
        """
        -- The chunk digests' root, computed once when a file is added and read
        -- back with the digests: a damaged digest blob no longer matches it.
        ALTER TABLE files ADD COLUMN root TEXT NOT NULL DEFAULT '';
        UPDATE files SET root = hash_list_root(size, chunk_size, chunk_digests);
        -- The listing index covers the root too, so a page is still read from it alone.
        DROP INDEX files_listing;
        CREATE INDEX files_listing ON files (name, name_folded, size, chunk_size, sha256, root, added_at);
        """,
        # Version 5: what a failback needs to tell which side changed a name last (epochs decide).
        """
        -- The server's epoch when this name last got its content (an add, a replica, a rename to it);
        -- 0 for rows from before, which any later change beats.
        ALTER TABLE files ADD COLUMN changed_epoch INTEGER NOT NULL DEFAULT 0;
        -- A tombstone per content removed from a name (a removal, a rename from it), at the server's epoch
        -- then: a backup active while the main was away hands its removals back with them. Adding that
        -- content under that name again deletes it.
        CREATE TABLE removals (
            name       TEXT NOT NULL,
            sha256     TEXT NOT NULL,
            epoch      INTEGER NOT NULL,
            removed_at REAL NOT NULL,
            PRIMARY KEY (name, sha256)
        ) WITHOUT ROWID;
        -- The listing index covers the epoch too, so a failback's comparison never walks the digests.
        DROP INDEX files_listing;
        CREATE INDEX files_listing ON files (name, name_folded, size, chunk_size, sha256, root, added_at, changed_epoch);
        """,
    )

    def add_file(self, name: str, manifest: Manifest, added_at: float | None = None) -> FileRecord:
        """Add ``name`` with ``manifest``; return its record.

        ``added_at`` defaults to now (unix time). Raises ``CatalogError`` if a
        file of that exact name is already in the catalog.
        """
        self.add_files([(name, manifest, time.time() if added_at is None else added_at)])
        return self.get_file(name)

    def add_files(self, entries: Sequence[tuple[str, Manifest, float]]) -> None:
        """Add every ``(name, manifest, added_at)`` in one transaction: all or none.

        One commit for a batch is what makes adding 100,000 files fast.
        Raises ``CatalogError`` if a name is already in the catalog (or twice
        in ``entries``); then nothing is added.
        """
        rows = [(name, fold(name), manifest.size, manifest.chunk_size, manifest.sha256,
                 manifest.chunk_digests, added_at, manifest.root) for name, manifest, added_at in entries]
        try:
            with self._transaction() as connection:
                connection.executemany(
                    "INSERT INTO files (name, name_folded, size, chunk_size, sha256,"
                    f" chunk_digests, added_at, root, changed_epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, {_CURRENT_EPOCH})",
                    rows,
                )
                connection.executemany("DELETE FROM removals WHERE name = ? AND sha256 = ?",
                                       [(row[0], row[4]) for row in rows])
                _bump_catalog_version(connection)
        except sqlite3.IntegrityError as error:
            what = repr(rows[0][0]) if len(rows) == 1 else f"one of {len(rows)} names"
            raise CatalogError(f"{what} is already in the catalog") from error

    def file_layout(self, name: str) -> tuple[int, int, str] | None:
        """(size, chunk_size, sha256) of ``name``, or None: ``get_file`` without counting its downloads.

        What serving a chunk needs, asked once per file of a folder's batch;
        the download count is a subquery that such a request never uses.
        """
        return self._connection().execute(
            "SELECT size, chunk_size, sha256 FROM files WHERE name = ?", (name,)).fetchone()

    def file_layouts(self, names: list[str]) -> dict[str, tuple[int, int, str]]:
        """name -> (size, chunk_size, sha256) for those of ``names`` in the catalog: ``file_layout`` in one query.

        A folder's ``get_batch`` is looked up at once, not a statement a file.
        The names go in as one JSON array (as ``record_downloads``'s), not a
        bound value each: a batch's 1,024 would pass the 999 an SQLite before
        3.32 binds.
        """
        rows = self._connection().execute(
            "SELECT f.name, f.size, f.chunk_size, f.sha256 FROM json_each(?) AS j JOIN files AS f ON f.name = j.value",
            (json.dumps(names, ensure_ascii=False),))
        return {name: (size, chunk_size, sha256) for name, size, chunk_size, sha256 in rows}

    def get_file(self, name: str) -> FileRecord | None:
        """The record for ``name`` (exact match), or None."""
        row = self._connection().execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else _file_record(row)

    def get_manifest(self, name: str) -> Manifest | None:
        """The manifest of ``name`` (exact match), or None.

        Raises ``CatalogError`` when the stored digests no longer give the
        stored root (the database was damaged): such a manifest is never served.
        """
        row = self._connection().execute(
            "SELECT size, chunk_size, sha256, chunk_digests, root FROM files WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        try:
            return Manifest(*row)
        except ValueError as error:
            raise CatalogError(f"{name!r}: stored manifest is damaged: {error}") from error

    def names_with_sha256(self, sha256: str) -> list[str]:
        """Names whose content has this whole-file SHA-256, sorted."""
        rows = self._connection().execute(
            "SELECT name FROM files WHERE sha256 = ? ORDER BY name", (sha256,)
        )
        return [name for (name,) in rows]

    def list_files(self, search: str | None = None, offset: int = 0, limit: int | None = None) -> list[FileRecord]:
        """Records ordered by name; with ``search``, only names containing it.

        The match is a case- and accent-form-insensitive substring test in
        which every character, ``%`` and ``_`` included, is literal.
        ``offset`` and ``limit`` page through the result in SQL; a large
        ``offset`` costs a walk past that many names: page with ``list_after``.
        """
        condition, arguments = _search_condition(search)
        rows = self._connection().execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE {condition} ORDER BY name LIMIT ? OFFSET ?",
            (*arguments, -1 if limit is None else limit, offset),
        )
        return [_file_record(row) for row in rows]

    def list_after(self, search: str | None, after: str, limit: int) -> list[FileRecord]:
        """Up to ``limit`` records whose names sort after ``after`` ("": from the first), by name.

        Keyset paging: the cost of a page does not depend on how many came
        before it, and a file added or removed between two pages neither
        shifts the later ones nor makes a name appear twice. Names match
        ``search`` as in ``list_files``.
        """
        condition, arguments = _search_condition(search)
        rows = self._connection().execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE name > ? AND {condition} ORDER BY name LIMIT ?",
            (after, *arguments, limit),
        )
        return [_file_record(row) for row in rows]

    def list_json(self, search: str | None, after: str, limit: int,
                  matches: int | None = None, under: str = "") -> tuple[bytes, int, str, bool]:
        """The page ``list_after`` would give, encoded by SQLite: ``(entries, count, last name, more)``.

        ``entries`` is a JSON array of objects with the keys of
        ``LISTING_KEYS``, in name order, in UTF-8; ``last name`` is "" for an
        empty page. The JSON is built inside one SQLite call, in C and without
        the GIL: serving a million entries makes no Python object per entry.
        It comes out as bytes, ready to send: as text, Python would decode a
        page (into 4 bytes a character when one name has an emoji) only to
        encode it again, a quarter of the server's time for a page.
        ``added_at`` has 15 significant digits (10 us for today's times).
        ``matches``, how many names match ``search`` if known, picks the
        cheaper way to read a search's page (see ``LOOKUP_MAX_MATCHES``).
        ``more`` is False when no name after this page matches (known for
        sure for a search read through the trigram index), else True when the
        page is full: then the next page may be empty. ``under`` (a folder,
        ending in ``/``): only the names in it (``_folder_condition``).
        """
        search = _search_in_folder(search, under)
        (entries,), count, last, more = self._page(_JSON_AGGREGATES, search, after, limit, matches, under)
        return entries or b"[]", count, last, more

    def list_packed(self, search: str | None, after: str, limit: int, matches: int | None = None, under: str = "",
                    counts: bool = True) -> tuple[tuple[bytes, ...], int, str, bool]:
        """``list_json``'s page as raw columns: ``((numbers, downloads, sha256s, roots, names), count, last, more)``.

        One aggregate per column, no text per entry: ``numbers`` holds three
        signed 64-bit big-endian integers an entry (size, chunks, ``added_at``
        in whole microseconds), ``downloads`` one, ``sha256s`` and ``roots``
        the raw digests, ``names`` the names in UTF-8 separated by "\n" (no
        name holds a control character); see ``protocol.pack_list_columns``.
        A search's counts are read row by row with its page; a page of every
        name, or of a folder's names, reads them for its range of names
        (``_downloads_between``; not at all if not ``counts``: all 0), and the
        rest of it may be remembered (``_remembered_page``).
        """
        search = _search_in_folder(search, under)
        if not search:
            with self._transaction("DEFERRED"):  # one snapshot: the counts are those of the page's names
                numbers, sha256s, roots, names, count, last, more = self._remembered_page(after, limit, under)
                downloads = self._downloads_between(after, last, count, names, under) if counts else bytes(8 * count)
                return (numbers, downloads, sha256s, roots, names), count, last, more
        columns, count, last, more = self._page(_PACKED_AGGREGATES + (_PACKED_DOWNLOADS,), search, after, limit,
                                                matches, under)
        numbers, sha256s, roots, names, downloads = columns
        return (bytes.fromhex(numbers or ""), bytes.fromhex(downloads or ""), bytes.fromhex(sha256s or ""),
                bytes.fromhex(roots or ""), names or b""), count, last, more

    def _remembered_page(self, after: str, limit: int, under: str) -> tuple:
        """``(numbers, sha256s, roots, names, count, last, more)`` of a page of every name (of the folder ``under``
        if given), without its counts.

        Remembered for the catalog version (read in the caller's snapshot,
        with the page), up to ``PAGES_REMEMBERED_BYTES``: a listing asked again
        costs a range scan of download counters a page instead of 8 ms of SQL
        (a folder that a hundred colleagues download is read once).
        Download counts change without a new version, so they are never kept.
        """
        version = self.catalog_version()
        with self._remembered_lock:
            page = self._pages.get((under, after, limit)) if self._pages_version == version else None
        if page is not None:
            return page
        columns, count, last, more = self._page(_PACKED_AGGREGATES, None, after, limit, None, under)
        numbers, sha256s, roots, names = columns
        page = (bytes.fromhex(numbers or ""), bytes.fromhex(sha256s or ""), bytes.fromhex(roots or ""), names or b"",
                count, last, more)
        size = sum(map(len, page[:4])) + sys.getsizeof(under) + sys.getsizeof(after) + _PAGE_SLOT_BYTES
        with self._remembered_lock:
            if version > self._pages_version:  # the older version's pages will not be asked for again
                self._pages, self._pages_version, self._pages_bytes = {}, version, 0
            # An empty page (a folder that is not there, a cursor past the end) costs a range scan that finds
            # nothing: never kept, so made-up folders fill no memory.
            if count and version == self._pages_version and self._pages_bytes + size <= PAGES_REMEMBERED_BYTES:
                self._pages[(under, after, limit)] = page  # the first pages of a listing stay; later ones are read
                self._pages_bytes += size
        return page

    def _downloads_between(self, after: str, last: str, count: int, names: bytes, under: str = "") -> bytes:
        """The download counts of the ``count`` names after ``after`` up to ``last`` (``names``; all of them under
        ``under``, which every name starts with when it is ""), packed.

        Most names of a catalog are seldom downloaded: their counters are read
        by one range scan and placed by name, instead of one lookup per name
        (a quarter of a page's cost when there are none). When more than one
        name in 8 has a counter, each name's is read with the names, as for a search.
        """
        connection = self._connection()
        few = count // 8
        low = max(after, under)  # a name after ``after`` and under ``under`` is one after ``low`` or ``low`` itself
        rows = connection.execute("SELECT name, SUM(count) FROM download_counts WHERE name >= ? AND name > ?"
                                  " AND name <= ? GROUP BY name LIMIT ?", (low, after, last, few + 1)).fetchall()
        if len(rows) > few:
            (counts,) = connection.execute(
                f"SELECT group_concat(printf('%016x', {_DOWNLOADS_OF_PAGE}), '') FROM (SELECT name FROM files"
                " WHERE name >= ? AND name > ? AND name <= ? ORDER BY name) AS page", (low, after, last)).fetchone()
            return bytes.fromhex(counts or "")
        column = array("q", bytes(8 * count))
        listed = names.decode().split("\n") if rows else []
        for name, total in rows:
            at = bisect.bisect_left(listed, name)
            if at < count and listed[at] == name:  # a counter may outlive its name (a replica's merge)
                column[at] = total
        if sys.byteorder == "little":
            column.byteswap()
        return column.tobytes()

    def _page(self, aggregates: tuple[str, ...], search: str | None, after: str, limit: int,
              matches: int | None, under: str = "") -> tuple[tuple, int, str, bool]:
        """``aggregates`` over the page ``list_after`` would give (of the names under ``under``, if given):
        ``(their values, count, last name, more)``."""
        condition, arguments = _folder_condition(under, search) if under else _search_condition(search, matches)
        if condition == _TRIGRAM_CONDITION:
            return self._matches_page(aggregates, search or "", arguments, after, limit)
        *columns, count, last = self._connection().execute(
            f"SELECT {', '.join(aggregates).format(rows='')}, COUNT(*), MAX(name)"
            " FROM (SELECT name, size, chunk_size, sha256, root, added_at FROM files"
            f" WHERE name > ? AND {condition} ORDER BY name LIMIT ?) AS page",
            (after, *arguments, limit),
        ).fetchone()
        return tuple(columns), count, last or "", count == limit

    def _matches_page(self, aggregates: tuple[str, ...], search: str, arguments: tuple, after: str,
                      limit: int) -> tuple[tuple, int, str, bool]:
        """``_page`` for a search whose matches the trigram index finds: from its remembered names.

        The index gives matches in rowid order, and looking each one up in
        the table is the cost (the root column sits after the digests' blob):
        58 ms a page of 5,000 at 1,000,000 files. So a search's names are read
        once per catalog version (``_matching_names``) and each page reads
        only its own rows, by name, from the covering listing index: 15 ms.
        Download counts, which change without a new catalog version, are read
        with the page as ever. A page that finds one of its names gone (a
        change this connection has not seen yet) is read the old way.
        """
        names = self._matching_names(search, arguments[0])
        if names is None:  # too many to remember
            return self._trigram_page(aggregates, arguments, after, limit)
        start = bisect.bisect_right(names, after)  # Python's str order is SQLite's BINARY order (code points)
        wanted = names[start:start + limit]
        *columns, count, last = self._connection().execute(
            f"SELECT {', '.join(aggregates).format(rows='')}, COUNT(*), MAX(name)"
            " FROM (SELECT files.name AS name, size, chunk_size, sha256, files.root AS root, added_at"
            " FROM json_each(:names) AS wanted JOIN files INDEXED BY files_listing ON files.name = wanted.value"
            " ORDER BY wanted.key) AS page",
            {"names": json.dumps(wanted, ensure_ascii=False)},
        ).fetchone()
        if count != len(wanted):
            return self._trigram_page(aggregates, arguments, after, limit)
        return tuple(columns), count, last or "", start + limit < len(names)

    def _matching_names(self, search: str, phrase: str) -> list[str] | None:
        """The names the trigram ``phrase`` finds, by name, as of the current catalog version; None if over
        ``LOOKUP_MAX_MATCHES``. Remembered per (catalog version, search): 40 ms for 10,000 of 1,000,000.

        The index's rowids come first, so a search with too many matches
        costs no lookups (20 ms for its first 20,001 rowids at 1,000,000 files).
        """
        version = self.catalog_version()
        with self._remembered_lock:
            remembered = self._matches.get((version, search))
        if remembered is not None:
            return remembered
        connection = self._connection()
        rowids = [rowid for (rowid,) in connection.execute(
            "SELECT rowid FROM files_search WHERE files_search MATCH ? LIMIT ?", (phrase, LOOKUP_MAX_MATCHES + 1))]
        if len(rowids) > LOOKUP_MAX_MATCHES:
            return None
        rows = connection.execute("SELECT name FROM files WHERE rowid IN (SELECT value FROM json_each(?))",
                                  (json.dumps(rowids),))
        names = sorted(name for (name,) in rows)  # sorted here, not by SQLite: a tenth cheaper
        if self.catalog_version() == version:  # nothing changed while they were read: they are that version's
            with self._remembered_lock:
                self._matches[(version, search)] = names
                while len(self._matches) > MATCHES_REMEMBERED:
                    del self._matches[next(iter(self._matches))]  # the oldest first
        return names

    def _trigram_page(self, aggregates: tuple[str, ...], arguments: tuple, after: str,
                      limit: int) -> tuple[tuple, int, str, bool]:
        """``_page`` for a search read by looking up every match the trigram index finds.

        Every page looks up all the matches anyway (the index gives them in
        rowid order, not by name), so reading one row past the page costs
        nothing and says whether another page follows: the last full page of
        a search ends the listing, instead of a page that looks them all up
        again to find none (a third of a 10,000-match search at 1,000,000 files).
        """
        in_page = "FILTER (WHERE position <= :limit)"
        *columns, count, last, more = self._connection().execute(
            f"SELECT {', '.join(aggregates).format(rows=in_page)}, COUNT(*) {in_page},"
            f" MAX(name) {in_page}, COUNT(*) > :limit"
            " FROM (SELECT name, size, chunk_size, sha256, root, added_at,"
            " row_number() OVER (ORDER BY name) AS position FROM files"
            f" WHERE name > :after AND {_TRIGRAM_CONDITION.replace('?', ':phrase')}"
            " ORDER BY name LIMIT :limit + 1) AS page",
            {"after": after, "phrase": arguments[0], "limit": limit},
        ).fetchone()
        return tuple(columns), count, last or "", bool(more)

    def count_listing(self, search: str | None = None, under: str = "") -> int:
        """``count_matching`` for a listing that will read pages: a search whose matches the trigram
        index finds is counted by reading (and remembering) its names, which its pages need anyway,
        instead of counting them in the index and then reading them (15 + 45 ms at 1,000,000 files)."""
        search = _search_in_folder(search, under)
        phrase = _indexed_phrase(search) if search and not under else None  # a folder is read by its range
        names = self._matching_names(search, phrase) if phrase is not None else None
        return len(names) if names is not None else self.count_matching(search, under)

    def count_matching(self, search: str | None = None, under: str = "") -> int:
        """How many names ``list_files(search)`` would return (of those under the folder ``under``, if given).

        From the trigram index alone when it can answer: a quarter of the
        cost of looking each match up (14 ms against 52 ms for 10,000 of
        1,000,000 names). Remembered per ``catalog_version``, which every add,
        rename and remove bumps (also by another process): a listing that a
        hundred clients ask for, or a search typed again, is counted once
        (65 ms for every name at 1,000,000 files, 25 ms for a search). A
        search whose names a listing remembered (``_matching_names``) is
        counted from them.
        """
        version = self.catalog_version()
        with self._remembered_lock:
            if (version, search or "", under) in self._counts:
                return self._counts[(version, search or "", under)]
            if not under and (version, search or "") in self._matches:
                return len(self._matches[(version, search or "")])
        query, arguments = _count_sql(search, under)
        version, count = self._connection().execute(f"SELECT ({_CATALOG_VERSION}), ({query})", arguments).fetchone()
        with self._remembered_lock:  # under the version read with the count: one statement, one snapshot
            self._counts[(int(version or 0), search or "", under)] = count
            while len(self._counts) > COUNTS_REMEMBERED:
                del self._counts[next(iter(self._counts))]  # the oldest first
        return count

    def remove_file(self, name: str) -> bool:
        """Remove ``name`` (and its download counters), leaving its tombstone; True if it was there."""
        with self._transaction() as connection:
            row = connection.execute("DELETE FROM files WHERE name = ? RETURNING sha256", (name,)).fetchone()
            if row is not None:
                connection.execute("DELETE FROM download_counts WHERE name = ?", (name,))
                _bury(connection, name, row[0])
                _bump_catalog_version(connection)
        return row is not None

    def change_epochs(self) -> dict[str, tuple[str, int]]:
        """name -> (sha256, epoch of its last change) for every name (a failback's comparison)."""
        rows = self._connection().execute("SELECT name, sha256, changed_epoch FROM files")
        return {name: (sha256, epoch) for name, sha256, epoch in rows}

    def removals(self) -> list[tuple[str, str, int]]:
        """The tombstones: (name, the sha256 it stopped holding, the epoch then), by name.

        At most ``MAX_TOMBSTONES``, the newest: the older ones are deleted
        here, where they are read (for an inventory or a failback's plan), so
        the inventory that carries them stays bounded however many removals
        and renames a catalog sees. What is forgotten is a removal that a
        hundred thousand later ones have long since followed to the other
        server (a failback applies them as soon as the main is back).
        """
        self._forget_oldest_tombstones()
        return [tuple(row) for row in self._connection().execute(
            "SELECT name, sha256, epoch FROM removals ORDER BY name, sha256")]

    def _forget_oldest_tombstones(self) -> None:
        if self._connection().execute("SELECT COUNT(*) FROM removals").fetchone()[0] <= MAX_TOMBSTONES:
            return  # the usual case: no sort, no write
        with self._transaction() as connection:
            connection.execute(
                "DELETE FROM removals WHERE (name, sha256) IN (SELECT name, sha256 FROM removals"
                " ORDER BY removed_at DESC, name, sha256 LIMIT -1 OFFSET ?)", (MAX_TOMBSTONES,))

    def record_download(self, name: str, origin: str = "local") -> int:
        """Count one more download of ``name`` by ``origin``; return the file's total.

        Atomic under concurrent callers. ``CatalogError`` if there is no such file.
        """
        with self._transaction() as connection:
            if connection.execute("SELECT 1 FROM files WHERE name = ?", (name,)).fetchone() is None:
                raise CatalogError(f"no file named {name!r} in the catalog")
            connection.execute(
                "INSERT INTO download_counts (name, origin, count) VALUES (?, ?, 1)"
                " ON CONFLICT (name, origin) DO UPDATE SET count = count + 1",
                (name, origin),
            )
            (total,) = connection.execute(
                "SELECT SUM(count) FROM download_counts WHERE name = ?", (name,)
            ).fetchone()
        return total

    def download_counters(self) -> dict[str, dict[str, int]]:
        """Every counter: ``{name: {origin: count}}`` (what replicas exchange)."""
        counters: dict[str, dict[str, int]] = {}
        for name, origin, count in self._connection().execute(
            "SELECT name, origin, count FROM download_counts ORDER BY name, origin"
        ):
            counters.setdefault(name, {})[origin] = count
        return counters

    def merge_download_counters(self, counters: dict[str, dict[str, int]]) -> int:
        """Merge counters from a replica, keeping the larger value of each.

        Counters of names not in this catalog are ignored. Returns how many
        counters changed.
        """
        changed = 0
        with self._transaction() as connection:
            for name, by_origin in counters.items():
                if connection.execute("SELECT 1 FROM files WHERE name = ?", (name,)).fetchone() is None:
                    continue
                for origin, count in by_origin.items():
                    cursor = connection.execute(
                        "INSERT INTO download_counts (name, origin, count) VALUES (?, ?, ?)"
                        " ON CONFLICT (name, origin) DO UPDATE SET count = excluded.count"
                        " WHERE excluded.count > count",
                        (name, origin, count),
                    )
                    changed += cursor.rowcount
        return changed

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A durable value from ``meta``, or ``default``."""
        row = self._connection().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        """Store a durable value in ``meta`` (committed before returning)."""
        with self._transaction() as connection:
            connection.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def server_id(self) -> str:
        """This server's durable identity, made on first use (the origin of its counters)."""
        server_id = self.get_meta("server_id")
        if server_id is None:
            with self._transaction() as connection:
                # 12 random hex digits, as uuid4().hex[:12] was, without uuid (and platform): 2 ms of a client's start
                connection.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('server_id', ?)", (os.urandom(6).hex(),)
                )
            server_id = self.get_meta("server_id")
        return server_id

    def catalog_version(self) -> int:
        """A number that grows with every add and remove (0 for a new catalog)."""
        return int(self.get_meta("catalog_version", "0"))

    def file_count(self) -> int:
        """Number of names in the catalog."""
        return self._connection().execute("SELECT COUNT(*) FROM files").fetchone()[0]

    def total_bytes(self) -> int:
        """Sum of the sizes of all names (content shared by two names counts twice)."""
        return self._connection().execute(
            "SELECT COALESCE(SUM(size), 0) FROM files"
        ).fetchone()[0]

    # BitTorrent hashes (schema 2) ------------------------------------------------

    def torrent_pieces(self, sha256: str) -> TorrentPieces | None:
        """The stored BitTorrent hashes of that content, or None if not computed yet."""
        row = self._connection().execute(
            "SELECT piece_length, pieces_root, v1_pieces, piece_layer FROM torrent_pieces WHERE sha256 = ?",
            (sha256,),
        ).fetchone()
        return None if row is None else TorrentPieces(*row)

    def put_torrent_pieces(self, sha256: str, pieces: TorrentPieces) -> None:
        """Store the BitTorrent hashes of a content (replacing any)."""
        with self._transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO torrent_pieces (sha256, piece_length, pieces_root, v1_pieces, piece_layer)"
                " VALUES (?, ?, ?, ?, ?)",
                (sha256, pieces.piece_length, pieces.pieces_root, pieces.v1_pieces, pieces.piece_layer),
            )

    def names_without_torrent(self, limit: int) -> list[FileRecord]:
        """Up to ``limit`` records whose name has no info hashes for its current content."""
        rows = self._connection().execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE NOT EXISTS (SELECT 1 FROM torrent_names t"
            " WHERE t.name = files.name AND t.sha256 = files.sha256) ORDER BY name LIMIT ?",
            (limit,),
        )
        return [_file_record(row) for row in rows]

    def put_torrent_name(self, name: str, sha256: str, info_hash_v1: bytes, info_hash_v2: bytes) -> None:
        """Record the info hashes of ``name`` holding ``sha256`` (replacing those of an older content)."""
        with self._transaction() as connection:
            connection.execute(
                "INSERT OR REPLACE INTO torrent_names (name, sha256, info_hash_v1, info_hash_v2) VALUES (?, ?, ?, ?)",
                (name, sha256, info_hash_v1, info_hash_v2),
            )

    def file_for_info_hash(self, info_hash: bytes) -> FileRecord | None:
        """The shared file whose torrent has this v1 hash or (first 20 bytes of) v2 hash, or None."""
        row = self._connection().execute(
            "SELECT name, sha256 FROM torrent_names WHERE info_hash_v1 = ?"
            " UNION ALL SELECT name, sha256 FROM torrent_names WHERE info_hash_v2 = ? LIMIT 1",
            (info_hash, info_hash),
        ).fetchone()
        record = None if row is None else self.get_file(row[0])
        return record if record is not None and record.sha256 == row[1] else None

    def prune_torrents(self) -> int:
        """Drop the torrent rows of names and contents no longer shared; how many went."""
        with self._transaction() as connection:
            names = connection.execute(
                "DELETE FROM torrent_names WHERE NOT EXISTS (SELECT 1 FROM files f"
                " WHERE f.name = torrent_names.name AND f.sha256 = torrent_names.sha256)"
            ).rowcount
            contents = connection.execute(
                "DELETE FROM torrent_pieces WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.sha256 = torrent_pieces.sha256)"
            ).rowcount
        return names + contents

    # Folders: a folder is the names that start with "folder/" (no row of its own).

    def names_under(self, folder: str) -> list[str]:
        """Names that start with ``folder`` (which ends with ``/``), sorted; a range scan of the key."""
        rows = self._connection().execute(
            "SELECT name FROM files WHERE name >= ? AND name < ? ORDER BY name", (folder, _after_prefix(folder)))
        return [name for (name,) in rows]

    def record_downloads(self, pairs: list[tuple[str, str]], origin: str = "local") -> list[str]:
        """Count one download of each (name, sha256) that is shared as that version, in one transaction.

        A folder's thousands of small files: one commit, not one each. Names
        not shared (or shared as another version) are skipped; returns the
        names counted (a name listed twice, twice).
        """
        pairs, versions = version_texts(pairs)
        shared = f"FROM json_each(?) AS j JOIN files AS f ON f.name = {VERSION_NAME} AND f.sha256 = {VERSION_SHA256}"
        with self._transaction() as connection:  # one statement for the lot, in C: the join keeps shared versions
            counted = connection.execute(
                f"INSERT INTO download_counts (name, origin, count) SELECT f.name, ?, 1 {shared}"
                " WHERE true ON CONFLICT (name, origin) DO UPDATE SET count = count + 1",  # WHERE: SQLite's upsert rule
                (origin, versions)).rowcount
            if counted == len(pairs):  # every one (a client reports what it was just served): no names to read back
                return [name for name, _ in pairs]
            return [name for (name,) in connection.execute(f"SELECT f.name {shared}", (versions,))]

    def rename_files(self, renames: list[tuple[str, str]]) -> None:
        """Rename each (old, new) pair in one transaction, download counters included (a tombstone for each old name).

        Raises ``CatalogError`` (nothing renamed) if a new name is taken or an old one is gone.
        """
        try:
            with self._transaction() as connection:
                for old, new in renames:
                    row = connection.execute(
                        f"UPDATE files SET name = ?, name_folded = ?, changed_epoch = {_CURRENT_EPOCH}"
                        " WHERE name = ? RETURNING sha256", (new, fold(new), old)).fetchone()
                    if row is None:
                        raise CatalogError(f"{old!r} is not in the catalog")
                    _bury(connection, old, row[0])
                    connection.execute("DELETE FROM removals WHERE name = ? AND sha256 = ?", (new, row[0]))
                    connection.execute("UPDATE download_counts SET name = ? WHERE name = ?", (new, old))
                _bump_catalog_version(connection)
        except sqlite3.IntegrityError as error:
            raise CatalogError(f"cannot rename: {error}") from error


# ------------------------------------------------------------- partial files


@dataclass
class PartialState:
    """A file being received into a part file: where it lands, what it must be, what is done.

    ``part_path`` is the part file this program created for it, and
    ``part_identity`` that file's "device:inode" when it was created ("" for
    a record written by a version that did not keep it), so a file put at
    that path by someone else is never taken for ours.
    """

    id: int
    dest_path: str
    name: str
    manifest: Manifest
    verified: set[int]
    started_at: float
    part_path: str
    part_identity: str


@dataclass(frozen=True)
class CompletedFile:
    """A download that finished and passed its whole-file check."""

    path: str
    name: str
    size: int
    sha256: str
    manifest: Manifest
    completed_at: float


_PARTIAL_COLUMNS = ("id, dest_path, name, size, chunk_size, sha256, chunk_digests, started_at,"
                    " part_path, part_identity")

_BLOB_PIECE_BYTES = 1 << 20  # a digest list is written in pieces of this size, never bound whole


def _copy_blob(connection: sqlite3.Connection, source: tuple[str, int], target: tuple[str, int], column: str) -> None:
    """Copy a blob column between rows piece by piece, into a ``zeroblob`` of its length."""
    with connection.blobopen(source[0], column, source[1], readonly=True) as reader, \
            connection.blobopen(target[0], column, target[1]) as writer:
        while piece := reader.read(_BLOB_PIECE_BYTES):
            writer.write(piece)


def _write_blob(connection: sqlite3.Connection, table: str, column: str, row: int, data: bytes | memoryview) -> None:
    """Fill a ``zeroblob`` column piece by piece: binding 32 MiB of digests whole costs SQLite two 32 MiB copies."""
    view = memoryview(data)
    with connection.blobopen(table, column, row) as blob:
        for start in range(0, len(view), _BLOB_PIECE_BYTES):
            blob.write(view[start:start + _BLOB_PIECE_BYTES])


def _partial_state(row: tuple, verified: set[int]) -> PartialState:
    id_, dest_path, name, size, chunk_size, sha256, digests, started_at, part_path, identity = row
    manifest = Manifest(size, chunk_size, sha256, digests)
    return PartialState(id_, dest_path, name, manifest, verified, started_at, part_path, identity)


_PARTIALS_V1 = """
    CREATE TABLE downloads (
        -- AUTOINCREMENT: an id is never reused, so a worker still holding
        -- the id of a replaced partial file cannot mark chunks of its successor.
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        dest_path     TEXT NOT NULL UNIQUE,
        name          TEXT NOT NULL,
        size          INTEGER NOT NULL,
        chunk_size    INTEGER NOT NULL,
        sha256        TEXT NOT NULL,
        started_at    REAL NOT NULL,
        chunk_digests BLOB NOT NULL  -- last: see the files table
    );
    CREATE TABLE verified_chunks (
        download_id INTEGER NOT NULL REFERENCES downloads (id) ON DELETE CASCADE,
        chunk_index INTEGER NOT NULL,
        PRIMARY KEY (download_id, chunk_index)
    ) WITHOUT ROWID;
"""

# Version 2 names the table after what it holds (a backup's replicas use it
# too) and records which part file is ours. Rows written by version 1 always
# used "<dest_path>.part", a file that version created or truncated itself.
_PARTIALS_V2 = """
    ALTER TABLE downloads RENAME TO partials;
    ALTER TABLE partials ADD COLUMN part_path TEXT NOT NULL DEFAULT '';
    ALTER TABLE partials ADD COLUMN part_identity TEXT NOT NULL DEFAULT '';
    ALTER TABLE verified_chunks RENAME COLUMN download_id TO partial_id;
    UPDATE partials SET part_path = dest_path || '.part';
"""

_COMPLETED_V1 = """
    CREATE TABLE completed (
        path          TEXT PRIMARY KEY,
        name          TEXT NOT NULL,
        size          INTEGER NOT NULL,
        sha256        TEXT NOT NULL,
        chunk_size    INTEGER NOT NULL,
        completed_at  REAL NOT NULL,
        chunk_digests BLOB NOT NULL  -- last: see the files table
    );
"""


class PartialStore(SQLiteStore):
    """Files being received into part files, and their verified chunks.

    The record half of the part-file lifecycle (``minitorrent.common.partfile``),
    which is what callers use; this class only stores. A replica's partial
    files and a client's downloads live in one of these each.
    """

    MIGRATIONS = (_PARTIALS_V1, _PARTIALS_V2)

    def partial_for(self, dest_path: str) -> PartialState | None:
        """The partial file that lands at ``dest_path``, with its verified chunks, or None."""
        with self._transaction("DEFERRED") as connection:
            row = connection.execute(
                f"SELECT {_PARTIAL_COLUMNS} FROM partials WHERE dest_path = ?", (dest_path,)
            ).fetchone()
            return None if row is None else _partial_state(row, self._verified(connection, row[0]))

    def begin_partial(self, dest_path: str, name: str, manifest: Manifest, part_path: str,
                      part_identity: str, started_at: float | None = None) -> PartialState:
        """Record a new part file for ``dest_path``, nothing verified.

        Raises ``CatalogError`` if a partial file is already recorded for
        ``dest_path``: the caller (or another process receiving the same file)
        must finish or abandon that one by its id first, never clobber it.
        """
        started_at = time.time() if started_at is None else started_at
        try:
            with self._transaction() as connection:
                cursor = connection.execute(
                    "INSERT INTO partials (dest_path, name, size, chunk_size, sha256, chunk_digests,"
                    " started_at, part_path, part_identity) VALUES (?, ?, ?, ?, ?, zeroblob(?), ?, ?, ?)",
                    (dest_path, name, manifest.size, manifest.chunk_size, manifest.sha256,
                     len(manifest.chunk_digests), started_at, part_path, part_identity),
                )
                _write_blob(connection, "partials", "chunk_digests", cursor.lastrowid, manifest.chunk_digests)
        except sqlite3.IntegrityError as error:  # dest_path is UNIQUE
            raise CatalogError(f"{dest_path}: another partial file is already recorded for it") from error
        return PartialState(cursor.lastrowid, dest_path, name, manifest, set(), started_at, part_path,
                            part_identity)

    def set_part_identity(self, partial_id: int, part_identity: str) -> None:
        """Remember the identity of a part file recorded without one (a version 1 record)."""
        with self._transaction() as connection:
            connection.execute("UPDATE partials SET part_identity = ? WHERE id = ?", (part_identity, partial_id))

    @staticmethod
    def _verified(connection: sqlite3.Connection, partial_id: int) -> set[int]:
        rows = connection.execute(
            "SELECT chunk_index FROM verified_chunks WHERE partial_id = ?", (partial_id,)
        )
        return {index for (index,) in rows}

    def mark_verified(self, partial_id: int, indexes: Iterable[int]) -> None:
        """Record that these chunks are written and verified; idempotent.

        One transaction for the whole batch. Raises ``CatalogError`` if there
        is no such partial file, ``ValueError`` if an index is out of range.
        """
        with self._transaction() as connection:
            count = self._chunk_count(connection, partial_id)
            rows = [(partial_id, self._checked_index(index, count)) for index in indexes]
            connection.executemany(
                "INSERT OR IGNORE INTO verified_chunks (partial_id, chunk_index) VALUES (?, ?)", rows,
            )

    def forget_verified(self, partial_id: int, indexes: Iterable[int]) -> None:
        """Unmark chunks (say, found corrupt on disk); unknown ones are ignored."""
        with self._transaction() as connection:
            connection.executemany(
                "DELETE FROM verified_chunks WHERE partial_id = ? AND chunk_index = ?",
                [(partial_id, index) for index in indexes],
            )

    @staticmethod
    def _chunk_count(connection: sqlite3.Connection, partial_id: int) -> int:
        row = connection.execute("SELECT size, chunk_size FROM partials WHERE id = ?", (partial_id,)).fetchone()
        if row is None:
            raise CatalogError(f"no partial file in progress with id {partial_id}")
        return chunk_count(*row)

    @staticmethod
    def _checked_index(index: int, count: int) -> int:
        if not 0 <= index < count:
            raise ValueError(f"chunk index {index} out of range (the file has {count} chunks)")
        return index

    def finish_partial(self, partial_id: int) -> None:
        """The file is installed under its final name: forget its record.

        Raises ``CatalogError`` if there is no such partial file.
        """
        with self._transaction() as connection:
            if connection.execute("DELETE FROM partials WHERE id = ?", (partial_id,)).rowcount == 0:
                raise CatalogError(f"no partial file in progress with id {partial_id}")

    def abandon_partial(self, partial_id: int) -> bool:
        """Forget that partial file and its verified chunks; False if it was no longer recorded.

        By id, not by destination: a record another process has made since for
        the same destination is not ours to drop.
        """
        with self._transaction() as connection:
            return connection.execute("DELETE FROM partials WHERE id = ?", (partial_id,)).rowcount > 0

    def partials_named(self, name: str) -> list[PartialState]:
        """The partial files recorded under ``name`` (the name given when each began), with their chunks."""
        with self._transaction("DEFERRED") as connection:
            rows = connection.execute(
                f"SELECT {_PARTIAL_COLUMNS} FROM partials WHERE name = ? ORDER BY id", (name,)
            ).fetchall()
            return [_partial_state(row, self._verified(connection, row[0])) for row in rows]

    def in_progress(self) -> list[PartialState]:
        """Every unfinished partial file, oldest first, with its verified chunks."""
        with self._transaction("DEFERRED") as connection:
            rows = connection.execute(
                f"SELECT {_PARTIAL_COLUMNS} FROM partials ORDER BY started_at, id"
            ).fetchall()
            verified: dict[int, set[int]] = {row[0]: set() for row in rows}
            for partial_id, index in connection.execute("SELECT partial_id, chunk_index FROM verified_chunks"):
                verified[partial_id].add(index)
        return [_partial_state(row, verified[row[0]]) for row in rows]


# --------------------------------------------------------------- client side


class ClientStore(PartialStore):
    """The client's downloads in progress (its partial files) and the files
    it has finished (which it may seed)."""

    MIGRATIONS = (_PARTIALS_V1 + _COMPLETED_V1, *PartialStore.MIGRATIONS[1:])

    def finish_partial(self, partial_id: int, completed_at: float | None = None) -> None:
        """Move a download into the completed files, in one transaction.

        A completed entry already at the same path is replaced. Raises
        ``CatalogError`` if there is no such download.
        """
        completed_at = time.time() if completed_at is None else completed_at
        with self._transaction() as connection:
            cursor = connection.execute(
                "INSERT OR REPLACE INTO completed (path, name, size, sha256, chunk_size,"
                " chunk_digests, completed_at) SELECT dest_path, name, size, sha256,"
                " chunk_size, zeroblob(length(chunk_digests)), ? FROM partials WHERE id = ?",
                (completed_at, partial_id),
            )
            if cursor.rowcount == 0:
                raise CatalogError(f"no download in progress with id {partial_id}")
            _copy_blob(connection, ("partials", partial_id), ("completed", cursor.lastrowid), "chunk_digests")
            connection.execute("DELETE FROM partials WHERE id = ?", (partial_id,))

    def completed_files(self) -> list[CompletedFile]:
        """Every completed download, ordered by path."""
        rows = self._connection().execute(
            "SELECT path, name, size, sha256, chunk_size, chunk_digests, completed_at"
            " FROM completed ORDER BY path"
        )
        return [
            CompletedFile(path, name, size, sha256,
                          Manifest(size, chunk_size, sha256, digests), completed_at)
            for path, name, size, sha256, chunk_size, digests, completed_at in rows
        ]
