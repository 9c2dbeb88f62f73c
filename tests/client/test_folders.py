"""Folders end to end over real sockets: shared whole, listed, downloaded with structure and checks."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import make_config, make_file, swap_for_a_fifo_when_opened

from error_handler import DownloadCancelled, DownloadError, MiniTorrentError
from integrity import Manifest, sha256_file
from minitorrent.client.engine import ClientEngine
from minitorrent.client.folders import STAGING, FolderResult, FolderSummary, staging_key, summarize_folders
from minitorrent.client.progress import Progress
from minitorrent.net import serving
from minitorrent.server.main import MainServer
from minitorrent.wire import protocol

CHUNK = 64 * 1024


def engine_for(tmp_path: Path, server, **kw) -> ClientEngine:
    host, port = server.server.address
    return ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"host": host, "port": port}}}), **kw)


def serve_photos(server_factory, photos: Path) -> MainServer:
    """A server (chunks of ``CHUNK``) sharing the ``photos`` folder."""
    server = server_factory({"transfer": {"chunk_size": CHUNK}})
    server.add_folder(photos)
    return server


def serve_many(tmp_path: Path, server_factory, count: int) -> tuple[Path, MainServer]:
    """(the folder ``many``, a server sharing it): ``count`` files of 100 bytes, f000.bin and on."""
    source = tmp_path / "src" / "many"
    for i in range(count):
        make_file(source / f"f{i:03d}.bin", 100, seed=i)
    server = server_factory()
    server.add_folder(source)
    return source, server


def fails_with(tmp_path: Path, server, match: str) -> None:
    """photos/ downloaded into ``tmp_path/out`` by an engine of its own raises a DownloadError matching ``match``."""
    engine = engine_for(tmp_path, server)
    try:
        with pytest.raises(DownloadError, match=match):
            engine.download_folder("photos/", tmp_path / "out")
    finally:
        engine.close()


def plant_own_notes(output: Path) -> Path:
    """The user's own ``photos/notes.txt`` in ``output``, other content than the served one's, before a download."""
    mine = output / "photos" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own notes")
    return mine

def fetch_folder(tmp_path: Path, server, folder: str, output: Path, **kw) -> FolderResult:
    """``folder`` downloaded into ``output`` by a client engine of its own (``engine_for``), closed after."""
    engine = engine_for(tmp_path, server, **kw)
    try:
        return engine.download_folder(folder, output)
    finally:
        engine.close()


def progress_of_runs(tmp_path: Path, server_factory, photos: Path, runs: int = 1) -> list[list[Progress]]:
    """Share ``photos`` (in CHUNK chunks), download photos/ ``runs`` times; each run's progress reports."""
    server = serve_photos(server_factory, photos)
    seen: list[Progress] = []
    reports = []
    engine = engine_for(tmp_path, server, on_progress=seen.append)
    try:
        for _ in range(runs):
            engine.download_folder("photos/", tmp_path / "out")
            reports.append(list(seen))
            seen.clear()
    finally:
        engine.close()
    return reports


def stop_on_a_planted_file(tmp_path: Path, server_factory, monkeypatch) -> tuple[Path, MainServer, bool, FolderResult]:
    """A folder of 70 files whose download stops (DownloadError) at many/b/f66.bin, in its 9th batch of 8: a file is
    planted where its staged folder goes; then, that file gone, run again. (source, server, whether the first run
    placed anything, the second run's result)."""
    from minitorrent.client import folders

    monkeypatch.setattr(folders, "BATCH_BYTES", 8 * 100)  # batches of 8: the progress is told after the 64th
    source = tmp_path / "src" / "many"
    for i in range(70):
        make_file(source / ("a" if i < 66 else "b") / f"f{i:02d}.bin", 100, seed=i)
    server = server_factory()
    server.add_folder(source)
    in_the_way = tmp_path / "out" / STAGING / staging_key("many/") / "b"

    def plant(progress: Progress) -> None:  # called after the 64th file is staged: b/f66.bin is still to come
        if in_the_way.parent.is_dir() and not in_the_way.exists():
            in_the_way.write_bytes(b"not a folder")
    engine = engine_for(tmp_path, server, on_progress=plant)
    try:
        with pytest.raises(DownloadError, match="cannot stage many/b/f66.bin"):
            engine.download_folder("many/", tmp_path / "out")
        placed = (tmp_path / "out" / "many").exists()
        engine.on_progress = None
        in_the_way.unlink()
        result = engine.download_folder("many/", tmp_path / "out")
    finally:
        engine.close()
    return source, server, placed, result


def paused_then_resumed(engine: ClientEngine, cancel: threading.Event, output: Path) -> FolderResult:
    """many/ downloaded into ``output`` until ``cancel`` stops it (DownloadCancelled), then again to its end, with no
    progress callback: the second run's result. The engine is closed after."""
    try:
        with pytest.raises(DownloadCancelled):
            engine.download_folder("many/", output, cancel)
        engine.on_progress = None
        return engine.download_folder("many/", output)
    finally:
        engine.close()


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (staging excluded)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*")
            if p.is_file() and STAGING not in p.parts}


def staged_files(staging: Path) -> int:
    """How many files are staged under ``staging`` (at any depth)."""
    return sum(len(names) for _, _, names in os.walk(staging))


@pytest.fixture
def photos(tmp_path) -> Path:
    """A small tree: nested folders, a multi-chunk file, an empty file, an empty folder, duplicated content."""
    root = tmp_path / "src" / "photos"
    make_file(root / "2024" / "beach.jpg", 3000, seed=1)
    make_file(root / "2024" / "summer" / "big.raw", 3 * CHUNK + 5, seed=2)
    make_file(root / "notes.txt", 0)
    make_file(root / "copy of beach.jpg", 3000, seed=1)
    make_file(root / "Case.txt", 10, seed=3)
    make_file(root / "case.txt", 11, seed=4)
    (root / "empty folder").mkdir()
    return root


