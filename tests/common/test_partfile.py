"""The part-file lifecycle: create ours with O_EXCL, resume by re-verifying, record, install, discard."""
from __future__ import annotations

import errno
import io
import os
import stat
import threading
from pathlib import Path

import pytest
from conftest import SHORT_TIMEOUT

from database import ClientStore, PartialStore
from error_handler import CatalogError, IntegrityError
from integrity import Manifest, build_manifest
from minitorrent.common import partfile
from minitorrent.common.partfile import (
    PART_NAME_ATTEMPTS,
    FinalNameTaken,
    NoFreePartName,
    NotEnoughSpace,
    PartFile,
    PartFileClosed,
    PartFileRefused,
    discard_recorded,
    finish_interrupted_installs,
    part_names,
)

CHUNK = 16
DATA = bytes(range(256)) * 2 + b"tail"  # 33 chunks, the last one short
FOREIGN = b"someone else's half-finished file"


@pytest.fixture
def store(tmp_path):
    with PartialStore(tmp_path / "partials.db") as partials:
        yield partials


@pytest.fixture
def manifest() -> Manifest:
    return build_manifest(io.BytesIO(DATA), CHUNK)


def open_part(store: PartialStore, folder: Path, manifest: Manifest, name: str = "movie.bin") -> PartFile:
    return PartFile.open(store, folder / name, name, manifest, folder / f"{name}.part")


def write_chunks(part: PartFile, indexes, data: bytes = DATA) -> None:
    for index in indexes:
        offset, length = part.manifest.chunk_span(index)
        part.write_verified(index, data[offset:offset + length])


def write_all(part: PartFile) -> None:
    write_chunks(part, range(part.manifest.chunk_count))


class TestCreate:
    def test_a_new_part_file_is_created_sized_and_recorded(self, store, tmp_path, manifest):
        """A first open creates NAME.part at the file's size and records it, with its identity, as ours."""
        part = open_part(store, tmp_path, manifest)
        part.close()
        stat = (tmp_path / "movie.bin.part").stat()
        state = store.partial_for(str(tmp_path / "movie.bin"))
        assert (len(DATA), str(tmp_path / "movie.bin.part"), f"{stat.st_dev}:{stat.st_ino}") == (
            stat.st_size, state.part_path, state.part_identity)

    def test_a_part_name_we_did_not_create_is_left_untouched(self, store, tmp_path, manifest):
        """An unrelated NAME.part is never opened for writing: the file goes through NAME.2.part and lands whole."""
        foreign = tmp_path / "movie.bin.part"
        foreign.write_bytes(FOREIGN)
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        part.install()
        assert (tmp_path / "movie.bin.2.part", FOREIGN, DATA) == (part.path, foreign.read_bytes(),
                                                                  (tmp_path / "movie.bin").read_bytes())
        assert not part.path.exists()

    def test_a_symlink_at_the_part_name_is_not_followed(self, store, tmp_path, manifest):
        """A symlink planted at NAME.part (even dangling) is skipped; what it points to is never written."""
        target = tmp_path / "precious.txt"
        target.write_bytes(FOREIGN)
        (tmp_path / "movie.bin.part").symlink_to(target)
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        part.install()
        assert (tmp_path / "movie.bin.2.part", FOREIGN) == (part.path, target.read_bytes())

    def test_every_name_taken_is_a_clear_error(self, store, tmp_path, manifest):
        """When every candidate name holds someone else's file, opening fails with NoFreePartName and writes nothing."""
        names = list(part_names(tmp_path / "movie.bin.part"))
        for name in names:
            name.write_bytes(FOREIGN)
        with pytest.raises(NoFreePartName, match="taken by other files"):
            open_part(store, tmp_path, manifest)
        assert (PART_NAME_ATTEMPTS, [FOREIGN], []) == (len(names), sorted({n.read_bytes() for n in names}),
                                                       store.in_progress())

    def test_numbered_names_keep_the_suffix_last(self, tmp_path):
        """Candidates are NAME.part, NAME.2.part, NAME.3.part...; a suffix-less name gets the number last."""
        assert ["a.bin.part", "a.bin.2.part", "a.bin.3.part"] == [p.name for p in
                                                                  list(part_names(tmp_path / "a.bin.part"))[:3]]
        assert [".replica-ab", ".replica-ab.2"] == [p.name for p in list(part_names(tmp_path / ".replica-ab"))[:2]]


