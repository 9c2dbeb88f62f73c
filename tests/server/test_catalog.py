"""Tests for catalog.py: importing files into the content-addressed store, naming, serving lookups."""
from __future__ import annotations

import hashlib
import sqlite3
import threading
from pathlib import Path

import pytest

from database import ServerStore
from error_handler import CatalogError
from integrity import Manifest
from minitorrent.server import catalog as catalog_module
from minitorrent.common.fs import ChunkLocation
from minitorrent.server.catalog import AddResult, Catalog, numbered_name
from minitorrent.wire.protocol import ErrorCode, RequestFailed

CHUNK_SIZE = 4  # bytes; small so a few bytes of content span several chunks
LONG_TIMEOUT = 30.0  # seconds; thread joins that should take milliseconds
THREADS = 8
ROUNDS = 15  # races are probabilistic: repeat to make a lost one likely to show


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def catalog(tmp_path):
    opened = Catalog(tmp_path / "data", CHUNK_SIZE)
    yield opened
    opened.close()


@pytest.fixture
def source(tmp_path):
    """Write ``data`` to ``tmp_path/src/<folder>/<name>`` and return its path.

    Different folders let one base name hold different contents.
    """
    def write(name: str, data: bytes, folder: str = "one") -> Path:
        path = tmp_path / "src" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    return write


def store_files(catalog: Catalog) -> list[str]:
    """Names of the files in the store folder, temp files included, sorted."""
    return sorted(path.name for path in catalog.store_dir.iterdir())


def names(catalog: Catalog) -> list[str]:
    return [entry["name"] for entry in catalog.list_files()[0]]


def run_in_threads(count: int, target) -> list:
    """Run target(i) on ``count`` threads released together; results by i; re-raise the first failure."""
    results: list = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def body(i: int) -> None:
        try:
            start.wait()
            results[i] = target(i)
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
    return results


