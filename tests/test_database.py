"""Tests for database.py: the SQLite base, the server catalog, the client state."""
from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
import tracemalloc
import unicodedata

import pytest

import database
from database import LISTING_KEYS, ClientStore, PartialStore, ServerStore, SQLiteStore, fold
from error_handler import CatalogError
from integrity import Manifest, build_manifest, hash_list_root
from minitorrent.wire import protocol

LONG_TIMEOUT = 30  # seconds; thread joins that should take milliseconds


def manifest_of(data: bytes, chunk_size: int = 4) -> Manifest:
    return build_manifest(io.BytesIO(data), chunk_size)


@pytest.fixture
def server(tmp_path):
    with ServerStore(tmp_path / "db" / "server.sqlite3") as store:
        yield store


@pytest.fixture
def client(tmp_path):
    with ClientStore(tmp_path / "client.sqlite3") as store:
        yield store


def run_in_threads(count: int, target) -> None:
    """Run target(i) on ``count`` threads at once; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def body(i: int) -> None:
        try:
            start.wait()
            target(i)
        except BaseException as error:  # reported to the test thread below
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG_TIMEOUT)
    assert [] == [thread for thread in threads if thread.is_alive()]
    if errors:
        raise errors[0]


class TestSQLiteStore:
    def test_wal_mode_and_pragmas(self, server):
        """Connections run in WAL mode with foreign keys on and a busy timeout."""
        connection = server._connection()
        assert "wal" == connection.execute("PRAGMA journal_mode").fetchone()[0]
        assert 1 == connection.execute("PRAGMA foreign_keys").fetchone()[0]
        assert 5000 == connection.execute("PRAGMA busy_timeout").fetchone()[0]
        assert 1 == connection.execute("PRAGMA synchronous").fetchone()[0]  # NORMAL

    def test_user_version_set(self, server, client):
        """Each store's schema version is the number of its migrations."""
        assert len(ServerStore.MIGRATIONS) == server.schema_version
        assert len(ClientStore.MIGRATIONS) == client.schema_version

    def test_creates_parent_folder(self, tmp_path):
        """A missing parent folder of the database file is created."""
        with ServerStore(tmp_path / "a" / "b" / "s.db"):
            pass
        assert (tmp_path / "a" / "b" / "s.db").is_file()

    def test_reopening_keeps_data(self, tmp_path):
        """Data written, closed and reopened is still there."""
        path = tmp_path / "s.db"
        with ServerStore(path) as store:
            store.add_file("a.txt", manifest_of(b"hello"))
        with ServerStore(path) as store:
            assert ["a.txt"] == [record.name for record in store.list_files()]

    def test_newer_schema_refused(self, tmp_path):
        """A database from a newer program is refused with a clear CatalogError."""
        path = tmp_path / "s.db"
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA user_version = 99")
        connection.close()
        with pytest.raises(CatalogError, match="schema version 99 is newer"):
            ServerStore(path)

    def test_not_a_database_refused(self, tmp_path):
        """A file that is not SQLite is a CatalogError, not a raw sqlite3 error."""
        path = tmp_path / "s.db"
        path.write_bytes(b"this is not a database at all" * 100)
        with pytest.raises(CatalogError, match="cannot open database"):
            ServerStore(path)

    def test_migrations_applied_in_order(self, tmp_path):
        """Migrations run in order, only new ones on reopen, with ';' in quotes and triggers."""

        class V1(SQLiteStore):
            MIGRATIONS = ("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);",)

        class V2(SQLiteStore):
            MIGRATIONS = V1.MIGRATIONS + (
                "INSERT INTO t VALUES ('a;b');"
                " CREATE TRIGGER t_noop AFTER INSERT ON t BEGIN SELECT 1; SELECT 2; END;"
                " -- a trailing comment",
            )

        path = tmp_path / "m.db"
        V1(path).close()
        with V2(path) as store:
            rows = store._connection().execute("SELECT x FROM t").fetchall()
            assert 2 == store.schema_version
        assert [(1,), ("a;b",)] == rows

    def test_catalog_of_the_first_schema_gets_its_roots(self, tmp_path):
        """A catalog written before roots were stored gets each file's root from its digests on opening."""

        class FirstSchema(SQLiteStore):
            MIGRATIONS = ServerStore.MIGRATIONS[:1]

        path = tmp_path / "old.db"
        digests = hashlib.sha256(b"x").digest() * 3
        with FirstSchema(path) as old:
            old._connection().execute(
                "INSERT INTO files (name, name_folded, size, chunk_size, sha256, added_at, chunk_digests)"
                " VALUES ('a', 'a', 2500, 1000, ?, 1.0, ?)", ("0" * 64, digests))
        with ServerStore(path) as store:
            assert (hash_list_root(2500, 1000, digests), hash_list_root(2500, 1000, digests)) == (
                store.get_file("a").root, store.get_manifest("a").root)

    def test_failed_migration_rolls_back(self, tmp_path):
        """A migration that fails leaves the schema and version untouched."""

        class Broken(SQLiteStore):
            MIGRATIONS = ("CREATE TABLE t (x); INSERT INTO nowhere VALUES (1);",)

        path = tmp_path / "b.db"
        with pytest.raises(CatalogError):
            Broken(path)
        connection = sqlite3.connect(path)
        assert (0, []) == (
            connection.execute("PRAGMA user_version").fetchone()[0],
            connection.execute("SELECT name FROM sqlite_master").fetchall(),
        )
        connection.close()

    def test_use_after_close_refused(self, tmp_path):
        """Calls after close() raise CatalogError."""
        store = ServerStore(tmp_path / "s.db")
        store.close()
        with pytest.raises(CatalogError, match="closed"):
            store.file_count()

    def test_close_closes_every_thread_connection(self, tmp_path):
        """close() closes the connections other threads opened."""
        store = ServerStore(tmp_path / "s.db")
        opened: list[sqlite3.Connection] = []
        run_in_threads(3, lambda _i: opened.append(store._connection()))
        store.close()
        for connection in opened:
            with pytest.raises(sqlite3.ProgrammingError):
                connection.execute("SELECT 1")

    def test_finished_threads_connections_pruned(self, server):
        """Connections of threads that ended are closed when a new one opens."""
        for _ in range(5):
            run_in_threads(2, lambda _i: server.file_count())
        run_in_threads(1, lambda _i: server.file_count())
        assert len(server._connections) <= 3