class TestFolderDownload:
    def test_structure_and_content_preserved(self, tmp_path, server_factory, photos):
        """get photos/ recreates every file at its relative path, byte-exact, with no staging left."""
        server = serve_photos(server_factory, photos)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert tree(photos.parent) == tree(tmp_path / "out")
        assert (6, 6, []) == (result.files, result.downloaded, result.failed)
        assert not (tmp_path / "out" / STAGING).exists()

    def test_second_run_finds_everything_present(self, tmp_path, server_factory, photos):
        """Running the same folder download again fetches nothing and counts every file as present."""
        server = serve_photos(server_factory, photos)
        engine = engine_for(tmp_path, server)
        try:
            engine.download_folder("photos", tmp_path / "out")
            again = engine.download_folder("photos/", tmp_path / "out")
        finally:
            engine.close()
        assert (0, 6, 0) == (again.downloaded, again.present, again.fetched_bytes)

    def test_staged_file_from_a_crash_is_reused_and_a_damaged_one_refetched(self, tmp_path, server_factory, photos):
        """A staged file that still hashes to its version is placed without a fetch; a damaged one is fetched
        again; one the folder does not list is removed, never placed."""
        server = serve_photos(server_factory, photos)
        staged = tmp_path / "out" / STAGING / staging_key("photos/")
        (staged / "2024").mkdir(parents=True)
        os.link(photos / "Case.txt", staged / "Case.txt")
        (staged / "case.txt").write_bytes(b"not the content")
        (staged / "2024" / "not listed.txt").write_bytes(b"left by someone")
        outside = tmp_path / "outside.txt"
        outside.write_bytes(b"")  # the content notes.txt (empty) is listed with
        (staged / "notes.txt").symlink_to(outside)  # a link planted where a staged file goes: removed, not followed
        os.mkfifo(staged / "2024" / "beach.jpg")  # a FIFO: never read (it would block), removed
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert (tree(photos.parent), False) == (tree(tmp_path / "out"), (tmp_path / "out" / STAGING).exists())
        assert (3000 + 11 + 3 * CHUNK + 5, False) == (result.fetched_bytes,  # Case.txt (10 bytes) came from staging
                                                     (tmp_path / "out" / "photos" / "notes.txt").is_symlink())

    def test_without_renameat2_the_folder_is_placed_file_by_file(self, tmp_path, server_factory, photos, monkeypatch):
        """Where renameat2 is missing (a folder cannot be linked, so not moved without a risk of replacing), the
        staged tree is placed file by file with link and unlink: every file arrives, nothing is left staged."""
        from minitorrent.common import fs

        monkeypatch.setattr(fs, "_renameat2", None)
        server = serve_photos(server_factory, photos)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert (tree(photos.parent), [], 6, False) == (tree(tmp_path / "out"), result.failed, result.downloaded,
                                                       (tmp_path / "out" / STAGING).exists())

    def test_a_crash_while_placing_file_by_file_resumes(self, tmp_path, server_factory, photos):
        """As a crash while placing leaves it (some files at their final names, some still staged): the next run
        keeps the placed ones, places the staged ones without a fetch, and fetches only the rest."""
        server = serve_photos(server_factory, photos)
        out = tmp_path / "out"
        (out / "photos").mkdir(parents=True)
        os.link(photos / "Case.txt", out / "photos" / "Case.txt")  # placed before the crash
        staged = out / STAGING / staging_key("photos/")
        (staged / "2024").mkdir(parents=True)
        os.link(photos / "2024" / "beach.jpg", staged / "2024" / "beach.jpg")  # verified, staged, not yet placed
        result = fetch_folder(tmp_path, server, "photos/", out)
        assert (tree(photos.parent), 1, 5, 11 + 3 * CHUNK + 5) == (
            tree(out), result.present, result.downloaded, result.fetched_bytes)  # only case.txt and big.raw fetched

    def test_a_file_where_the_staged_tree_goes_fails_with_one_line(self, tmp_path, server_factory, photos):
        """Something not a folder where the staged tree goes: the download fails with a DownloadError, no traceback,
        and a later run, once it is gone, succeeds (the staging lock was let go)."""
        server = serve_photos(server_factory, photos)
        planted = tmp_path / "out" / STAGING / staging_key("photos/")
        planted.parent.mkdir(parents=True)
        planted.write_bytes(b"not a folder")
        engine = engine_for(tmp_path, server)
        try:
            with pytest.raises(DownloadError, match="cannot stage"):
                engine.download_folder("photos/", tmp_path / "out")
            planted.unlink()
            result = engine.download_folder("photos/", tmp_path / "out")
        finally:
            engine.close()
        assert ([], tree(photos.parent)) == (result.failed, tree(tmp_path / "out"))

    def test_a_disk_error_while_placing_fails_with_one_line_and_keeps_what_was_verified(self, tmp_path, server_factory,
                                                                                        photos, monkeypatch):
        """The disk failing to sync the staged files (EIO): a DownloadError saying so, not a bare OSError; nothing
        under a final name; the next run places what was staged without fetching it again."""
        from minitorrent.client import folders

        def failing_disk(path: str) -> None:
            raise OSError(errno.EIO, "Input/output error")
        server = serve_photos(server_factory, photos)
        engine = engine_for(tmp_path, server)
        try:
            with monkeypatch.context() as patched:
                patched.setattr(folders, "sync_filesystem", failing_disk)
                with pytest.raises(DownloadError, match="cannot place it in .*: Input/output error; what was verified"):
                    engine.download_folder("photos/", tmp_path / "out")
            placed = (tmp_path / "out" / "photos").exists()
            result = engine.download_folder("photos/", tmp_path / "out")
        finally:
            engine.close()
        assert (False, [], tree(photos.parent), 3 * CHUNK + 5) == (placed, result.failed, tree(tmp_path / "out"),
                                                                    result.fetched_bytes)  # only big.raw fetched again

    def test_an_output_folder_that_cannot_be_made_fails_with_one_line(self, tmp_path, server_factory, photos):
        """A file where the output folder goes: a DownloadError naming it, not a bare FileExistsError."""
        server = serve_photos(server_factory, photos)
        (tmp_path / "out").write_bytes(b"a file, not a folder")
        fails_with(tmp_path, server, "cannot write in")

    def test_a_file_that_cannot_be_staged_stops_the_folder_with_one_line(self, tmp_path, server_factory,
                                                                         monkeypatch):
        """A staged file that cannot be written (a file made where its staged folder goes once staging began):
        DownloadError, not a traceback; nothing placed; once it is gone, the next run completes."""
        source, _, placed, result = stop_on_a_planted_file(tmp_path, server_factory, monkeypatch)
        assert (False, [], tree(source.parent)) == (placed, result.failed, tree(tmp_path / "out"))

    def test_files_staged_in_the_batch_that_stopped_the_folder_are_counted_once(self, tmp_path, server_factory,
                                                                               monkeypatch):
        """The folder stopped mid-batch (a file that cannot be staged): the batch's files staged before it are
        counted, once, though the next run places them as kept from staging."""
        from minitorrent.client import folders

        monkeypatch.setattr(folders, "BATCHES_IN_FLIGHT", 1)  # no earlier report unanswered when the folder stops
        source, server, _, _ = stop_on_a_planted_file(tmp_path, server_factory, monkeypatch)
        assert {name: 1 for name in server.catalog.names_at("many/")} == server.catalog.download_counts()

    def test_a_link_planted_at_a_staged_name_is_never_written_through(self, tmp_path, server_factory, monkeypatch):
        """A hard link planted in the staged tree where a file is about to be staged: the file it links to keeps its
        bytes (staged files are created, never truncated), that one file fails with one line, the others arrive."""
        from minitorrent.client import folders

        monkeypatch.setattr(folders, "BATCH_BYTES", 8 * 100)  # batches of 8: the progress is told after the 64th
        source = tmp_path / "src" / "many"
        for i in range(70):
            make_file(source / f"f{i:02d}.bin", 100, seed=i)
        server = server_factory()
        server.add_folder(source)
        victim = tmp_path / "victim.txt"
        victim.write_bytes(b"precious")
        planted = tmp_path / "out" / STAGING / staging_key("many/") / "f66.bin"

        def plant(progress: Progress) -> None:  # called after the 64th file is staged: f66.bin is still to come
            if planted.parent.is_dir() and not planted.exists():
                os.link(victim, planted)
        result = fetch_folder(tmp_path, server, "many/", tmp_path / "out", on_progress=plant)
        assert (b"precious", 69, ["many/f66.bin"]) == (victim.read_bytes(), result.downloaded,
                                                       [line.split(": something else is staged")[0]
                                                        for line in result.failed])

    def test_a_second_download_of_the_same_folder_into_the_same_place_is_refused(self, tmp_path, server_factory,
                                                                                 photos):
        """While one download stages photos/ in out/, another one of photos/ there fails with one line and places
        nothing; once the first is done, it runs."""
        server = serve_photos(server_factory, photos)
        staging = tmp_path / "out" / STAGING
        staging.mkdir(parents=True)
        holder = os.open(staging / (staging_key("photos/") + ".lock"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(holder, fcntl.LOCK_EX)  # the first download, in another process
        engine = engine_for(tmp_path, server)
        try:
            with pytest.raises(DownloadError, match="another download of that folder is running there"):
                engine.download_folder("photos/", tmp_path / "out")
            placed_meanwhile = sorted(p.name for p in (tmp_path / "out").glob("photos/*"))
            os.close(holder)
            result = engine.download_folder("photos/", tmp_path / "out")
        finally:
            engine.close()
        assert ([], 6, [], tree(photos.parent)) == (placed_meanwhile, result.downloaded, result.failed,
                                                    tree(tmp_path / "out"))

    def test_a_staging_folder_removed_by_another_download_as_this_one_opens_it_is_made_again(
            self, tmp_path, server_factory, photos, monkeypatch):
        """Another download ending removes the staging folder, empty, between this one's opening it and making its
        lock file there (a window runs many downloads at once): it is made again and the download completes."""
        from minitorrent.client import folders

        lock_staging = folders._lock_staging
        removed: list[bool] = []

        def others_end_first(folder_fd: int, name: str, what: str) -> int:
            if not removed:
                (tmp_path / "out" / STAGING).rmdir()  # as the other download's close() does when it finds it empty
                removed.append(True)
            return lock_staging(folder_fd, name, what)
        monkeypatch.setattr(folders, "_lock_staging", others_end_first)
        server = serve_photos(server_factory, photos)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert ([True], [], tree(photos.parent)) == (removed, result.failed, tree(tmp_path / "out"))

    def test_existing_different_file_is_not_overwritten(self, tmp_path, server_factory, photos):
        """A file already at a final name with other content is reported and kept; the rest arrive."""
        server = serve_photos(server_factory, photos)
        mine = plant_own_notes(tmp_path / "out")
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert b"my own notes" == mine.read_bytes()
        assert (5, 1) == (result.downloaded, len(result.failed))

    @pytest.mark.timeout(30)
    def test_a_fifo_swapped_in_before_the_hash_never_blocks(self, tmp_path, server_factory, photos, monkeypatch):
        """A file at a final name swapped for a FIFO just before it is opened to be hashed: that file is refused as
        another file (what was opened is checked, never read), the rest arrive."""
        server = serve_photos(server_factory, photos)
        mine = plant_own_notes(tmp_path / "out")
        monkeypatch.setattr(os, "open", swap_for_a_fifo_when_opened(mine))
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert (5, [f"{mine} already exists with different content; not overwriting it"]) == (result.downloaded,
                                                                                             result.failed)

    def test_a_file_appearing_at_a_final_name_during_the_download_is_kept(self, tmp_path, server_factory, photos):
        """A file made at a final name after the listing is not replaced; its twin of the same content still arrives."""
        server = serve_photos(server_factory, photos)
        theirs = tmp_path / "out" / "photos" / "2024" / "beach.jpg"

        def appear(progress: Progress) -> None:  # the first report comes after the listing, before any install
            if progress.name == "photos/" and not theirs.exists():
                theirs.parent.mkdir(parents=True, exist_ok=True)
                theirs.write_bytes(b"made meanwhile")
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out", on_progress=appear)
        copy = tmp_path / "out" / "photos" / "copy of beach.jpg"
        assert (b"made meanwhile", sha256_file(photos / "copy of beach.jpg")) == (theirs.read_bytes(), sha256_file(copy))
        assert (5, 1, []) == (result.downloaded, len(result.failed), os.listdir(tmp_path / "out" / STAGING)
                              if (tmp_path / "out" / STAGING).exists() else [])

    def test_one_progress_for_the_folder_reaching_all_files(self, tmp_path, server_factory, photos):
        """The folder's own progress ends at every file done; the multi-chunk file reports its own too."""
        [seen] = progress_of_runs(tmp_path, server_factory, photos)
        folder = [p for p in seen if p.name == "photos/"]
        assert (6, 6) == (folder[-1].chunks_done, folder[-1].chunks_total)
        assert {"photos/", "photos/2024/summer/big.raw"} == {p.name for p in seen}

    def test_the_folder_progress_tells_each_file_state(self, tmp_path, server_factory, photos):
        """Every file of the folder is told done once (the small ones verified first), a second run all done."""
        first, second = ([change for p in run if p.name == "photos/" for change in p.files]
                         for run in progress_of_runs(tmp_path, server_factory, photos, runs=2))
        names = {f"photos/{p.relative_to(photos).as_posix()}" for p in photos.rglob("*") if p.is_file()}
        assert sorted(names) == sorted(name for name, state in first if state == "done")
        small = names - {"photos/2024/summer/big.raw", "photos/copy of beach.jpg"}  # a twin's content is fetched once
        assert sorted(small) == sorted(name for name, state in first if state == "verified")
        assert sorted((name, "done") for name in names) == sorted(second)

    def test_a_file_that_fails_is_told_failed(self, tmp_path, server_factory, photos):
        """A file that cannot be written is reported failed in the folder's progress, by name."""
        server = serve_photos(server_factory, photos)
        plant_own_notes(tmp_path / "out")
        seen: list[Progress] = []
        fetch_folder(tmp_path, server, "photos/", tmp_path / "out", on_progress=seen.append)
        assert [("photos/notes.txt", "failed")] == [c for p in seen for c in p.files if c[1] == "failed"]

    def test_unknown_folder_fails_with_one_line(self, tmp_path, server_factory, photos):
        """A folder the server does not share is a DownloadError naming it."""
        server = server_factory()
        server.add_folder(photos)
        engine = engine_for(tmp_path, server)
        try:
            with pytest.raises(DownloadError) as caught:
                engine.download_folder("videos/", tmp_path / "out")
        finally:
            engine.close()
        assert "videos/: no such folder on the server" == str(caught.value)

    def test_deep_tree(self, tmp_path, server_factory):
        """A file 40 folders deep is shared and downloaded at the same depth."""
        deep = tmp_path / "src" / "deep"
        leaf = deep.joinpath(*[f"d{i}" for i in range(40)]) / "leaf.txt"
        make_file(leaf, 100, seed=9)
        server = server_factory()
        server.add_folder(deep)
        fetch_folder(tmp_path, server, "deep/", tmp_path / "out")
        assert tree(deep.parent) == tree(tmp_path / "out")


class TestDestinationStaysInside:
    def test_link_inside_the_output_folder_is_not_followed_out(self, tmp_path, server_factory, photos):
        """If the output folder holds photos -> elsewhere, nothing is written through the link."""
        server = server_factory()
        server.add_folder(photos)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "photos").symlink_to(elsewhere)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert ([], 6) == (list(elsewhere.iterdir()), len(result.failed))


    def test_a_link_planted_after_the_checks_is_not_followed_out(self, tmp_path, server_factory):
        """photos -> elsewhere made once the names are checked (at the first progress report): no small file lands
        there."""
        server = server_factory()
        for name in ("2024/beach.jpg", "2024/summer/sea.jpg", "notes.txt"):
            make_file(tmp_path / "src" / "photos" / name, 3000, seed=len(name))
        server.add_folder(tmp_path / "src" / "photos")
        elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
        elsewhere.mkdir()
        out.mkdir()

        def plant_link(progress: Progress) -> None:
            if not (out / "photos").is_symlink():  # another process on the machine, racing the download
                (out / "photos").symlink_to(elsewhere)

        result = fetch_folder(tmp_path, server, "photos/", out, on_progress=plant_link)
        assert ([], 3) == (sorted(p.name for p in elsewhere.rglob("*")), len(result.failed))


    def test_a_folder_swapped_for_a_link_mid_file_does_not_take_a_big_file_out(self, tmp_path, server_factory):
        """photos swapped for photos -> elsewhere while a multi-chunk file arrives: it is installed in the folder
        it started in, nothing lands elsewhere."""
        server = server_factory({"transfer": {"chunk_size": CHUNK}})
        make_file(tmp_path / "src" / "photos" / "big.raw", 8 * CHUNK, seed=4)
        server.add_folder(tmp_path / "src" / "photos")
        elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
        elsewhere.mkdir()
        out.mkdir()
        swapped: list[bool] = []

        def swap_folder(progress: Progress) -> None:
            if not swapped and 0 < progress.done_bytes < progress.total_bytes:  # big.raw.part is being filled
                (out / "photos").rename(out / "moved")  # another process on the machine, racing the download
                (out / "photos").symlink_to(elsewhere)
                swapped.append(True)

        fetch_folder(tmp_path, server, "photos/", out, on_progress=swap_folder)
        assert ([True], [], (tmp_path / "src" / "photos" / "big.raw").read_bytes()) == (
            swapped, sorted(p.name for p in elsewhere.rglob("*")), (out / "moved" / "big.raw").read_bytes())


NOBODY = 65534  # another user's uid: chown needs root, which this suite runs as


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
class TestStagingOfAnotherUser:
    @pytest.mark.parametrize("theirs", ["staging folder", "staged tree"])
    def test_a_staging_folder_another_user_made_is_refused(self, tmp_path, server_factory, photos, theirs):
        """Another user who made the staging folder (or this folder's staged tree) first, where they may write
        (/tmp): the download fails with one line and places nothing, so no folder of theirs becomes the download."""
        server = serve_photos(server_factory, photos)
        staging = tmp_path / "out" / STAGING
        staged = staging / staging_key("photos/")
        staged.mkdir(parents=True)
        their_folder = staging if theirs == "staging folder" else staged
        os.chown(their_folder, NOBODY, NOBODY)
        before = sorted(os.listdir(their_folder))
        fails_with(tmp_path, server, "belongs to another user")
        assert (False, before) == ((tmp_path / "out" / "photos").exists(), sorted(os.listdir(their_folder)))

    def test_a_staged_file_of_another_user_is_fetched_again_not_reused(self, tmp_path, server_factory, photos):
        """A staged file that hashes right but is another user's (they could rewrite it once placed) is removed and
        fetched again: every file placed is ours."""
        server = serve_photos(server_factory, photos)
        staging = tmp_path / "out" / STAGING
        staged = staging / staging_key("photos/")
        staged.mkdir(parents=True)
        staging.chmod(0o777)
        (staged / "Case.txt").write_bytes((photos / "Case.txt").read_bytes())
        os.chown(staged / "Case.txt", NOBODY, NOBODY)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        owners = {p.stat().st_uid for p in (tmp_path / "out" / "photos").rglob("*")}
        assert (tree(photos.parent), {os.geteuid()}, 3000 + 10 + 11 + 3 * CHUNK + 5) == (
            tree(tmp_path / "out"), owners, result.fetched_bytes)


class TestSummarizeFolders:
    def test_every_depth_counted(self):
        """Each folder counts the files and bytes under it at any depth."""
        entries = [{"name": "a/b/c.txt", "size": 5}, {"name": "a/d.txt", "size": 7}, {"name": "top.txt", "size": 1}]
        assert [FolderSummary("a/", 2, 12), FolderSummary("a/b/", 1, 5)] == summarize_folders(entries)


class TestLyingServer:
    HOSTILE = ["photos/../../escape.txt", "photos//x.txt", "photos/a\x00b.txt", "photos/./x.txt",
               "photos/" + "n" * 300 + ".txt", "photos/a\nb.txt", "photos/..", "photos/sub/../../../escape2.txt"]

    def test_hostile_names_in_a_listing_never_reach_disk(self, tmp_path, server_factory, photos):
        """Names a server should never send (.., empty, NUL, control, over-long) are refused; good files still arrive."""
        server = server_factory()
        server.add_folder(photos)
        record = server.catalog.db.get_file("photos/Case.txt")
        manifest = server.catalog.db.get_manifest(record.name)
        for name in self.HOSTILE:  # the lying server's own database, written behind its catalog's checks
            server.catalog.db.add_file(name, manifest)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "escape" in p.name)
        assert ([], len(self.HOSTILE), 6) == (written, len(result.failed), result.downloaded)


    def test_a_name_listed_as_a_file_and_as_a_folder_fails_alone(self, tmp_path, server_factory, photos):
        """A listing naming photos/Case.txt and photos/Case.txt/inner.txt (a catalog never does): the one that cannot
        be staged fails with a line, the folder's other files arrive (the download is not stopped, run after run)."""
        server = serve_photos(server_factory, photos)
        make_file(tmp_path / "elsewhere" / "other" / "inner.txt", 7, seed=9)
        server.add_folder(tmp_path / "elsewhere" / "other")
        manifest = server.catalog.db.get_manifest("other/inner.txt")
        server.catalog.db.add_file("photos/Case.txt/inner.txt", manifest)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert (6, ["photos/Case.txt/inner.txt"], tree(photos.parent)) == (
            result.downloaded, [line.split(": ")[0] for line in result.failed], tree(tmp_path / "out"))

    def test_a_small_file_listed_with_a_terabyte_is_refused_not_allocated(self, tmp_path, server_factory, photos):
        """A listing entry of one chunk claiming 1 TiB fails alone (no buffer of that size); the rest arrive."""
        server = server_factory()
        server.add_folder(photos)
        huge = 2**40
        server.catalog.db.add_file("photos/huge.bin", Manifest(huge, huge, "0" * 64, bytes(32)))
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert (1, 6, True) == (len(result.failed), result.downloaded, "photos/huge.bin" in result.failed[0])


    def test_a_small_file_listed_with_a_negative_size_fails_with_a_line_not_silently(self, tmp_path, server_factory,
                                                                                      photos, monkeypatch):
        """A listing entry of one chunk claiming -5 bytes is listed as failed (never fetched, never dropped unsaid):
        the folder's result accounts for every file listed."""
        from minitorrent.net.remote import ServerClient

        list_files = ServerClient.list_files

        def lying(client, search="", under="", counts=True):
            entries = list_files(client, search, under, counts)
            return [dict(entry, size=-5) if entry["name"] == "photos/Case.txt" else entry for entry in entries]
        monkeypatch.setattr(ServerClient, "list_files", lying)
        server = serve_photos(server_factory, photos)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert (5, ["photos/Case.txt"]) == (result.downloaded, [line.split(":")[0] for line in result.failed])