class TestAddFile:
    def test_record_has_hash_size_and_chunks(self, catalog, source):
        """A new file is added with its SHA-256, size and chunk count."""
        data = b"0123456789"  # 10 bytes -> 3 chunks of 4
        result = catalog.add_file(source("a.txt", data))
        assert "added" == result.outcome
        assert "a.txt" == result.record.name
        assert sha256_of(data) == result.record.sha256
        assert 10 == result.record.size
        assert 3 == result.record.chunks
        assert CHUNK_SIZE == result.record.chunk_size

    def test_blob_is_stored_by_hash_and_identical(self, catalog, source):
        """The bytes land at store_dir/<sha256>, byte for byte, and nothing else is left."""
        data = b"the quick brown fox"
        catalog.add_file(source("fox.txt", data))
        assert data == (catalog.store_dir / sha256_of(data)).read_bytes()
        assert [sha256_of(data)] == store_files(catalog)

    def test_accepts_str_path(self, catalog, source):
        """A path given as a str is accepted like a Path."""
        result = catalog.add_file(str(source("s.txt", b"str path")))
        assert "added" == result.outcome

    def test_on_progress_counts_every_byte(self, catalog, source):
        """on_progress is told about every byte copied."""
        seen: list[int] = []
        catalog.add_file(source("p.bin", b"x" * 1000), on_progress=seen.append)
        assert 1000 == sum(seen)

    def test_add_result_is_frozen(self, catalog, source):
        """AddResult cannot be changed once returned."""
        result: AddResult = catalog.add_file(source("a.txt", b"x"))
        with pytest.raises(AttributeError):
            result.outcome = "other"  # type: ignore[misc]

    def test_same_file_again_is_unchanged(self, catalog, source):
        """Adding the same name with the same content is a no-op returning the existing record."""
        path = source("a.txt", b"same bytes")
        first = catalog.add_file(path)
        second = catalog.add_file(path)
        assert "unchanged" == second.outcome
        assert first.record == second.record
        assert ["a.txt"] == names(catalog)
        assert [sha256_of(b"same bytes")] == store_files(catalog)

    def test_same_content_under_new_name_shares_blob(self, catalog, source):
        """The same content under another name is added and stored once."""
        data = b"shared content"
        catalog.add_file(source("a.txt", data))
        result = catalog.add_file(source("b.txt", data))
        assert "added" == result.outcome
        assert ["a.txt", "b.txt"] == names(catalog)
        assert [sha256_of(data)] == store_files(catalog)

    def test_different_content_under_taken_name_is_numbered(self, catalog, source):
        """Different contents under one name become "name (2).ext", then "(3)"; the first keeps its name."""
        first = catalog.add_file(source("report.pdf", b"version one", "v1"))
        second = catalog.add_file(source("report.pdf", b"version two", "v2"))
        third = catalog.add_file(source("report.pdf", b"version three", "v3"))
        assert ("added", "report.pdf") == (first.outcome, first.record.name)
        assert ("renamed", "report (2).pdf") == (second.outcome, second.record.name)
        assert ("renamed", "report (3).pdf") == (third.outcome, third.record.name)

    def test_readding_numbered_content_is_unchanged(self, catalog, source):
        """Re-adding the second content finds it under "(2)" instead of making "(3)"."""
        catalog.add_file(source("report.pdf", b"version one", "v1"))
        catalog.add_file(source("report.pdf", b"version two", "v2"))
        again = catalog.add_file(source("report.pdf", b"version two", "v2 again"))
        assert ("unchanged", "report (2).pdf") == (again.outcome, again.record.name)
        assert ["report (2).pdf", "report.pdf"] == names(catalog)

    def test_rename_loses_nothing(self, catalog, source):
        """After a numbered add both names are listed and both blobs hold their own bytes."""
        one, two = b"version one", b"version two"
        catalog.add_file(source("report.pdf", one, "v1"))
        catalog.add_file(source("report.pdf", two, "v2"))
        entries = {entry["name"]: entry["sha256"] for entry in catalog.list_files()[0]}
        assert {"report.pdf": sha256_of(one), "report (2).pdf": sha256_of(two)} == entries
        assert one == (catalog.store_dir / sha256_of(one)).read_bytes()
        assert two == (catalog.store_dir / sha256_of(two)).read_bytes()
        assert sorted([sha256_of(one), sha256_of(two)]) == store_files(catalog)

    @pytest.mark.parametrize("name", [
        "my holiday photo.jpg",
        "café crème.txt",
        "party 🎉.mp3",
        "a|b.txt",
        "12:30 meeting.txt",
    ])
    def test_unusual_names_work(self, catalog, source, name):
        """Names with spaces, accents, emoji, "|" and ":" are added, listed and located."""
        data = name.encode("utf-8")
        result = catalog.add_file(source(name, data))
        assert ("added", name) == (result.outcome, result.record.name)
        assert [name] == names(catalog)
        location = catalog.locate_chunk(name, sha256_of(data), 0)
        assert str(catalog.store_dir / sha256_of(data)) == location.path

    def test_zero_byte_file(self, catalog, source):
        """An empty file is added with no chunks and an empty blob."""
        result = catalog.add_file(source("empty.txt", b""))
        assert ("added", 0, 0, sha256_of(b"")) == (
            result.outcome, result.record.size, result.record.chunks, result.record.sha256)
        assert b"" == (catalog.store_dir / sha256_of(b"")).read_bytes()

    def test_directory_is_refused(self, catalog, tmp_path):
        """A directory raises CatalogError with a one-line message, and nothing is added."""
        folder = tmp_path / "a folder"
        folder.mkdir()
        with pytest.raises(CatalogError) as raised:
            catalog.add_file(folder)
        message = str(raised.value)
        assert "\n" not in message
        assert "a folder" in message
        assert [] == names(catalog)
        assert [] == store_files(catalog)

    def test_missing_path_is_refused(self, catalog, tmp_path):
        """A path that does not exist raises CatalogError with a one-line message."""
        with pytest.raises(CatalogError) as raised:
            catalog.add_file(tmp_path / "nowhere.txt")
        assert "\n" not in str(raised.value)
        assert "nowhere.txt" in str(raised.value)
        assert [] == names(catalog)