class TestServerCatalog:
    def test_add_and_get(self, server):
        """A file added can be read back as a record and as its manifest."""
        manifest = manifest_of(b"0123456789")
        added = server.add_file("a.txt", manifest, added_at=1000.0)
        assert added == server.get_file("a.txt")
        assert ("a.txt", 10, 4, 3, 0, 1000.0) == (
            added.name, added.size, added.chunk_size, added.chunks, added.downloads,
            added.added_at,
        )
        assert manifest == server.get_manifest("a.txt")

    def test_missing_file_is_none(self, server):
        """Unknown names give None, not an error."""
        assert (None, None) == (server.get_file("nope"), server.get_manifest("nope"))

    def test_duplicate_name_refused(self, server):
        """Adding a name twice raises CatalogError and keeps the first."""
        first = server.add_file("a.txt", manifest_of(b"one"))
        with pytest.raises(CatalogError, match="already in the catalog"):
            server.add_file("a.txt", manifest_of(b"two"))
        assert first == server.get_file("a.txt")

    def test_names_sharing_content(self, server):
        """Two names with the same content are both found by sha256."""
        manifest = manifest_of(b"same")
        server.add_file("b.txt", manifest)
        server.add_file("a.txt", manifest)
        server.add_file("c.txt", manifest_of(b"other"))
        assert ["a.txt", "b.txt"] == server.names_with_sha256(manifest.sha256)

    def test_remove(self, server):
        """remove_file says whether the name was there."""
        server.add_file("a.txt", manifest_of(b"x"))
        assert (True, False) == (server.remove_file("a.txt"), server.remove_file("a.txt"))
        assert 0 == server.file_count()

    def test_counts_and_total_bytes(self, server):
        """file_count and total_bytes sum over every name."""
        assert (0, 0) == (server.file_count(), server.total_bytes())
        server.add_file("a", manifest_of(b"12345"))
        server.add_file("b", manifest_of(b""))
        server.add_file("c", manifest_of(b"123"))
        assert (3, 8) == (server.file_count(), server.total_bytes())

    def test_record_download(self, server):
        """record_download counts up and refuses unknown names."""
        server.add_file("a.txt", manifest_of(b"x"))
        assert [1, 2] == [server.record_download("a.txt") for _ in range(2)]
        with pytest.raises(CatalogError, match="no file named"):
            server.record_download("nope")

    def test_record_downloads_counts_only_shared_versions(self, server):
        """record_downloads counts each (name, sha256) shared as that version, in one go, and says which."""
        a, b = manifest_of(b"x"), manifest_of(b"y")
        server.add_file("a.txt", a)
        server.add_file("b.txt", b)
        counted = server.record_downloads([("a.txt", a.sha256), ("a.txt", a.sha256), ("b.txt", a.sha256),
                                           ("gone.txt", a.sha256), ("b.txt", b.sha256)])
        assert (["a.txt", "a.txt", "b.txt"], 2, 1) == (sorted(counted), server.get_file("a.txt").downloads,
                                                       server.get_file("b.txt").downloads)

    def test_record_downloads_of_every_one_reported(self, server):
        """The usual report (every pair shared as that version) counts them all and says so."""
        a, b = manifest_of(b"x"), manifest_of(b"y")
        server.add_file("a.txt", a)
        server.add_file("b.txt", b)
        assert (["a.txt", "b.txt"], 1, 1) == (server.record_downloads([("a.txt", a.sha256), ("b.txt", b.sha256)]),
                                              server.get_file("a.txt").downloads, server.get_file("b.txt").downloads)

    def test_a_short_digest_cannot_lend_its_end_to_a_name(self, server):
        """A digest cut short with its tail moved to the name's front (the text unchanged) counts nothing."""
        a = manifest_of(b"x")
        server.add_file("a.txt", a)
        assert ([], 0) == (server.record_downloads([(a.sha256[60:] + "a.txt", a.sha256[:60])]),
                           server.get_file("a.txt").downloads)

    @pytest.mark.parametrize("tail", ["\x00", "\x00made up", "\x00\x00.txt"])
    def test_a_name_with_a_nul_is_not_a_shared_name(self, server, tail):
        """A reported name holding a NUL (where SQLite's substr stops) is not shared: nothing counted, nothing said
        counted (else every made-up tail would become a key of the server's metrics)."""
        a = manifest_of(b"x")
        server.add_file("a.txt", a)
        assert ([], 0) == (server.record_downloads([("a.txt" + tail, a.sha256)]), server.get_file("a.txt").downloads)

    def test_file_layouts_looks_a_batch_up_at_once(self, server):
        """file_layouts gives file_layout's answer for each name shared, and leaves out the names not shared."""
        one, two = manifest_of(b"12345"), manifest_of(b"678")
        server.add_file("a.txt", one)
        server.add_file("dir/b.txt", two)
        assert {"a.txt": (5, 4, one.sha256), "dir/b.txt": (3, 4, two.sha256)} == \
            server.file_layouts(["a.txt", "gone.txt", "dir/b.txt", "a.txt"])

    def test_file_layouts_takes_a_full_batch_where_sqlite_binds_999_values_at_most(self, server):
        """A get_batch's 1,024 names are looked up where SQLite allows 999 bound values (its limit before 3.32)."""
        one = manifest_of(b"12345")
        server.add_file("a.txt", one)
        server._connection().setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        assert {"a.txt": (5, 4, one.sha256)} == server.file_layouts(["a.txt"] + [f"gone{i}" for i in range(1023)])

    def test_file_layout_is_size_chunk_size_and_sha256(self, server):
        """file_layout gives what serving a chunk needs, None for a name not shared."""
        manifest = manifest_of(b"12345")
        server.add_file("a.txt", manifest)
        assert ((5, 4, manifest.sha256), None) == (server.file_layout("a.txt"), server.file_layout("b.txt"))

    def test_concurrent_writers(self, server):
        """8 threads recording 100 downloads each lose no update."""
        server.add_file("hot.bin", manifest_of(b"x"))
        run_in_threads(8, lambda _i: [server.record_download("hot.bin") for _ in range(100)])
        assert 800 == server.get_file("hot.bin").downloads