class TestStagingNameReserved:
    def test_a_served_folder_named_like_the_staging_folder_is_not_written_there(self, tmp_path, server_factory,
                                                                              photos):
        """A server's .minitorrent-incoming/ (here a folder where photos/'s staging lock goes) is refused file by
        file: nothing lands in the staging folder, and a later download of photos/ there is not broken by it."""
        server = serve_photos(server_factory, photos)
        manifest = server.catalog.db.get_manifest("photos/Case.txt")
        server.catalog.db.add_file(f"{STAGING}/{staging_key('photos/')}.lock/x.txt", manifest)
        engine = engine_for(tmp_path, server)
        try:
            hostile = engine.download_folder(f"{STAGING}/", tmp_path / "out")
            result = engine.download_folder("photos/", tmp_path / "out")
        finally:
            engine.close()
        assert (1, 0, [], tree(photos.parent)) == (len(hostile.failed), hostile.downloaded, result.failed,
                                                   tree(tmp_path / "out"))


class TestDamagedServerCopy:
    def test_a_small_file_failing_verification_never_gets_its_final_name(self, tmp_path, server_factory, photos):
        """A server whose stored copy of one small file is damaged: that file is reported and absent, the rest arrive."""
        server = serve_photos(server_factory, photos)
        record = server.catalog.db.get_file("photos/2024/beach.jpg")
        blob = server.catalog.blob_path(record.sha256)
        blob.write_bytes(b"X" + blob.read_bytes()[1:])  # same size, other bytes
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        # "copy of beach.jpg" shares the blob, so both fail; the other four arrive
        assert (False, 2, 4) == ((tmp_path / "out" / "photos" / "2024" / "beach.jpg").exists(),
                                 len(result.failed), result.downloaded)