class TestRemoveFile:
    def test_remove_deletes_unshared_blob(self, catalog, source):
        """Removing the only name of some content deletes its blob."""
        catalog.add_file(source("a.txt", b"alone"))
        assert True is catalog.remove_file("a.txt")
        assert [] == names(catalog)
        assert [] == store_files(catalog)

    def test_remove_keeps_shared_blob(self, catalog, source):
        """Removing one of two names sharing content keeps the blob for the other."""
        data = b"shared"
        catalog.add_file(source("a.txt", data))
        catalog.add_file(source("b.txt", data))
        catalog.remove_file("a.txt")
        assert ["b.txt"] == names(catalog)
        assert data == (catalog.store_dir / sha256_of(data)).read_bytes()
        catalog.remove_file("b.txt")
        assert [] == store_files(catalog)

    def test_remove_unknown_name(self, catalog):
        """Removing a name that is not shared returns False."""
        assert False is catalog.remove_file("ghost.txt")


class TestAddFiles:
    def test_batches_add_every_file_in_order(self, catalog, source, monkeypatch):
        """30 files in batches of 7: one outcome per path, in order, every blob stored; one catalog version per batch."""
        monkeypatch.setattr(catalog_module, "ADD_BATCH_FILES", 7)
        paths = [source(f"f{i:02d}.txt", b"content %d" % i) for i in range(30)]
        outcomes = list(catalog.add_files(paths))
        assert ([(path, "added") for path in paths], [p.name for p in paths], 5) == (
            [(path, outcome.outcome) for path, outcome in outcomes], names(catalog), catalog.db.catalog_version())
        assert [b"content %d" % i for i in range(30)] == [
            (catalog.store_dir / outcome.record.sha256).read_bytes() for _, outcome in outcomes]

    def test_one_name_twice_in_a_batch(self, catalog, source):
        """Within one batch, another content under a taken name is numbered and the same content is unchanged."""
        paths = [source("a.txt", b"one", "x"), source("a.txt", b"two", "y"), source("a.txt", b"one", "z")]
        outcomes = [outcome for _, outcome in catalog.add_files(paths)]
        assert ([("added", "a.txt"), ("renamed", "a (2).txt"), ("unchanged", "a.txt")], ["a (2).txt", "a.txt"]) == (
            [(o.outcome, o.record.name) for o in outcomes], names(catalog))

    def test_refused_paths_do_not_stop_the_others(self, catalog, source, tmp_path):
        """A missing path and a folder get their error; the files around them are added."""
        paths = [source("a.txt", b"a"), tmp_path / "missing.txt", tmp_path / "src", source("b.txt", b"b")]
        outcomes = [outcome for _, outcome in catalog.add_files(paths)]
        assert (["added", "no such file", "not a regular file", "added"], ["a.txt", "b.txt"]) == (
            [o.outcome if isinstance(o, AddResult) else str(o).rsplit(": ", 1)[1] for o in outcomes], names(catalog))
        assert [] == [name for name in store_files(catalog) if name.startswith(".incoming-")]

    def test_outcome_comes_once_committed(self, catalog, source, tmp_path):
        """When a file's outcome is yielded, another connection to the catalog already sees it."""
        paths = [source(f"f{i}.txt", b"%d" % i) for i in range(3)]
        with ServerStore(tmp_path / "data" / "catalog.db") as other:
            seen = [other.get_file(outcome.record.name) is not None for _, outcome in catalog.add_files(paths)]
        assert [True] * 3 == seen

    def test_name_taken_by_another_process_mid_batch(self, catalog, source, tmp_path, monkeypatch):
        """If another process takes a batch's name before it commits, that file is numbered and the rest added."""
        real_add_files = catalog.db.add_files

        def add_files_after_a_rival(entries):
            monkeypatch.setattr(catalog.db, "add_files", real_add_files)
            with ServerStore(tmp_path / "data" / "catalog.db") as rival:
                rival.add_file("b.txt", Manifest(0, CHUNK_SIZE, sha256_of(b""), b""))
            return real_add_files(entries)

        monkeypatch.setattr(catalog.db, "add_files", add_files_after_a_rival)
        outcomes = [outcome for _, outcome in catalog.add_files([source("a.txt", b"a"), source("b.txt", b"b")])]
        assert ([("added", "a.txt"), ("renamed", "b (2).txt")], ["a.txt", "b (2).txt", "b.txt"]) == (
            [(o.outcome, o.record.name) for o in outcomes], names(catalog))