class TestServerSearch:
    @pytest.fixture
    def names(self, server):
        names = ["café.txt", "Report 100%.pdf", "a_b.txt", "axb.txt", "CAFETERIA.md", "ü.bin"]
        for name in names:
            server.add_file(name, manifest_of(name.encode()))
        return names

    def search(self, server, text):
        return [record.name for record in server.list_files(text)]

    def test_listed_by_name(self, server, names):
        """Without a search every file is listed, ordered by name."""
        assert sorted(names) == self.search(server, None)

    def test_case_and_accent_insensitive(self, server, names):
        """'CAFÉ' finds 'café.txt' but not 'CAFETERIA.md'."""
        assert ["café.txt"] == self.search(server, "CAFÉ")
        assert ["CAFETERIA.md", "café.txt"] == self.search(server, "caf")

    def test_decomposed_accent_matches(self, server, names):
        """A search typed with a combining accent finds the precomposed name."""
        assert ["café.txt"] == self.search(server, unicodedata.normalize("NFD", "Café"))
        assert ["ü.bin"] == self.search(server, "Ü")

    def test_percent_and_underscore_literal(self, server, names):
        """% and _ are plain characters, not LIKE wildcards."""
        assert ["Report 100%.pdf"] == self.search(server, "%")
        assert ["a_b.txt"] == self.search(server, "_")

    def test_no_match(self, server, names):
        """A search that matches nothing gives an empty list."""
        assert [] == self.search(server, "zzz")

    def test_ten_thousand_files(self, server):
        """10,000 files list completely, in order, and search finds the right ones."""
        manifest = manifest_of(b"data")
        with server._transaction() as connection:  # bulk load in one commit
            connection.executemany(
                "INSERT INTO files (name, name_folded, size, chunk_size, sha256,"
                " chunk_digests, added_at) VALUES (?, ?, ?, ?, ?, ?, 0)",
                [(f"file{i:05d}.bin", f"file{i:05d}.bin", manifest.size,
                  manifest.chunk_size, manifest.sha256, manifest.chunk_digests)
                 for i in range(10_000)],
            )
        listed = server.list_files()
        assert [f"file{i:05d}.bin" for i in range(10_000)] == [r.name for r in listed]
        assert 100 == len(server.list_files("FILE099"))


def brute_force_search(names: list[str], text: str) -> list[str]:
    """What a search must find: names whose folded form contains the folded text, by name."""
    return sorted(name for name in names if fold(text) in fold(name))


class TestSearchIndex:
    NAMES = ["café.txt", "Café Résumé.pdf", "STRASSE.md", "große straße.txt", 'quo"te "x".txt', "a*b?c.txt",
             "Report 100%.pdf", "a_b.txt", "日本語のファイル.txt", "🎵 mix 🎵.flac", "naïve.doc", "NAÏVE-2.doc"]
    SEARCHES = ["", "a", "ca", "caf", "CAFÉ", "ss", "strasse", "STRAßE", '"', 'o"t', '"x"', "*b?", "100%",
                "%", "_", "a_b", "日本語", "本語の", "🎵 m", "ve.d", "NAÏVE", "zzz", "a\x00b", "é", "\u0301"]

    @pytest.fixture
    def names(self, server):
        for name in self.NAMES:
            server.add_file(name, manifest_of(name.encode()))
        return self.NAMES

    @pytest.mark.parametrize("text", SEARCHES)
    def test_index_finds_what_a_scan_finds(self, server, names, text):
        """Every search, short or long, quoted or accented, finds exactly the names a folded substring scan finds."""
        expected = brute_force_search(names, text)
        assert (expected, len(expected)) == ([r.name for r in server.list_files(text or None)],
                                            server.count_matching(text or None))

    def test_removed_and_added_names_follow(self, server, names):
        """The trigram index forgets a removed name and learns a new one at once."""
        server.remove_file("café.txt")
        server.add_file("CAFÉ noir.txt", manifest_of(b"noir"))
        assert ["CAFÉ noir.txt", "Café Résumé.pdf"] == [r.name for r in server.list_files("café")]