class TestGroupedCounts:
    def test_every_small_file_is_counted_once(self, tmp_path, server_factory, photos):
        """The downloaded_many burst counts each file of the folder exactly once on the server."""
        server = serve_photos(server_factory, photos)
        fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert {name: 1 for name in server.catalog.names_at("photos/")} == server.catalog.download_counts()


    def test_a_folder_paused_and_resumed_counts_each_file_once(self, tmp_path, server_factory, monkeypatch):
        """Paused just after a batch is staged (its report not sent yet, earlier reports still unanswered, though
        counted), then resumed: the server counts every file once, those of the paused batch too."""
        from conftest import SHORT_TIMEOUT, wait_until

        from minitorrent.client import folders

        monkeypatch.setattr(folders, "BATCH_BYTES", 8 * 100)  # batches of 8: the progress comes with the 8th
        source, server = serve_many(tmp_path, server_factory, 100)
        cancel = threading.Event()

        def pause(progress: Progress) -> None:  # the 64th file staged: batches 1 to 7 reported, the 8th not yet
            if progress.files and not cancel.is_set():
                wait_until(lambda: 56 == sum(server.catalog.download_counts().values()), SHORT_TIMEOUT,
                           "the 7 batches reported counted")
                cancel.set()
        result = paused_then_resumed(engine_for(tmp_path, server, on_progress=pause), cancel, tmp_path / "out")
        assert ([], tree(source.parent)) == (result.failed, tree(tmp_path / "out"))
        assert {name: 1 for name in server.catalog.names_at("many/")} == server.catalog.download_counts()

    def test_reports_the_server_never_read_are_sent_again_when_the_folder_stops(self, tmp_path, server_factory,
                                                                                  monkeypatch):
        """The reports a pause leaves unanswered never reached the server (lost on the way; on a real link, queued
        behind the batches it was still sending): the folder's last report sends them again, so every file is
        counted once, not those dropped with the connection left at 0."""
        from conftest import SHORT_TIMEOUT, SlowProxy

        from minitorrent.client import folders

        monkeypatch.setattr(folders, "BATCH_BYTES", 8 * 100)  # batches of 8: the progress comes with the 8th
        source, server = serve_many(tmp_path, server_factory, 100)
        proxy = SlowProxy(server.server.address, 0)  # no pacing: it only loses requests, once told to
        host, port = proxy.address
        cancel = threading.Event()

        def lose_what_follows(progress: Progress) -> None:  # the 64th file staged: its batch's report comes next
            if progress.files and not cancel.is_set():
                proxy.hold_requests(on_held=cancel.set)  # that report and the next batch request are lost: pause
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"host": host, "port": port}},
                                                             "transfer": {"io_timeout": SHORT_TIMEOUT}}),
                              on_progress=lose_what_follows)
        try:
            result = paused_then_resumed(engine, cancel, tmp_path / "out")
        finally:
            proxy.close()
        assert ([], tree(source.parent)) == (result.failed, tree(tmp_path / "out"))
        assert {name: 1 for name in server.catalog.names_at("many/")} == server.catalog.download_counts()