class TestConcurrentAdds:
    def test_different_contents_under_one_name_all_land(self, catalog, source):
        """Threads adding different contents under one name all succeed, each under its own number."""
        for round_ in range(ROUNDS):
            name = f"r{round_}.txt"
            paths = [source(name, b"round %d content %d" % (round_, i), f"r{round_}-{i}") for i in range(THREADS)]
            results = run_in_threads(THREADS, lambda i: catalog.add_file(paths[i]))
            expected = [name] + [f"r{round_} ({n}).txt" for n in range(2, THREADS + 1)]
            assert sorted(expected) == sorted(result.record.name for result in results)
            assert THREADS == len({result.record.sha256 for result in results})

    def test_same_file_added_at_once_is_added_once(self, catalog, source):
        """Threads adding the same file at once: one adds it, the others find it unchanged."""
        for round_ in range(ROUNDS):
            path = source(f"r{round_}.txt", b"round %d" % round_)
            results = run_in_threads(THREADS, lambda i: catalog.add_file(path))
            assert ["added"] + ["unchanged"] * (THREADS - 1) == sorted(result.outcome for result in results)

    def test_remove_while_adding_same_content_keeps_blob(self, catalog, source):
        """Removing one name while the same content is added under another never loses the blob."""
        for round_ in range(ROUNDS):
            data = b"round %d" % round_
            catalog.add_file(source("old.txt", data))
            new = source("new.txt", data)
            run_in_threads(2, lambda i: catalog.add_file(new) if i == 0 else catalog.remove_file("old.txt"))
            assert ["new.txt"] == names(catalog)
            assert data == (catalog.store_dir / sha256_of(data)).read_bytes()
            catalog.remove_file("new.txt")


class TestPersistence:
    def test_leftover_temp_files_are_cleaned(self, tmp_path, source):
        """Temp files left by an interrupted import are deleted on start-up; blobs are kept."""
        data_dir = tmp_path / "data"
        with_blob = Catalog(data_dir, CHUNK_SIZE)
        with_blob.add_file(source("a.txt", b"kept"))
        with_blob.close()
        store_dir = data_dir / "store"
        (store_dir / ".incoming-0123abcd").write_bytes(b"half a cop")
        (store_dir / ".incoming-deadbeef").write_bytes(b"")
        reopened = Catalog(data_dir, CHUNK_SIZE)
        try:
            assert [sha256_of(b"kept")] == store_files(reopened)
        finally:
            reopened.close()

    def test_reopen_keeps_files_and_download_counts(self, tmp_path, source):
        """A catalog reopened on the same folder still has its files and download counts."""
        data_dir = tmp_path / "data"
        first = Catalog(data_dir, CHUNK_SIZE)
        a = first.add_file(source("a.txt", b"aaaa")).record
        first.add_file(source("b.txt", b"bbbb"))
        first.record_download("a.txt", a.sha256)
        first.record_download("a.txt", a.sha256)
        first.close()
        second = Catalog(data_dir, CHUNK_SIZE)
        try:
            assert ["a.txt", "b.txt"] == names(second)
            assert {"a.txt": 2, "b.txt": 0} == second.download_counts()
            assert b"aaaa" == (second.store_dir / a.sha256).read_bytes()
        finally:
            second.close()

    def test_record_download_of_old_version_is_not_counted(self, catalog, source):
        """A download reported with a sha256 that is no longer served is not counted."""
        catalog.add_file(source("a.txt", b"aaaa"))
        catalog.record_download("a.txt", sha256_of(b"old version"))
        assert {"a.txt": 0} == catalog.download_counts()

    def test_record_download_of_unknown_name(self, catalog):
        """Recording a download of an unknown name raises RequestFailed NOT_FOUND."""
        with pytest.raises(RequestFailed) as raised:
            catalog.record_download("ghost.txt", sha256_of(b""))
        assert ErrorCode.NOT_FOUND == raised.value.code