class TestResume:
    def test_recorded_chunks_are_verified_again(self, store, tmp_path, manifest):
        """On reopening, a recorded chunk whose bytes were damaged on disk is forgotten; the sound ones are kept."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [0, 1, 5])
        part.close()
        with open(tmp_path / "movie.bin.part", "r+b") as damaged:
            damaged.seek(CHUNK + 3)
            damaged.write(b"\xff")
        resumed = open_part(store, tmp_path, manifest)
        resumed.close()
        assert (frozenset({0, 5}), {0, 5}) == (resumed.resumed, store.partial_for(str(tmp_path / "movie.bin")).verified)

    def test_a_file_put_in_place_of_ours_is_not_resumed_into(self, store, tmp_path, manifest):
        """If our NAME.part was replaced by another file, that file is left alone and nothing is resumed."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [0, 1])
        part.close()
        (tmp_path / "movie.bin.part").unlink()
        (tmp_path / "movie.bin.part").write_bytes(FOREIGN)
        again = open_part(store, tmp_path, manifest)
        again.close()
        assert (frozenset(), tmp_path / "movie.bin.2.part", FOREIGN) == (
            again.resumed, again.path, (tmp_path / "movie.bin.part").read_bytes())

    def test_a_record_of_another_version_is_discarded_with_its_part_file(self, store, tmp_path, manifest):
        """Progress on another version is dropped (our old part file goes): versions never mix."""
        old = build_manifest(io.BytesIO(DATA[::-1]), CHUNK)
        part = open_part(store, tmp_path, old)
        write_chunks(part, [0, 1], DATA[::-1])
        part.close()
        again = open_part(store, tmp_path, manifest)
        again.close()
        assert (frozenset(), manifest) == (again.resumed, store.partial_for(str(tmp_path / "movie.bin")).manifest)

    def test_a_missing_part_file_starts_afresh(self, store, tmp_path, manifest):
        """A record whose part file was deleted starts again from nothing."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [0, 1])
        part.close()
        (tmp_path / "movie.bin.part").unlink()
        again = open_part(store, tmp_path, manifest)
        again.close()
        assert (frozenset(), set()) == (again.resumed, store.partial_for(str(tmp_path / "movie.bin")).verified)


class TestRecord:
    def test_each_chunk_is_recorded_as_it_is_written(self, store, tmp_path, manifest):
        """Another connection sees a chunk recorded as soon as write_verified returns: a kill cannot lose it."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [3])
        with PartialStore(store.path) as other:
            seen = other.partial_for(str(tmp_path / "movie.bin")).verified
        part.close()
        assert {3} == seen

    def test_only_the_completing_write_says_so(self, store, tmp_path, manifest):
        """write_verified returns True exactly once: for the chunk that completed the file, not for a repeat."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, range(1, manifest.chunk_count))
        last = part.write_verified(0, DATA[:CHUNK])
        again = part.write_verified(0, DATA[:CHUNK])
        part.close()
        assert (True, False, True) == (last, again, part.complete)

    def test_no_write_after_close(self, store, tmp_path, manifest):
        """A chunk for a closed part file is refused with PartFileClosed."""
        part = open_part(store, tmp_path, manifest)
        part.close()
        with pytest.raises(PartFileClosed):
            part.write_verified(0, DATA[:CHUNK])


class TestInstall:
    def test_installs_under_the_final_name_and_forgets_the_record(self, store, tmp_path, manifest):
        """A complete, proven file gets its final name; the part name and the record go."""
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        part.install()
        assert (DATA, False, []) == ((tmp_path / "movie.bin").read_bytes(), part.path.exists(), store.in_progress())

    def test_a_client_store_keeps_it_as_completed(self, tmp_path, manifest):
        """With the client's store the installed file is listed among the completed downloads."""
        with ClientStore(tmp_path / "client.db") as client:
            part = open_part(client, tmp_path, manifest)
            write_all(part)
            part.install()
            assert [str(tmp_path / "movie.bin")] == [done.path for done in client.completed_files()]

    def test_on_installed_sees_the_final_file_while_the_part_name_exists(self, store, tmp_path, manifest):
        """The callback runs with the final name in place and before the part name is removed."""
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        seen = []
        part.install(on_installed=lambda final: seen.append((final.read_bytes() == DATA, part.path.exists())))
        assert [(True, True)] == seen

    def test_a_whole_file_mismatch_discards_everything(self, store, tmp_path, manifest):
        """Chunks that pass one by one but not as a whole file: IntegrityError, no final file, no part, no record."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, range(1, manifest.chunk_count))
        part.write_verified(0, b"\0" * CHUNK)  # the caller's check is bypassed here on purpose
        with pytest.raises(IntegrityError, match="whole-file SHA-256"):
            part.install()
        assert (False, False, []) == ((tmp_path / "movie.bin").exists(), part.path.exists(), store.in_progress())

    def test_a_final_name_taken_meanwhile_is_never_replaced(self, store, tmp_path, manifest):
        """A file that appeared under the final name stays; the part file and record stay to install later."""
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        (tmp_path / "movie.bin").write_bytes(FOREIGN)
        with pytest.raises(FinalNameTaken):
            part.install()
        resumed = open_part(store, tmp_path, manifest)
        resumed.close()
        assert (FOREIGN, manifest.chunk_count) == ((tmp_path / "movie.bin").read_bytes(), len(resumed.resumed))

    def test_an_empty_file_installs(self, store, tmp_path):
        """A file of no chunks is complete at once and installs empty."""
        part = open_part(store, tmp_path, build_manifest(io.BytesIO(b""), CHUNK))
        part.install()
        assert b"" == (tmp_path / "movie.bin").read_bytes()


class TestDiscard:
    def test_discard_removes_our_part_file_and_record(self, store, tmp_path, manifest):
        """Discarding deletes the part file we created and its record."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [0])
        part.discard()
        assert (False, []) == (part.path.exists(), store.in_progress())

    def test_discard_recorded_spares_a_file_that_is_not_ours(self, store, tmp_path, manifest):
        """Forgetting a stopped download deletes only the file we created; a file put in its place stays."""
        part = open_part(store, tmp_path, manifest)
        part.close()
        os.unlink(part.path)
        part.path.write_bytes(FOREIGN)
        discard_recorded(store, tmp_path / "movie.bin")
        assert (FOREIGN, []) == (part.path.read_bytes(), store.in_progress())