class TestRememberedCounts:
    @pytest.mark.parametrize("search", [None, "café", "ca"])  # every name; trigram index; scan
    def test_a_count_follows_adds_renames_and_removes_by_another_store(self, tmp_path, search):
        """A remembered count is never stale: a change made through another store on the same file shows at once."""
        path = tmp_path / "db" / "server.sqlite3"
        with ServerStore(path) as serving, ServerStore(path) as other:
            add_names(other, ["café 1.txt", "other.txt"])
            counts = [serving.count_matching(search), serving.count_matching(search)]
            add_names(other, ["Café 2.txt"])
            counts.append(serving.count_matching(search))
            other.rename_files([("café 1.txt", "tea.txt")])
            counts.append(serving.count_matching(search))
            other.remove_file("Café 2.txt")
            counts.append(serving.count_matching(search))
        expected = [2, 2, 3, 3, 2] if search is None else [1, 1, 2, 1, 0]
        assert expected == counts

    def test_more_searches_than_are_remembered_are_each_counted_right(self, server):
        """Past COUNTS_REMEMBERED different searches, the oldest are forgotten, and every count is still right."""
        add_names(server, [f"file {i:03d}.bin" for i in range(10)])
        counts = [server.count_matching(f"file {i:03d}") for i in range(database.COUNTS_REMEMBERED + 5)]
        assert [1] * 10 + [0] * (database.COUNTS_REMEMBERED - 5) == counts


def add_names(server: ServerStore, names: list[str]) -> None:
    server.add_files([(name, manifest_of(name.encode()), 1000.5) for name in names])


class TestKeysetPages:
    NAMES = [f"file {i:03d}.bin" for i in range(0, 60, 2)]  # even numbers: room for odd ones between pages

    def all_pages(self, server, search=None, limit=4, between=lambda page: None) -> list[str]:
        listed: list[str] = []
        while True:
            page = [record.name for record in server.list_after(search, listed[-1] if listed else "", limit)]
            listed += page
            if len(page) < limit:
                return listed
            between(page)

    def test_pages_list_every_name_once_in_order(self, server):
        """Pages of 4 after the last name seen list every file once, by name."""
        add_names(server, self.NAMES)
        assert self.NAMES == self.all_pages(server)

    def test_no_skip_or_repeat_while_files_change(self, server):
        """Files added and removed on both sides of the cursor between pages: no name twice or out of order,
        none missed that was there all along or added ahead, none listed that was removed ahead."""
        add_names(server, self.NAMES)
        removed: list[str] = []
        removed_ahead: list[str] = []
        added_ahead: list[str] = []

        def churn(page: list[str]) -> None:
            number = int(page[-1][5:8])
            add_names(server, [f"file {number - 1:03d}.bin", f"file {number + 1:03d}.bin"])
            added_ahead.append(f"file {number + 1:03d}.bin")
            for seen in page[:2]:  # two gone behind the cursor, one added: an offset would now skip a name
                server.remove_file(seen)
                removed.append(seen)
            if server.remove_file(f"file {number + 4:03d}.bin"):
                removed_ahead.append(f"file {number + 4:03d}.bin")

        listed = self.all_pages(server, between=churn)
        stayed = [name for name in self.NAMES if name not in removed + removed_ahead]
        assert (sorted(set(listed)), [], [], True) == (
            listed, [name for name in stayed + added_ahead if name not in listed],
            [name for name in removed_ahead if name in listed], len(removed_ahead) > 3)

    def test_search_pages(self, server):
        """Pages of a search hold only matches, each once, by name."""
        add_names(server, self.NAMES + ["other.txt", "FILE 999.BIN"])
        expected = brute_force_search(self.NAMES + ["FILE 999.BIN"], "0.bin")
        assert expected == self.all_pages(server, "0.BIN", limit=2)


class TestListJson:
    def test_entries_match_the_records(self, server):
        """The SQLite-built JSON page holds what list_after gives, as the catalog's entry objects."""
        add_names(server, ["b.txt", 'q"uote\\.txt', "Zürich 🎉.txt", "a.txt"])
        server.record_download("b.txt")
        entries, count, last, more = server.list_json(None, "B", 10)  # after "B": "Zürich" sorts before "a"
        expected = [{"name": r.name, "size": r.size, "chunks": r.chunks, "sha256": r.sha256, "root": r.root,
                     "downloads": r.downloads, "added_at": r.added_at} for r in server.list_after(None, "B", 10)]
        assert (expected, 4, 'q"uote\\.txt', False) == (json.loads(entries), count, last, more)
        assert ([0, 0, 1, 0], list(LISTING_KEYS)) == ([e["downloads"] for e in expected], list(json.loads(entries)[0]))

    @pytest.mark.parametrize("text", ["file", "FILE 01", "0.b", "e"])
    def test_both_ways_to_read_a_search_page_agree(self, server, text):
        """A search page read through the trigram index and one read by walking the names are the same."""
        add_names(server, [f"file {i:03d}.bin" for i in range(60)] + ["other.txt"])
        assert server.list_json(text, "file 010.bin", 7) == server.list_json(
            text, "file 010.bin", 7, matches=database.LOOKUP_MAX_MATCHES + 1)

    def test_empty_page(self, server):
        """A page past the end is an empty array with no last name."""
        add_names(server, ["a.txt"])
        assert (b"[]", 0, "", False) == server.list_json("a", "a.txt", 10)

    @pytest.mark.parametrize("matches", [None, database.LOOKUP_MAX_MATCHES + 1])
    def test_a_full_search_page_says_whether_more_follow(self, server, matches):
        """Read through the trigram index, a full last page of a search says none follow; walked, it may follow."""
        add_names(server, [f"file {i:03d}.bin" for i in range(6)] + ["other.txt"])
        by_trigrams = matches is None
        pages = (("", 6), ("", 5), ("file 004.bin", 6))
        assert [(6, "file 005.bin", not by_trigrams), (5, "file 004.bin", True), (1, "file 005.bin", False)] == [
            server.list_json("file", after, limit, matches)[1:] for after, limit in pages]