class TestServing:
    def test_locate_chunk(self, catalog, source):
        """Each chunk is found in the blob at its offset; the last one is short."""
        data = b"0123456789"
        sha = catalog.add_file(source("a.txt", data)).record.sha256
        blob = str(catalog.store_dir / sha)
        assert ChunkLocation(blob, 0, 4) == catalog.locate_chunk("a.txt", sha, 0)
        assert ChunkLocation(blob, 4, 4) == catalog.locate_chunk("a.txt", sha, 1)
        assert ChunkLocation(blob, 8, 2) == catalog.locate_chunk("a.txt", sha, 2)

    def test_locate_chunk_unknown_name(self, catalog):
        """An unknown name is NOT_FOUND."""
        with pytest.raises(RequestFailed) as raised:
            catalog.locate_chunk("ghost.txt", sha256_of(b""), 0)
        assert ErrorCode.NOT_FOUND == raised.value.code

    def test_locate_chunk_other_version(self, catalog, source):
        """A sha256 that is not the served content is STALE_VERSION."""
        catalog.add_file(source("a.txt", b"new content"))
        with pytest.raises(RequestFailed) as raised:
            catalog.locate_chunk("a.txt", sha256_of(b"old content"), 0)
        assert ErrorCode.STALE_VERSION == raised.value.code

    @pytest.mark.parametrize("index", [-1, 3, 100])
    def test_locate_chunk_out_of_range(self, catalog, source, index):
        """A chunk index outside [0, chunks) is OUT_OF_RANGE."""
        sha = catalog.add_file(source("a.txt", b"0123456789")).record.sha256
        with pytest.raises(RequestFailed) as raised:
            catalog.locate_chunk("a.txt", sha, index)
        assert ErrorCode.OUT_OF_RANGE == raised.value.code

    def test_empty_file_has_no_chunk(self, catalog, source):
        """Chunk 0 of an empty file is OUT_OF_RANGE."""
        sha = catalog.add_file(source("empty.txt", b"")).record.sha256
        with pytest.raises(RequestFailed) as raised:
            catalog.locate_chunk("empty.txt", sha, 0)
        assert ErrorCode.OUT_OF_RANGE == raised.value.code

    def test_manifest(self, catalog, source):
        """The manifest gives the header and one 32-byte digest per chunk."""
        data = b"0123456789"
        catalog.add_file(source("a.txt", data))
        header, digests = catalog.manifest("a.txt")
        expected = b"".join(hashlib.sha256(data[i:i + 4]).digest() for i in (0, 4, 8))
        assert expected == digests
        assert sha256_of(data) == header["sha256"]
        assert 10 == header["size"]

    def test_manifest_unknown_name(self, catalog):
        """The manifest of an unknown name is NOT_FOUND."""
        with pytest.raises(RequestFailed) as raised:
            catalog.manifest("ghost.txt")
        assert ErrorCode.NOT_FOUND == raised.value.code

    def test_list_files_entries(self, catalog, source):
        """Entries are JSON-safe dicts with name, size, chunks, sha256, root, downloads and added_at."""
        catalog.add_file(source("a.txt", b"abc"))
        [entry], _ = catalog.list_files()
        assert {"name", "size", "chunks", "sha256", "root", "downloads", "added_at"} == set(entry)
        assert ("a.txt", 3, 1, sha256_of(b"abc"), 0, catalog.db.get_manifest("a.txt").root) == (
            entry["name"], entry["size"], entry["chunks"], entry["sha256"], entry["downloads"], entry["root"])

    def test_damaged_digest_list_is_never_served(self, catalog, source):
        """Digests changed in the catalog no longer give the root stored beside them: the manifest is refused."""
        catalog.add_file(source("a.txt", b"abc" * 1000))
        with sqlite3.connect(catalog.db.path) as connection:  # as a damaged disk or another program would
            connection.execute("UPDATE files SET chunk_digests = zeroblob(length(chunk_digests)) WHERE name = 'a.txt'")
        with pytest.raises(RequestFailed) as refused:
            catalog.manifest("a.txt")
        assert (ErrorCode.STORAGE_ERROR, True) == (refused.value.code, "root does not match" in str(refused.value))

    def test_list_files_search_is_case_insensitive(self, catalog, source):
        """A search matches names containing it, whatever the case."""
        catalog.add_file(source("Holiday PHOTO.jpg", b"1"))
        catalog.add_file(source("notes.txt", b"2"))
        catalog.add_file(source("photos.zip", b"3"))
        assert ["Holiday PHOTO.jpg", "photos.zip"] == [e["name"] for e in catalog.list_files("Photo")[0]]
        assert ["Holiday PHOTO.jpg", "notes.txt", "photos.zip"] == [e["name"] for e in catalog.list_files("")[0]]
        assert ([], 0) == catalog.list_files("nothing")

    def test_count_files(self, catalog, source):
        """count_files gives the number of names and their total size."""
        catalog.add_file(source("a.txt", b"123"))
        catalog.add_file(source("b.txt", b"123"))
        catalog.add_file(source("c.txt", b"1234567"))
        assert (3, 13) == catalog.count_files()