class TestFailover:
    def test_a_folder_download_moves_to_the_other_server_when_the_first_goes(self, tmp_path, server_factory,
                                                                          monkeypatch):
        """The server in use goes away mid-folder: the rest comes from the other one, every file verified and counted there."""
        from conftest import SHORT_TIMEOUT, SlowProxy, wait_until

        from minitorrent.client import folders
        from minitorrent.common.launcher import free_port

        monkeypatch.setattr(folders, "BATCH_BYTES", 16 * 4096)  # batches of 16 files: staged a few at a time

        source = tmp_path / "src" / "tree"
        for i in range(200):
            make_file(source / f"d{i // 50}" / f"f{i:03d}.bin", 4096, seed=i)
        first = server_factory(folder=tmp_path / "a")
        first.add_folder(source)
        proxy = SlowProxy(first.server.address, 128 * 1024)  # the folder would take ~6 s through it
        (host, port), other_port = proxy.address, free_port()
        config = make_config(tmp_path / "cli", {"server": {"main": {"host": host, "port": port},
                                                            "backup": {"host": "127.0.0.1", "port": other_port}},
                                                 "transfer": {"io_timeout": 2.0}})  # a silent server is given up sooner
        engine = ClientEngine(config)
        outcome: list = []
        worker = threading.Thread(target=lambda: outcome.append(engine.download_folder("tree/", tmp_path / "out")))
        try:
            assert f"{host}:{port}" == engine.server.active_pool().address  # the only one answering yet
            second = server_factory({"server": {"main": {"port": other_port}}}, folder=tmp_path / "b")
            second.add_folder(source)
            worker.start()
            staging = tmp_path / "out" / STAGING
            wait_until(lambda: staged_files(staging) >= 20, SHORT_TIMEOUT, "20 files staged")
            proxy.close()
            first.stop()
            worker.join(SHORT_TIMEOUT * 3)
        finally:
            engine.close()
        assert (False, [], 200) == (worker.is_alive(), outcome[0].failed, outcome[0].downloaded)
        assert tree(source.parent) == tree(tmp_path / "out")
        assert {name: 1 for name in second.catalog.names_at("tree/")} == second.catalog.download_counts()