class TestListPacked:
    """A packed page (raw columns for the wire) holds what the JSON page of the same names holds."""

    NAMES = [f"file {i:03d}.bin" for i in range(40)]

    def both(self, server: ServerStore, search: str | None, after: str = "", limit: int = 20) -> tuple[list, list]:
        columns, count, last, more = server.list_packed(search, after, limit)
        packed = protocol.decode_list_page(protocol.pack_list_columns(*columns), protocol.LIST_LAYOUT_PACKED, count)
        entries, *rest = server.list_json(search, after, limit)
        return [packed, count, last, more], [json.loads(entries), *rest]

    @pytest.mark.parametrize("downloaded", [[], ["file 003.bin"], NAMES[::2]], ids=["none", "sparse", "dense"])
    def test_every_name_and_its_downloads(self, server, downloaded):
        """Pages of every name carry each one's download count, whether few names or many have one."""
        add_names(server, self.NAMES)
        for name in downloaded:
            server.record_download(name)
            server.record_download(name, "other-server")
        packed, as_json = self.both(server, None, "file 001.bin")
        assert (as_json, 2 * len([n for n in downloaded if "file 001.bin" < n <= "file 021.bin"])) == (
            packed, sum(entry["downloads"] for entry in packed[0]))

    def test_a_counter_without_its_name_is_left_out(self, server, tmp_path):
        """A download counter whose name is not in the catalog (a replica's merge) changes no listed count."""
        add_names(server, self.NAMES)
        server.record_download("file 005.bin")
        other = sqlite3.connect(tmp_path / "db" / "server.sqlite3")
        with other:
            other.execute("INSERT INTO download_counts (name, origin, count) VALUES ('file 005.binary', 'x', 7)")
        other.close()
        packed, as_json = self.both(server, None)
        assert (as_json, 1) == (packed, sum(entry["downloads"] for entry in packed[0]))

    def test_a_page_asked_again_has_fresh_download_counts(self, server):
        """A page of every name asked again (and remembered) carries the downloads recorded since."""
        add_names(server, self.NAMES)
        first, _ = self.both(server, None)
        server.record_download("file 004.bin")
        again, as_json = self.both(server, None)
        assert (0, 1, as_json) == (first[0][4]["downloads"], again[0][4]["downloads"], again)

    def test_a_page_asked_again_after_a_change_shows_it(self, server):
        """After a name is added or removed (a new catalog version), a page asked again shows the change."""
        add_names(server, self.NAMES)
        self.both(server, None)
        server.remove_file("file 002.bin")
        add_names(server, ["file 002a.bin"])
        again, as_json = self.both(server, None)
        assert ("file 002a.bin", as_json) == (again[0][2]["name"], again)

    def test_pages_over_the_memory_bound_are_read_each_time(self, server, monkeypatch):
        """With room for no page, every listing still gives the same pages."""
        monkeypatch.setattr(database, "PAGES_REMEMBERED_BYTES", 100)
        add_names(server, self.NAMES)
        first = self.both(server, None)
        assert (first, first[0] == first[1]) == (self.both(server, None), True)

    @pytest.mark.parametrize("text", ["file 01", "0.b"])
    def test_search_pages(self, server, text):
        """A search's packed page holds what its JSON page holds, download counts included."""
        add_names(server, self.NAMES)
        server.record_download("file 010.bin")
        packed, as_json = self.both(server, text, limit=5)
        assert (as_json, 1) == (packed, sum(entry["downloads"] for entry in packed[0]))