def replace_with_foreign(path: Path, content: bytes) -> None:
    """Put a file of ours-unrelated ``content`` at ``path`` by rename, as another program would (a new inode)."""
    temp = path.with_name(path.name + ".incoming")
    temp.write_bytes(content)
    os.replace(temp, path)


def same_size_foreign(manifest: Manifest) -> bytes:
    return b"x" * manifest.size


def after_first_call(monkeypatch, name: str, action) -> None:
    """Run ``action`` once, right after the first call of ``os.<name>`` returns: a race made deterministic."""
    real = getattr(os, name)
    pending = [action]

    def hooked(*args, **kwargs):
        result = real(*args, **kwargs)
        if pending:
            pending.pop()()
        return result

    monkeypatch.setattr(os, name, hooked)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class TestOwnership:
    def test_a_same_size_file_put_in_place_of_ours_is_not_ours(self, store, tmp_path, manifest):
        """A file of exactly our size renamed onto NAME.part (another inode) is neither resumed into nor deleted."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [0, 1])
        part.close()
        foreign = same_size_foreign(manifest)
        replace_with_foreign(tmp_path / "movie.bin.part", foreign)
        again = open_part(store, tmp_path, manifest)
        again.discard()
        assert (frozenset(), tmp_path / "movie.bin.2.part", foreign, []) == (
            again.resumed, again.path, (tmp_path / "movie.bin.part").read_bytes(), store.in_progress())

    def test_a_fifo_at_the_part_path_is_never_waited_on(self, store, tmp_path, manifest):
        """Discarding a record whose part path now holds a FIFO returns at once: the FIFO stays, the record goes."""
        part = open_part(store, tmp_path, manifest)
        part.close()
        os.unlink(part.path)
        os.mkfifo(part.path)
        outcome = []
        worker = threading.Thread(target=lambda: outcome.append(discard_recorded(store, tmp_path / "movie.bin")),
                                  daemon=True)
        worker.start()
        worker.join(SHORT_TIMEOUT)
        if worker.is_alive():  # the old code blocks in open(): give it a writer so the thread can end
            os.close(os.open(part.path, os.O_RDWR))
            worker.join(SHORT_TIMEOUT)
            outcome.append("hung")
        assert ([None], []) == (outcome, store.in_progress())
        assert stat.S_ISFIFO(os.lstat(part.path).st_mode)

    def test_an_empty_fifo_is_not_taken_for_an_empty_part_file(self, store, tmp_path):
        """A FIFO at the path of an empty file's version 1 record is not ours: a new part file is made."""
        empty = build_manifest(io.BytesIO(b""), CHUNK)
        os.mkfifo(tmp_path / "movie.bin.part")
        store.begin_partial(str(tmp_path / "movie.bin"), "movie.bin", empty, str(tmp_path / "movie.bin.part"), "")
        part = open_part(store, tmp_path, empty)
        part.install()
        assert (tmp_path / "movie.bin.2.part", True) == (part.path, (tmp_path / "movie.bin").is_file())

    def test_a_local_error_reopening_our_part_file_is_raised_not_taken_for_gone(self, store, tmp_path, manifest,
                                                                                 monkeypatch):
        """EMFILE (or EACCES) reopening our part file is raised; the part file and its chunks are not orphaned."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [0, 1])
        part.close()
        real_open = os.open

        def out_of_descriptors(path, flags, *args, **kwargs):
            if str(path) == str(part.path) and not flags & os.O_CREAT:
                raise OSError(errno.EMFILE, "Too many open files", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", out_of_descriptors)
        with pytest.raises(OSError, match="Too many open files"):
            open_part(store, tmp_path, manifest)
        monkeypatch.undo()
        assert ([part.path.name], {0, 1}) == (sorted(p.name for p in tmp_path.glob("*.part")),
                                              store.partial_for(str(tmp_path / "movie.bin")).verified)

    def test_a_discard_by_a_stale_holder_spares_the_newer_record(self, store, tmp_path, manifest):
        """A holder whose record another process dropped and replaced deletes neither the new record nor its file."""
        stale = open_part(store, tmp_path, manifest)
        stale.close()
        with PartialStore(store.path) as other:
            discard_recorded(other, tmp_path / "movie.bin")
            newer = open_part(other, tmp_path, manifest)
            write_chunks(newer, [0])
            newer.close()
        stale.discard()
        assert (True, {0}) == (newer.path.exists(), store.partial_for(str(tmp_path / "movie.bin")).verified)

    def test_the_descriptor_is_closed_when_recording_the_identity_fails(self, store, tmp_path, manifest,
                                                                         monkeypatch):
        """Opening a version 1 record whose identity cannot be stored raises and leaves no descriptor open."""
        part_path = tmp_path / "movie.bin.part"
        with open(part_path, "wb") as old_part:
            old_part.truncate(manifest.size)
        store.begin_partial(str(tmp_path / "movie.bin"), "movie.bin", manifest, str(part_path), "")

        def database_gone(*args):
            raise CatalogError("database is closed")

        monkeypatch.setattr(store, "set_part_identity", database_gone)
        before = open_fds()
        with pytest.raises(CatalogError):
            open_part(store, tmp_path, manifest)
        assert before == open_fds()


class TestSwappedFiles:
    def test_a_file_put_at_the_part_name_before_the_link_is_never_installed(self, store, tmp_path, manifest,
                                                                             monkeypatch):
        """Ours moved away and another file put at NAME.part after the hash: the hashed file gets the final name."""
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        foreign = same_size_foreign(manifest)

        def swap() -> None:
            os.rename(part.path, tmp_path / "moved-away")
            replace_with_foreign(part.path, foreign)

        after_first_call(monkeypatch, "fsync", swap)
        part.install()
        assert (DATA, foreign, []) == ((tmp_path / "movie.bin").read_bytes(), part.path.read_bytes(),
                                       store.in_progress())

    def test_a_file_renamed_over_the_part_before_the_link_is_never_installed(self, store, tmp_path, manifest,
                                                                             monkeypatch):
        """A file renamed over NAME.part after the hash (ours then has no name) is refused: no final file at all."""
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        foreign = same_size_foreign(manifest)
        after_first_call(monkeypatch, "fsync", lambda: replace_with_foreign(part.path, foreign))
        with pytest.raises(OSError, match="deleted or replaced"):
            part.install()
        assert (False, foreign) == ((tmp_path / "movie.bin").exists(), part.path.read_bytes())

    def test_a_file_swapped_in_after_the_ownership_check_is_not_deleted(self, store, tmp_path, manifest,
                                                                         monkeypatch):
        """Discard checks the name still holds our inode right before unlinking: a file swapped in stays."""
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [0])
        part.close()
        foreign = same_size_foreign(manifest)
        after_first_call(monkeypatch, "fstat", lambda: replace_with_foreign(part.path, foreign))
        discard_recorded(store, tmp_path / "movie.bin")
        assert (foreign, []) == (part.path.read_bytes(), store.in_progress())


class TestSwappedFolders:
    def test_a_folder_swapped_for_a_link_while_the_file_arrives_does_not_take_it_out(self, store, tmp_path,
                                                                                   manifest):
        """The folder becomes a link out after open: the file is installed in the folder opened, nothing outside."""
        output, outside = tmp_path / "downloads", tmp_path / "outside"
        (output / "photos").mkdir(parents=True)
        outside.mkdir()
        part = PartFile.open(store, output / "photos" / "movie.bin", "photos/movie.bin", manifest,
                             output / "photos" / "movie.bin.part", inside=output)
        write_all(part)
        (output / "photos").rename(output / "moved")  # another user of the machine swaps the folder ...
        (output / "photos").symlink_to(outside)  # ... for a link leading out
        part.install()
        assert ([], DATA) == (list(outside.iterdir()), (output / "moved" / "movie.bin").read_bytes())

    def test_a_folder_swapped_for_a_link_right_after_it_is_opened_gets_no_part_file_outside(
            self, store, tmp_path, manifest, monkeypatch):
        """The folder becomes a link out between its opening and the part file's creation: the part file is made in
        the folder opened (nothing outside, ever), and once installed its part name there is gone too."""
        output, outside = tmp_path / "downloads", tmp_path / "outside"
        (output / "photos").mkdir(parents=True)
        outside.mkdir()
        open_folder = partfile._open_folder

        def open_then_swap(folder: Path, inside: Path | None) -> int:
            fd = open_folder(folder, inside)
            (output / "photos").rename(output / "moved")  # another user of the machine swaps the folder ...
            (output / "photos").symlink_to(outside)  # ... for a link leading out
            return fd
        monkeypatch.setattr(partfile, "_open_folder", open_then_swap)
        part = PartFile.open(store, output / "photos" / "movie.bin", "photos/movie.bin", manifest,
                             output / "photos" / "movie.bin.part", inside=output)
        outside_while_arriving = list(outside.iterdir())
        write_all(part)
        part.install()
        assert ([], [], ["movie.bin"], DATA) == (outside_while_arriving, list(outside.iterdir()),
                                                 sorted(os.listdir(output / "moved")),
                                                 (output / "moved" / "movie.bin").read_bytes())

    def test_a_folder_that_already_leads_out_is_refused_before_anything_is_created(self, store, tmp_path, manifest):
        """With ``inside``, a folder whose real path lies outside it is refused: no part file, no record."""
        output, outside = tmp_path / "downloads", tmp_path / "outside"
        output.mkdir()
        outside.mkdir()
        (output / "photos").symlink_to(outside)
        with pytest.raises(PartFileRefused, match="leads outside"):
            PartFile.open(store, output / "photos" / "movie.bin", "photos/movie.bin", manifest,
                          output / "photos" / "movie.bin.part", inside=output)
        assert ([], []) == (list(outside.iterdir()), store.in_progress())

    def test_a_link_that_stays_inside_is_followed(self, store, tmp_path, manifest):
        """A folder that is a link to another folder inside the output folder works as before."""
        output = tmp_path / "downloads"
        (output / "real").mkdir(parents=True)
        (output / "alias").symlink_to(output / "real")
        part = PartFile.open(store, output / "alias" / "movie.bin", "alias/movie.bin", manifest,
                             output / "alias" / "movie.bin.part", inside=output)
        write_all(part)
        part.install()
        assert DATA == (output / "real" / "movie.bin").read_bytes()


class TestLocalFaults:
    def test_a_sync_error_while_hashing_keeps_the_part_file(self, store, tmp_path, manifest, monkeypatch):
        """EIO from the hasher's fdatasync is raised by install as an OSError; the part and every chunk stay."""
        monkeypatch.setattr(partfile, "SYNC_EVERY_BYTES", 1)

        def disk_error(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", disk_error)
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        with pytest.raises(OSError, match="Input/output error"):
            part.install()
        monkeypatch.undo()
        assert (False, DATA) == ((tmp_path / "movie.bin").exists(), part.path.read_bytes())
        assert manifest.chunk_count == len(store.partial_for(str(tmp_path / "movie.bin")).verified)

    def test_a_short_write_is_completed_before_the_chunk_is_recorded(self, store, tmp_path, manifest, monkeypatch):
        """A pwrite that writes only part of a chunk is continued: what is recorded is on disk whole."""
        real_pwrite = os.pwrite
        monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_pwrite(fd, bytes(data)[:5], offset))
        part = open_part(store, tmp_path, manifest)
        write_chunks(part, [1])
        part.close()
        monkeypatch.undo()
        assert DATA[CHUNK:2 * CHUNK] == part.path.read_bytes()[CHUNK:2 * CHUNK]

    def test_a_file_larger_than_the_free_space_is_refused_before_anything_is_created(self, store, tmp_path):
        """A size over the folder's free space is refused, naming both sizes; no part file, no record."""
        free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
        huge = free + 2**40
        giant = Manifest(huge, huge, "0" * 64, bytes(32))
        with pytest.raises(NotEnoughSpace, match=f"needs .*{huge} bytes.* free"):
            open_part(store, tmp_path, giant)
        assert ([], []) == (list(tmp_path.glob("*.part")), store.in_progress())


class TestInterruptedInstall:
    def test_killed_after_the_link_is_tidied_on_open(self, tmp_path, manifest):
        """Final name linked, record and part name left: open finishes the bookkeeping and removes the part name."""
        with ClientStore(tmp_path / "client.db") as client:
            part = open_part(client, tmp_path, manifest)
            write_all(part)
            part.close()
            os.link(part.path, tmp_path / "movie.bin")  # what install had done when the process was killed
            again = open_part(client, tmp_path, manifest)
            again.install()
            assert (True, False, [], [str(tmp_path / "movie.bin")]) == (
                again.complete, part.path.exists(), client.in_progress(), [d.path for d in client.completed_files()])
        assert DATA == (tmp_path / "movie.bin").read_bytes()

    def test_killed_after_the_part_name_went_is_tidied_by_the_sweep(self, store, tmp_path, manifest):
        """Final name linked and part name gone, record left: finish_interrupted_installs forgets the record."""
        part = open_part(store, tmp_path, manifest)
        write_all(part)
        part.close()
        os.link(part.path, tmp_path / "movie.bin")
        part.path.unlink()
        assert (1, [], DATA) == (finish_interrupted_installs(store), store.in_progress(),
                                 (tmp_path / "movie.bin").read_bytes())