class TestPause:
    def test_a_pause_while_no_server_answers_takes_effect_at_once(self, tmp_path, server_factory, monkeypatch):
        """Paused while the server in use is gone (the folder retrying until retry_deadline, 60 s here): it stops
        with DownloadCancelled within the retry delay, not at the deadline."""
        from conftest import SHORT_TIMEOUT, SlowProxy, wait_until

        from minitorrent.client import folders

        monkeypatch.setattr(folders, "BATCH_BYTES", 16 * 4096)  # batches of 16 files: staged a few at a time
        source = tmp_path / "src" / "tree"
        for i in range(200):
            make_file(source / f"f{i:03d}.bin", 4096, seed=i)
        server = server_factory()
        server.add_folder(source)
        proxy = SlowProxy(server.server.address, 128 * 1024)  # the folder would take ~6 s through it
        host, port = proxy.address
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"host": host, "port": port}},
                                                             "client": {"retry_deadline": 60.0}}))
        cancel, outcome = threading.Event(), []

        def download() -> None:
            try:
                engine.download_folder("tree/", tmp_path / "out", cancel)
            except MiniTorrentError as error:
                outcome.append(type(error))
        worker = threading.Thread(target=download)
        try:
            worker.start()
            wait_until(lambda: staged_files(tmp_path / "out" / STAGING) >= 20, SHORT_TIMEOUT, "20 files staged")
            proxy.close()
            server.stop()
            cancel.set()
            worker.join(SHORT_TIMEOUT)
            stopped = not worker.is_alive()  # here, before engine.close() would end the retries anyway
        finally:
            engine.close()
            worker.join()
        assert (True, [DownloadCancelled]) == (stopped, outcome)