class TestFolderPages:
    """A packed page of a folder's names (``under``): what its JSON page holds, remembered, counts if asked for."""

    NAMES = ["a/x.bin", "photos.txt"] + [f"photos/{i:02d}.jpg" for i in range(30)] + ["photos/z/deep.jpg", "q.bin"]

    def page(self, server: ServerStore, after: str = "", limit: int = 20, counts: bool = True,
             search: str | None = None) -> list:
        columns, count, last, more = server.list_packed(search, after, limit, None, "photos/", counts)
        return [protocol.decode_list_page(protocol.pack_list_columns(*columns), protocol.LIST_LAYOUT_PACKED, count),
                count, last, more]

    def json_page(self, server: ServerStore, after: str = "", limit: int = 20) -> list:
        entries, *rest = server.list_json(None, after, limit, None, "photos/")
        return [json.loads(entries), *rest]

    @pytest.mark.parametrize("after", ["", "photos/04.jpg", "photos/29.jpg"])
    def test_a_folder_page_is_its_json_page(self, server, after):
        """Download counts of names around the folder (before it, after it) never leak into its pages."""
        add_names(server, self.NAMES)
        for name in ("a/x.bin", "photos.txt", "photos/05.jpg", "photos/z/deep.jpg", "q.bin"):
            server.record_download(name)
        assert self.json_page(server, after) == self.page(server, after)

    @pytest.mark.parametrize("search", ["photos/", "PHOTOS", "to", "0"])
    def test_a_search_inside_the_folder(self, server, search):
        """A search within the folder (a client sends the folder as its search too) finds what its JSON page finds,
        and is counted as many."""
        add_names(server, self.NAMES)
        server.record_download("photos/05.jpg")
        entries, *rest = server.list_json(search, "", 20, None, "photos/")
        assert [json.loads(entries), *rest] == self.page(server, search=search)
        every, *_ = server.list_json(search, "", 100, None, "photos/")
        assert len(json.loads(every)) == server.count_listing(search, "photos/")

    def test_dense_counts_around_the_folder(self, server):
        """Every name counted (the dense way of reading counts): each entry still gets its own."""
        add_names(server, self.NAMES)
        for i, name in enumerate(self.NAMES):
            for _ in range(i % 3 + 1):
                server.record_download(name)
        assert self.json_page(server) == self.page(server)

    def test_a_page_without_counts_reads_none(self, server):
        """``counts`` false: every entry's downloads is 0, the rest as with counts."""
        add_names(server, self.NAMES)
        server.record_download("photos/00.jpg")
        with_counts, without = self.page(server), self.page(server, counts=False)
        with_counts[0][0]["downloads"] = 0
        assert with_counts == without

    def test_a_folder_page_asked_again_has_fresh_counts_and_changes(self, server):
        """Remembered for the catalog version: downloads since and names added since both show."""
        add_names(server, self.NAMES)
        self.page(server)
        server.record_download("photos/01.jpg")
        counted = self.page(server)
        add_names(server, ["photos/00a.jpg"])
        assert (1, "photos/00a.jpg", self.json_page(server)) == (counted[0][1]["downloads"],
                                                               self.page(server)[0][1]["name"], self.page(server))


    @pytest.mark.parametrize("made_up", ["under", "after", "after-inside"])
    def test_made_up_listings_stay_within_the_memory_bound(self, server, monkeypatch, made_up):
        """Thousands of listings of made-up folders, of cursors past the last name (empty pages: never kept), or of
        cursors between real names (a page of one name each, every one a new key): the pages kept of them stay
        within PAGES_REMEMBERED_BYTES (a client cannot grow the server's memory with them)."""
        monkeypatch.setattr(database, "PAGES_REMEMBERED_BYTES", 256 * 1024)
        add_names(server, self.NAMES)
        server.list_packed(None, "", 20, None, "photos/", False)  # SQLite's statements made before counting
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(4000):
                folder = f"{'x' * 200}{i}/"
                if made_up == "under":
                    server.list_packed(None, "", 20, None, folder, False)
                elif made_up == "after":
                    server.list_packed(None, "z" + folder, 20, None, "", False)
                else:
                    server.list_packed(None, "photos/00" + folder, 1, None, "photos/", False)
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # What is counted against the bound is what is kept, give or take the objects' own headers: 1.2 times the
        # bound here (1.85 without the slot each page is counted for)
        assert True == (kept <= 1.5 * database.PAGES_REMEMBERED_BYTES), f"{kept} bytes kept"


class TestRememberedMatches:
    """A search's matching names are read once per catalog version; its pages read only their own rows."""

    NAMES = [f"file {i:03d}.bin" for i in range(12)] + ["other.txt"]

    def pages(self, server: ServerStore, text: str, limit: int = 5) -> list[str]:
        names, after = [], ""
        while True:
            entries, count, last, more = server.list_json(text, after, limit)
            names += [entry["name"] for entry in json.loads(entries)]
            if not more:
                return names
            after = last

    def test_download_counts_are_read_with_each_page(self, server):
        """A download recorded after a search was listed shows in the next listing of it (no new catalog version)."""
        add_names(server, self.NAMES)
        first = json.loads(server.list_json("file 00", "", 10)[0])
        server.record_download("file 003.bin")
        again = json.loads(server.list_json("file 00", "", 10)[0])
        assert ([0, 0, 0, 0], [0, 0, 0, 1]) == ([e["downloads"] for e in first[:4]], [e["downloads"] for e in again[:4]])

    def test_a_name_added_or_removed_shows_in_the_next_listing(self, server):
        """Adding and removing names (a new catalog version) is seen by the next listing of a remembered search."""
        add_names(server, self.NAMES)
        before = self.pages(server, "file")
        add_names(server, ["file 100.bin"])
        server.remove_file("file 000.bin")
        assert (self.NAMES[:12], self.NAMES[1:12] + ["file 100.bin"]) == (before, self.pages(server, "file"))

    def test_a_name_gone_without_a_new_version_is_read_around(self, server, tmp_path):
        """A remembered name whose row is gone (a change not yet seen) leaves its page full, read the old way."""
        add_names(server, self.NAMES)
        self.pages(server, "file")
        other = sqlite3.connect(tmp_path / "db" / "server.sqlite3")
        with other:  # deletes the row, bumps no version
            other.execute("DELETE FROM files WHERE name = 'file 006.bin'")
        other.close()
        assert ((5, "file 010.bin", True), [name for name in self.NAMES[:12] if name != "file 006.bin"]) == (
            server.list_json("file", "file 004.bin", 5)[1:], self.pages(server, "file"))

    def test_too_many_matches_are_not_remembered(self, server, monkeypatch):
        """A search matching over LOOKUP_MAX_MATCHES names is paged without remembering them, to the same pages."""
        add_names(server, self.NAMES)
        monkeypatch.setattr(database, "LOOKUP_MAX_MATCHES", 3)
        assert (self.NAMES[:12], 12) == (self.pages(server, "file"), server.count_matching("file"))

    @pytest.mark.parametrize("bound", [database.LOOKUP_MAX_MATCHES, 3])
    def test_a_listing_counts_a_search_by_its_names(self, server, monkeypatch, bound):
        """A listing's count of a search is what the index counts, whether its names are remembered or too many."""
        add_names(server, self.NAMES)
        monkeypatch.setattr(database, "LOOKUP_MAX_MATCHES", bound)
        with ServerStore(server.path) as fresh:
            assert (12, 12, 1) == (server.count_listing("file"), fresh.count_matching("file"),
                                   server.count_listing("other"))

    def test_a_remembered_search_is_counted_from_its_names(self, server, tmp_path):
        """Once its pages were read, a search's count comes from the names remembered, and agrees with the index."""
        add_names(server, self.NAMES)
        self.pages(server, "file")
        with ServerStore(tmp_path / "db" / "server.sqlite3") as fresh:  # remembers nothing: counts by the index
            assert (12, 12) == (server.count_matching("file"), fresh.count_matching("file"))