LONG_NAME = "é" * 123 + ".bin"  # 250 bytes: a valid name, but "<name>.part" would pass 255


class TestPartFileRoom:
    def test_add_refuses_a_name_with_no_room_for_its_part_file(self, catalog, source):
        """A file whose "<name>.part" could not exist on a client's disk is refused at add time; nothing is added."""
        with pytest.raises(CatalogError) as caught:
            catalog.add_file(source(LONG_NAME, b"data"))
        assert ("partial download" in str(caught.value), [], []) == (True, names(catalog), store_files(catalog))

    def test_add_folder_skips_such_a_file_with_a_warning(self, catalog, tmp_path):
        """In a folder, such a file is skipped with one warning; the others are added."""
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree" / LONG_NAME).write_bytes(b"long")
        (tmp_path / "tree" / "ok.txt").write_bytes(b"ok")
        results, warnings = catalog.add_folder(tmp_path / "tree")
        assert (["tree/ok.txt"], 1) == ([result.record.name for result in results], len(warnings))
        assert "partial download" in warnings[0]

    def test_a_replica_with_such_a_name_is_refused(self, catalog, source):
        """put_replica refuses the name too: the main is no authority on what a disk can hold."""
        catalog.add_file(source("a.txt", b"123"))
        manifest, _ = catalog.manifest("a.txt")
        with pytest.raises(CatalogError):
            catalog.put_replica(LONG_NAME, Manifest.from_header(manifest, catalog.manifest("a.txt")[1]), 1.0)
        assert ["a.txt"] == names(catalog)

    def test_a_numbered_name_past_the_limit_is_refused(self, catalog, source):
        """A taken name's numbered twin ("x (2).bin") that would leave no room for a part file is refused."""
        name = "a" * 240 + ".bin"  # 244 bytes: fits; "a...a (2).bin" (248) does not
        catalog.add_file(source(name, b"one", "one"))
        with pytest.raises(CatalogError):
            catalog.add_file(source(name, b"two", "two"))
        assert [name] == names(catalog)


class TestNumberedName:
    @pytest.mark.parametrize("name, expected", [
        ("a.txt", "a (2).txt"),
        ("noext", "noext (2)"),
        (".bashrc", ".bashrc (2)"),  # a dot-file's dot does not start a suffix
        ("archive.tar.gz", "archive.tar (2).gz"),  # only the last suffix stays at the end
        ("my file.v1.pdf", "my file.v1 (2).pdf"),
    ])
    def test_number_goes_before_last_suffix(self, name, expected):
        """The number is inserted before the last suffix, or appended when there is none."""
        assert expected == numbered_name(name, 2)

    def test_larger_numbers(self):
        """Any number is formatted in parentheses."""
        assert "a (13).txt" == numbered_name("a.txt", 13)