class TestBatchBounds:
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 40)), min_size=1, max_size=80),
           st.booleans(), st.one_of(st.none(), st.integers(0, 200)), st.integers(0, 600))
    def test_a_batch_is_the_longest_front_within_every_bound(self, files, listed, most_bytes, most_listed_bytes):
        """The files taken: at least one, else the longest front within the file count, the bytes and the names' bytes."""
        from collections import deque

        from minitorrent.client.folders import _next_batch, _Small
        queue = deque(_Small("n" * length, size, "0" * 64, "") for size, length in files)
        most_files = protocol.MAX_LISTED_BATCH_FILES if listed else protocol.MAX_BATCH_FILES
        expected = 0
        while expected < min(len(files), most_files):
            front = list(queue)[:expected + 1]
            if ((most_bytes is not None and sum(f.size for f in front) > most_bytes)
                    or (listed and sum(protocol.batch_entry_bytes(f.name) for f in front) > most_listed_bytes)):
                break
            expected += 1
        taken = _next_batch(queue, listed, most_bytes, most_listed_bytes)
        assert (max(expected, 1), len(files)) == (len(taken), len(taken) + len(queue))


class TestBatches:
    def test_an_older_server_is_asked_with_get_files_and_downloaded_many(self, tmp_path, server_factory, photos,
                                                                        monkeypatch):
        """A server whose welcome lists no batches feature gets protocol 1's requests: every file arrives, counted once."""
        monkeypatch.setattr(protocol, "FEATURES", "")
        asked: list[str] = []
        serve_client_request = serving._Handler._serve_client_request
        monkeypatch.setattr(serving._Handler, "_serve_client_request",
                            lambda handler, frame: (asked.append(frame.message.TYPE), serve_client_request(handler, frame)))
        server = serve_photos(server_factory, photos)
        result = fetch_folder(tmp_path, server, "photos/", tmp_path / "out")
        assert ([], tree(photos.parent), {"get_files", "downloaded_many"}) == (
            result.failed, tree(tmp_path / "out"), {"get_files", "downloaded_many"} & set(asked))
        assert ({name: 1 for name in server.catalog.names_at("photos/")}, set()) == (
            server.catalog.download_counts(), {"get_batch", "downloaded_batch"} & set(asked))

    def test_a_thousand_files_come_in_a_few_batches(self, tmp_path, server_factory, monkeypatch):
        """1,500 small files: asked in get_batch requests of at most MAX_LISTED_BATCH_FILES, counted by downloaded_batch."""
        asked: list[tuple[str, int]] = []
        serve_client_request = serving._Handler._serve_client_request

        def spy(handler, frame):
            batch = len(protocol.decode_batch(frame.payload)[0]) if frame.payload else 0
            asked.append((frame.message.TYPE, batch))
            return serve_client_request(handler, frame)
        monkeypatch.setattr(serving._Handler, "_serve_client_request", spy)
        source = tmp_path / "src" / "many"
        for i in range(1500):
            make_file(source / f"d{i // 500}" / f"f{i:04d}.bin", 100, seed=i)
        server = server_factory()
        server.add_folder(source)
        result = fetch_folder(tmp_path, server, "many/", tmp_path / "out")
        batches = [count for kind, count in asked if kind == "get_batch"]
        reports = [count for kind, count in asked if kind == "downloaded_batch"]
        assert (1500, [], 1500, 1500, True) == (result.downloaded, result.failed, sum(batches), sum(reports),
                                                 max(batches) <= protocol.MAX_LISTED_BATCH_FILES)
        assert {name: 1 for name in server.catalog.names_at("many/")} == server.catalog.download_counts()

    def test_files_are_counted_while_the_next_batches_come(self, tmp_path, server_factory, monkeypatch):
        """Each batch's files are reported as soon as they are staged, between the next batch requests: the server
        counts them while the client writes, not in a round of reports of its own at the end."""
        from minitorrent.client import folders

        monkeypatch.setattr(folders, "BATCH_BYTES", 10 * 100)  # 10 files a batch: 10 batches, 4 in flight
        asked: list[str] = []
        serve_client_request = serving._Handler._serve_client_request
        monkeypatch.setattr(serving._Handler, "_serve_client_request",
                            lambda handler, frame: (asked.append(frame.message.TYPE), serve_client_request(handler, frame)))
        _, server = serve_many(tmp_path, server_factory, 100)
        result = fetch_folder(tmp_path, server, "many/", tmp_path / "out")
        first_report, last_batch = asked.index("downloaded_batch"), len(asked) - 1 - asked[::-1].index("get_batch")
        assert (100, [], True) == (result.downloaded, result.failed, first_report < last_batch)
        assert {name: 1 for name in server.catalog.names_at("many/")} == server.catalog.download_counts()

    def test_a_report_refused_loses_no_file(self, tmp_path, server_factory, monkeypatch):
        """A server answering the reports with errors (it will not count them): every file still arrives, none failed."""
        def refuse(handler, names, sha256s):
            raise protocol.RequestFailed(protocol.ErrorCode.STORAGE_ERROR, "the counts cannot be stored")
        monkeypatch.setattr(serving._Handler, "_count_downloads", refuse)
        source, server = serve_many(tmp_path, server_factory, 30)
        result = fetch_folder(tmp_path, server, "many/", tmp_path / "out")
        assert (30, [], tree(source.parent), {0}) == (result.downloaded, result.failed, tree(tmp_path / "out"),
                                                      set(server.catalog.download_counts().values()))


    def test_a_refused_report_among_the_last_ones_costs_only_its_own_counts(self, tmp_path, server_factory,
                                                                            monkeypatch):
        """A folder's last reports (here the 29 second names of one content, 8 to a request): the first of them
        refused, the later ones are still read and counted."""
        monkeypatch.setattr(protocol, "MAX_LISTED_BATCH_FILES", 8)
        count, asked, refused = serving._Handler._count_downloads, [], []

        def refuse_the_second(handler, names, sha256s):  # the first counts the one file fetched
            asked.append(names)
            if len(asked) == 2:
                refused.extend(names)
                raise protocol.RequestFailed(protocol.ErrorCode.STORAGE_ERROR, "the counts cannot be stored")
            return count(handler, names, sha256s)
        monkeypatch.setattr(serving._Handler, "_count_downloads", refuse_the_second)
        source = tmp_path / "src" / "same"
        for i in range(30):
            make_file(source / f"f{i:02d}.bin", 100, seed=7)  # one content under 30 names
        server = server_factory()
        server.add_folder(source)
        result = fetch_folder(tmp_path, server, "same/", tmp_path / "out")
        assert ([], tree(source.parent), 8) == (result.failed, tree(tmp_path / "out"), len(refused))
        assert {name: int(name not in refused) for name in server.catalog.names_at("same/")} == \
            server.catalog.download_counts()