class TestCatalogMigration:
    def test_version_one_catalog_migrates_and_lists(self, tmp_path):
        """A catalog written by schema version 1 opens at the current version and lists and searches correctly."""
        path = tmp_path / "old.sqlite3"

        class VersionOne(SQLiteStore):
            MIGRATIONS = ServerStore.MIGRATIONS[:1]

        names = ["Café.txt", "report 2024.pdf", "notes.md"]
        with VersionOne(path) as old, old._transaction() as connection:
            for name in names:
                manifest = manifest_of(name.encode())
                connection.execute(
                    "INSERT INTO files (name, name_folded, size, chunk_size, sha256, chunk_digests, added_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 1000.5)",
                    (name, fold(name), manifest.size, manifest.chunk_size, manifest.sha256, manifest.chunk_digests))
        with ServerStore(path) as store:
            add_names(store, ["CAFÉ 2.txt"])
            assert (len(ServerStore.MIGRATIONS), ["CAFÉ 2.txt", "Café.txt", "notes.md", "report 2024.pdf"]) == (
                store.schema_version, [r.name for r in store.list_files()])
            assert (["CAFÉ 2.txt", "Café.txt"], 2, ["report 2024.pdf"]) == (
                [r.name for r in store.list_files("café")], store.count_matching("café"),
                [e["name"] for e in json.loads(store.list_json("2024", "", 10)[0])])


class TestChangeEpochs:
    """Every change of a name is stamped with the epoch held then; removals leave tombstones (for failback)."""

    def test_an_add_is_stamped_with_the_current_epoch(self, server):
        """A file added at epoch 0, then one at epoch 4: each carries its own."""
        server.add_file("a.txt", manifest_of(b"a"))
        server.set_meta("epoch", "4")
        server.add_file("b.txt", manifest_of(b"b"))
        assert {"a.txt": (manifest_of(b"a").sha256, 0), "b.txt": (manifest_of(b"b").sha256, 4)} == server.change_epochs()

    def test_a_removal_leaves_a_tombstone_at_the_current_epoch(self, server):
        """Removing a name records (name, its content, epoch)."""
        server.add_file("a.txt", manifest_of(b"a"))
        server.set_meta("epoch", "7")
        server.remove_file("a.txt")
        assert [("a.txt", manifest_of(b"a").sha256, 7)] == server.removals()

    def test_adding_the_content_again_deletes_its_tombstone_only(self, server):
        """Re-adding a removed name with the same content clears that tombstone; another content leaves it."""
        server.add_file("a.txt", manifest_of(b"a"))
        server.add_file("b.txt", manifest_of(b"b"))
        server.remove_file("a.txt")
        server.remove_file("b.txt")
        server.add_file("a.txt", manifest_of(b"a"))
        server.add_file("b.txt", manifest_of(b"other"))
        assert [("b.txt", manifest_of(b"b").sha256, 0)] == server.removals()

    def test_only_the_newest_tombstones_are_kept(self, server, monkeypatch):
        """Past MAX_TOMBSTONES the oldest removals are forgotten, so an inventory stays bounded."""
        monkeypatch.setattr(database, "MAX_TOMBSTONES", 3)
        names = [f"f{i}.txt" for i in range(5)]
        for name in names:
            server.add_file(name, manifest_of(name.encode()))
        for name in names:
            server.remove_file(name)
        kept = [name for name, _, _ in server.removals()]
        assert (["f2.txt", "f3.txt", "f4.txt"], 3) == (kept, len(server.removals()))

    def test_a_rename_buries_the_old_name_and_stamps_the_new(self, server):
        """Renaming at epoch 3: a tombstone for the old name, the new name changed at 3."""
        manifest = manifest_of(b"a")
        server.add_file("old.txt", manifest)
        server.set_meta("epoch", "3")
        server.rename_files([("old.txt", "new.txt")])
        assert ([("old.txt", manifest.sha256, 3)], {"new.txt": (manifest.sha256, 3)}) == (
            server.removals(), server.change_epochs())


class TestAddFiles:
    def test_batch_is_one_transaction(self, server):
        """A batch with a name already taken adds nothing; a good batch bumps the catalog version once."""
        add_names(server, ["a.txt"])
        version = server.catalog_version()
        with pytest.raises(CatalogError, match="already in the catalog"):
            add_names(server, ["b.txt", "a.txt"])
        add_names(server, ["c.txt", "d.txt"])
        assert (["a.txt", "c.txt", "d.txt"], version + 1) == (
            [r.name for r in server.list_files()], server.catalog_version())


@pytest.fixture
def manifest_a() -> Manifest:
    return manifest_of(b"version one of the file", chunk_size=5)


def begin(store: PartialStore, manifest: Manifest, dest: str = "/dl/f.txt"):
    return store.begin_partial(dest, dest.rsplit("/", 1)[-1], manifest, dest + ".part", "1:2")