class TestLyingBatches:
    @pytest.mark.parametrize("sizes, errors, payload", [
        ([3000] * 2, [""] * 2, b"x" * 6000),  # two files answered for the batch of four asked
        ([10] * 4, [""] * 4, b"x" * 41),  # sizes that do not add up to the payload
        ([1] * (protocol.MAX_LISTED_BATCH_FILES + 1), [""] * (protocol.MAX_LISTED_BATCH_FILES + 1), b""),  # over the bound
    ], ids=["fewer-files", "sizes-and-payload-disagree", "over-the-batch-bound"])
    def test_a_lying_files_data_fails_the_folder_and_places_nothing(self, tmp_path, server_factory, photos,
                                                                    monkeypatch, sizes, errors, payload):
        """A files_data that does not answer the batch as asked is refused: no file gets its final name, no loop."""
        server = serve_photos(server_factory, photos)
        monkeypatch.setattr(serving._Handler, "_send_files", _raw_files_data(sizes, errors, payload))
        engine = engine_for(tmp_path, server)
        try:
            with pytest.raises(MiniTorrentError):
                engine.download_folder("photos/", tmp_path / "out")
        finally:
            engine.close()
        assert {} == tree(tmp_path / "out")


def _raw_files_data(sizes: list[int], errors: list[str], payload: bytes):
    """A ``_send_files`` that answers any batch with this ``files_data``, built by hand (past FilesData's own checks)."""
    def send(handler, names, sha256s):
        header = json.dumps({"type": "files_data", "sizes": sizes, "errors": errors}).encode()
        handler.connection.sock.sendall(protocol.PREFIX.pack(protocol.MAGIC, len(header), len(payload)) + header + payload)
    return send