class TestPartialRecords:
    def test_begin_fresh(self, client, manifest_a):
        """A new partial file starts with nothing verified, its part file recorded, and is listed in progress."""
        state = begin(client, manifest_a)
        assert (set(), manifest_a, "/dl/f.txt.part", "1:2") == (state.verified, state.manifest, state.part_path,
                                                                 state.part_identity)
        assert [state] == client.in_progress()

    def test_partial_for_returns_the_verified_chunks(self, client, manifest_a):
        """The record for a destination comes back with the chunks marked so far (marking is idempotent)."""
        state = begin(client, manifest_a)
        client.mark_verified(state.id, [0, 2, 2])
        again = client.partial_for("/dl/f.txt")
        assert (state.id, {0, 2}) == (again.id, again.verified)
        assert None is client.partial_for("/dl/other.txt")

    def test_beginning_again_is_refused_and_the_record_kept(self, client, manifest_a):
        """A second part file for a destination already recorded is refused: the first record and its chunks stay."""
        state = begin(client, manifest_a)
        client.mark_verified(state.id, [0, 1])
        manifest_b = manifest_of(b"version two of the file!", chunk_size=5)
        with pytest.raises(CatalogError, match="already recorded"):
            begin(client, manifest_b)
        assert [(state.id, manifest_a, {0, 1})] == [(s.id, s.manifest, s.verified) for s in client.in_progress()]

    def test_abandon_is_by_id(self, client, manifest_a):
        """Abandoning a record that is gone does not touch the newer record for the same destination."""
        old = begin(client, manifest_a)
        client.abandon_partial(old.id)
        fresh = begin(client, manifest_a)
        client.mark_verified(fresh.id, [2])
        client.abandon_partial(old.id)
        assert [(fresh.id, {2})] == [(s.id, s.verified) for s in client.in_progress()]

    def test_partials_named(self, client, manifest_a):
        """The records begun under a name come back, with their chunks; other names do not."""
        state = begin(client, manifest_a)
        client.mark_verified(state.id, [1])
        begin(client, manifest_a, "/dl/g.txt")
        assert [("/dl/f.txt", {1})] == [(s.dest_path, s.verified) for s in client.partials_named("f.txt")]

    def test_mark_out_of_range_refused(self, client, manifest_a):
        """Marking a chunk the file does not have is a ValueError and marks nothing."""
        state = begin(client, manifest_a)
        with pytest.raises(ValueError, match="out of range"):
            client.mark_verified(state.id, [1, manifest_a.chunk_count])
        assert set() == client.in_progress()[0].verified

    def test_forget_verified(self, client, manifest_a):
        """Forgotten chunks leave the verified set; unknown ones are ignored."""
        state = begin(client, manifest_a)
        client.mark_verified(state.id, range(4))
        client.forget_verified(state.id, [1, 3, 4])
        assert {0, 2} == client.in_progress()[0].verified

    def test_client_finish_moves_to_completed(self, client, manifest_a):
        """A client's finished partial file moves to completed and out of in-progress."""
        state = begin(client, manifest_a)
        client.mark_verified(state.id, range(manifest_a.chunk_count))
        client.finish_partial(state.id, completed_at=42.0)
        assert [] == client.in_progress()
        [done] = client.completed_files()
        assert ("/dl/f.txt", "f.txt", manifest_a.size, manifest_a.sha256, manifest_a, 42.0) == (
            done.path, done.name, done.size, done.sha256, done.manifest, done.completed_at,
        )

    def test_plain_store_finish_forgets_the_record(self, tmp_path, manifest_a):
        """A replica's finished partial file leaves no record behind (there is no completed list)."""
        with PartialStore(tmp_path / "replica.db") as store:
            state = begin(store, manifest_a)
            store.finish_partial(state.id)
            assert [] == store.in_progress()

    def test_finish_unknown_refused(self, client):
        """Finishing a partial file that does not exist is a CatalogError."""
        with pytest.raises(CatalogError, match="no download"):
            client.finish_partial(12345)

    def test_abandon_cascades(self, client, manifest_a):
        """Abandoning a partial file deletes its verified chunks with it."""
        state = begin(client, manifest_a)
        client.mark_verified(state.id, [0, 1, 2])
        client.abandon_partial(state.id)
        connection = client._connection()
        assert ([], 0) == (
            client.in_progress(),
            connection.execute("SELECT COUNT(*) FROM verified_chunks").fetchone()[0],
        )

    def test_state_survives_reopen(self, tmp_path, manifest_a):
        """Verified chunks are still there after the store is reopened."""
        path = tmp_path / "c.db"
        with ClientStore(path) as store:
            state = begin(store, manifest_a)
            store.mark_verified(state.id, [1, 3])
        with ClientStore(path) as store:
            assert [{1, 3}] == [s.verified for s in store.in_progress()]

    def test_version_1_database_keeps_its_downloads(self, tmp_path, manifest_a):
        """A client database of schema 1 is migrated: its downloads, chunks and completed files stay."""
        path = tmp_path / "old.db"

        class Version1(SQLiteStore):
            MIGRATIONS = ClientStore.MIGRATIONS[:1]

        with Version1(path) as old:
            connection = old._connection()
            connection.execute(
                "INSERT INTO downloads (dest_path, name, size, chunk_size, sha256, started_at, chunk_digests)"
                " VALUES ('/dl/f.txt', 'f.txt', ?, ?, ?, 1.0, ?)",
                (manifest_a.size, manifest_a.chunk_size, manifest_a.sha256, manifest_a.chunk_digests))
            connection.execute("INSERT INTO verified_chunks VALUES (1, 0), (1, 3)")
        with ClientStore(path) as store:
            [state] = store.in_progress()
            assert ("/dl/f.txt.part", "", {0, 3}) == (state.part_path, state.part_identity, state.verified)
            store.finish_partial(state.id, completed_at=2.0)
            assert ["/dl/f.txt"] == [done.path for done in store.completed_files()]

    def test_concurrent_marks(self, client):
        """Threads marking different chunks of one download all land."""
        manifest = manifest_of(bytes(800), chunk_size=1)
        state = begin(client, manifest, "/dl/z")
        run_in_threads(8, lambda i: [client.mark_verified(state.id, [i * 100 + k])
                                     for k in range(100)])
        assert set(range(800)) == client.in_progress()[0].verified
