"""Downloads over real sockets: verified, resumable, never a corrupt final file."""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from conftest import LONG_TIMEOUT, make_config, make_file, swap_for_a_fifo_when_opened

from error_handler import DownloadError
from integrity import manifest_of_file, sha256_file
from minitorrent.client.engine import ClientEngine
from minitorrent.client.progress import Progress
from minitorrent.common.partfile import PartFile

SMALL_CHUNK = 64 * 1024


def engine_for(tmp_path: Path, server, overrides: dict | None = None, **kw) -> ClientEngine:
    host, port = server.server.address
    config = make_config(tmp_path / "cli", {"server": {"main": {"host": host, "port": port}}, **(overrides or {})})
    return ClientEngine(config, **kw)


@pytest.fixture
def small_chunks() -> dict:
    return {"transfer": {"chunk_size": SMALL_CHUNK}}


class TestNames:
    @pytest.mark.parametrize("name", [
        "with spaces.txt", "café crème.txt", "emoji 🎉.bin", "pipe|and:colon.dat", "Ünïcødé ñame.iso",
    ])
    def test_unusual_names_round_trip(self, tmp_path, server_factory, name):
        """A name with spaces, accents, emoji, | or : downloads byte-exact under the same name."""
        source = make_file(tmp_path / "src" / name, 100_000)
        server = server_factory()
        server.add_file(source)
        engine = engine_for(tmp_path, server)
        try:
            result = engine.download(name, tmp_path / "out")
        finally:
            engine.close()
        assert (tmp_path / "out" / name) == result.path
        assert sha256_file(source) == sha256_file(result.path)


class TestSizes:
    @pytest.mark.parametrize("size", [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1, 5 * SMALL_CHUNK + 7])
    def test_edge_sizes(self, tmp_path, server_factory, small_chunks, size):
        """Zero bytes, one chunk exactly, one chunk plus one byte... all arrive byte-exact."""
        source = make_file(tmp_path / "src" / f"f{size}.bin", size, seed=size)
        server = server_factory(small_chunks)
        server.add_file(source)
        engine = engine_for(tmp_path, server)
        try:
            result = engine.download(source.name, tmp_path / "out")
        finally:
            engine.close()
        assert size == result.path.stat().st_size
        assert sha256_file(source) == sha256_file(result.path)
        assert not (tmp_path / "out" / f"{source.name}.part").exists()

    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_64_mib_file(self, tmp_path, server_factory):
        """A 64 MiB file with the default 1 MiB chunks arrives byte-exact, progress reaching 100 %."""
        source = make_file(tmp_path / "src" / "big.bin", 64 * 1024 * 1024, seed=64)
        server = server_factory()
        server.add_file(source)
        seen: list[Progress] = []
        engine = engine_for(tmp_path, server, on_progress=seen.append)
        try:
            result = engine.download("big.bin", tmp_path / "out")
        finally:
            engine.close()
        assert sha256_file(source) == sha256_file(result.path)
        assert (64, 64) == (seen[-1].chunks_done, seen[-1].chunks_total)
        assert 64 * 1024 * 1024 == seen[-1].fetched_bytes


class TestManyClients:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_thirty_clients_at_once(self, tmp_path, server_factory, small_chunks):
        """Thirty clients downloading the same file at once all finish byte-exact."""
        source = make_file(tmp_path / "src" / "shared.bin", 40 * SMALL_CHUNK + 123)
        server = server_factory({**small_chunks, "transfer": {**small_chunks["transfer"], "max_connections": 64}})
        server.add_file(source)
        expected = sha256_file(source)
        results: dict[int, str] = {}

        def one_client(n: int) -> None:
            engine = engine_for(tmp_path / f"c{n}", server)
            try:
                results[n] = sha256_file(engine.download("shared.bin", tmp_path / f"out{n}").path)
            except Exception as error:  # reported below with the client number
                results[n] = repr(error)
            finally:
                engine.close()

        threads = [threading.Thread(target=one_client, args=(n,)) for n in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LONG_TIMEOUT)
        assert {n: expected for n in range(30)} == results
        assert 30 == server.catalog.db.get_file("shared.bin").downloads

    def test_busy_server_is_retried(self, tmp_path, server_factory):
        """With max_connections 1 and a connection held open, a client waits with backoff, then succeeds."""
        source = make_file(tmp_path / "src" / "a.bin", 1000)
        server = server_factory({"transfer": {"max_connections": 1}})
        server.add_file(source)
        holder = engine_for(tmp_path / "holder", server)
        waiter = engine_for(tmp_path / "waiter", server)
        outcome: list = []
        try:
            with holder.server.active_pool().session():
                thread = threading.Thread(target=lambda: outcome.append(waiter.list_files()))
                thread.start()
                thread.join(0.5)  # it must still be waiting while the only slot is taken
                assert thread.is_alive()
            holder.close()  # releasing the slot lets the waiter in on its next retry
            thread.join(LONG_TIMEOUT)
        finally:
            holder.close()
            waiter.close()
        assert ["a.bin"] == [entry["name"] for entry in outcome[0]]


class TestSafety:
    @pytest.mark.timeout(30)
    @pytest.mark.parametrize("fifo", [False, True], ids=["file", "fifo-swapped-in"])
    def test_existing_different_file_is_not_overwritten(self, tmp_path, server_factory, monkeypatch, fifo):
        """A different file already at the destination is refused and left untouched; so is one another process
        swaps for a FIFO just before it is opened to be hashed (what was opened is checked, not read: that blocks)."""
        source = make_file(tmp_path / "src" / "doc.txt", 5000)
        server = server_factory()
        server.add_file(source)
        existing = tmp_path / "out" / "doc.txt"
        existing.parent.mkdir()
        existing.write_bytes(b"my own notes")
        if fifo:
            monkeypatch.setattr(os, "open", swap_for_a_fifo_when_opened(existing))
        engine = engine_for(tmp_path, server)
        try:
            with pytest.raises(DownloadError, match="already exists with different content"):
                engine.download("doc.txt", tmp_path / "out")
        finally:
            engine.close()
        assert b"my own notes" == (tmp_path / "out" / ("doc.txt.swapped" if fifo else "doc.txt")).read_bytes()

    def test_unrelated_part_file_is_left_untouched(self, tmp_path, server_factory, small_chunks):
        """An unrelated NAME.part is neither truncated nor deleted: by a download beside it, or by discarding one."""
        source = make_file(tmp_path / "src" / "movie.bin", 3 * SMALL_CHUNK + 5)
        server = server_factory(small_chunks)
        server.add_file(source)
        out = tmp_path / "out"
        foreign = out / "movie.bin.part"
        foreign.parent.mkdir()
        foreign.write_bytes(b"someone else's half-finished movie")
        engine = engine_for(tmp_path, server)
        try:
            manifest = engine.server.manifest("movie.bin")
            leave_earlier_run(engine, out, "movie.bin", manifest, source.read_bytes(), [0])
            left = sorted(p.name for p in out.iterdir())
            engine.discard_partial("movie.bin", out)  # forgetting a download is no licence either
            discarded = (sorted(p.name for p in out.iterdir()), engine.store.in_progress())
            result = engine.download("movie.bin", out)
        finally:
            engine.close()
        assert (["movie.bin.2.part", "movie.bin.part"], (["movie.bin.part"], [])) == (left, discarded)
        assert b"someone else's half-finished movie" == foreign.read_bytes()
        assert sha256_file(source) == sha256_file(result.path)
        assert ["movie.bin", "movie.bin.part"] == sorted(p.name for p in out.iterdir())

    def test_identical_existing_file_is_a_no_op(self, tmp_path, server_factory):
        """The same content already at the destination counts as done, without fetching."""
        source = make_file(tmp_path / "src" / "doc.txt", 5000)
        server = server_factory()
        server.add_file(source)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "doc.txt").write_bytes(source.read_bytes())
        engine = engine_for(tmp_path, server)
        try:
            result = engine.download("doc.txt", tmp_path / "out")
        finally:
            engine.close()
        assert ("already present", 0) == (result.outcome, result.fetched_bytes)

    def test_damaged_server_copy_is_refused(self, tmp_path, server_factory, small_chunks):
        """A chunk changed on the server's disk is refused, named in the error, and no final file appears."""
        source = make_file(tmp_path / "src" / "data.bin", 6 * SMALL_CHUNK)
        server = server_factory(small_chunks)
        record = server.add_file(source).record
        blob = server.catalog.store_dir / record.sha256
        with open(blob, "r+b") as f:
            f.seek(3 * SMALL_CHUNK + 10)
            f.write(b"\xff\x00\xff")
        engine = engine_for(tmp_path, server)
        try:
            with pytest.raises(DownloadError, match="chunk 3 failed SHA-256 verification"):
                engine.download("data.bin", tmp_path / "out")
        finally:
            engine.close()
        assert not (tmp_path / "out" / "data.bin").exists()

    def test_server_gone_fails_with_reason(self, tmp_path, server_factory, small_chunks):
        """With the server stopped, get fails within the retry deadline and leaves no final file."""
        source = make_file(tmp_path / "src" / "x.bin", 3 * SMALL_CHUNK)
        server = server_factory(small_chunks)
        server.add_file(source)
        engine = engine_for(tmp_path, server, {"client": {"retry_deadline": 1.0}})
        server.stop()
        try:
            with pytest.raises(DownloadError, match="cannot connect"):
                engine.download("x.bin", tmp_path / "out")
        finally:
            engine.close()
        assert not (tmp_path / "out" / "x.bin").exists()

    def test_bad_name_is_refused_before_any_request(self, tmp_path, server_factory):
        """A name that climbs out of the output folder (..) is refused with a clear error, and nothing is written."""
        server = server_factory()
        engine = engine_for(tmp_path, server)
        try:
            with pytest.raises(DownloadError, match=r"directory reference \(\. or \.\.\)"):
                engine.download("../escape.txt", tmp_path / "out")
        finally:
            engine.close()
        assert not (tmp_path / "escape.txt").exists()


def leave_earlier_run(engine: ClientEngine, out: Path, name: str, manifest, part_bytes: bytes,
                      verified) -> None:
    """What a run killed mid-download leaves: its own ``NAME.part`` holding ``part_bytes``, ``verified`` recorded."""
    out.mkdir(exist_ok=True)
    part = PartFile.open(engine.store, out / name, name, manifest, out / f"{name}.part")
    try:
        for index in verified:
            offset, length = manifest.chunk_span(index)
            part.write_verified(index, part_bytes[offset:offset + length])  # as recorded, damaged or not
    finally:
        part.close()


class TestResume:
    def test_recorded_chunks_are_not_fetched_again(self, tmp_path, server_factory, small_chunks):
        """Chunks recorded as verified in an earlier run are kept; only the others are fetched."""
        source = make_file(tmp_path / "src" / "r.bin", 10 * SMALL_CHUNK)
        server = server_factory(small_chunks)
        server.add_file(source)
        engine = engine_for(tmp_path, server)
        out = tmp_path / "out"
        leave_earlier_run(engine, out, "r.bin", engine.server.manifest("r.bin"),
                          source.read_bytes()[: 4 * SMALL_CHUNK], range(4))
        try:
            result = engine.download("r.bin", out)
        finally:
            engine.close()
        assert (4, 6 * SMALL_CHUNK) == (result.resumed_chunks, result.fetched_bytes)
        assert sha256_file(source) == sha256_file(result.path)

    def test_recorded_chunk_damaged_on_disk_is_fetched_again(self, tmp_path, server_factory, small_chunks):
        """A recorded chunk whose bytes in the .part file were damaged is rechecked and fetched again."""
        source = make_file(tmp_path / "src" / "r.bin", 4 * SMALL_CHUNK)
        server = server_factory(small_chunks)
        server.add_file(source)
        engine = engine_for(tmp_path, server)
        out = tmp_path / "out"
        data = bytearray(source.read_bytes()[: 2 * SMALL_CHUNK])
        data[5] ^= 0xFF
        leave_earlier_run(engine, out, "r.bin", engine.server.manifest("r.bin"), bytes(data), [0, 1])
        try:
            result = engine.download("r.bin", out)
        finally:
            engine.close()
        assert (1, 3 * SMALL_CHUNK) == (result.resumed_chunks, result.fetched_bytes)
        assert hashlib.sha256(source.read_bytes()).hexdigest() == sha256_file(result.path)

    def test_new_version_discards_old_progress(self, tmp_path, server_factory, small_chunks):
        """Progress recorded for another version of the file is discarded: versions never mix."""
        old = make_file(tmp_path / "old" / "v.bin", 4 * SMALL_CHUNK, seed=1)
        new = make_file(tmp_path / "new" / "v.bin", 4 * SMALL_CHUNK, seed=2)
        server = server_factory(small_chunks)
        server.add_file(new)
        engine = engine_for(tmp_path, server)
        out = tmp_path / "out"
        leave_earlier_run(engine, out, "v.bin", manifest_of_file(old, SMALL_CHUNK), old.read_bytes(), range(4))
        try:
            result = engine.download("v.bin", out)
        finally:
            engine.close()
        assert 0 == result.resumed_chunks
        assert sha256_file(new) == sha256_file(result.path)


    def test_a_download_killed_while_installing_is_not_listed_unfinished(self, tmp_path, server_factory,
                                                                       small_chunks):
        """Killed after the final name was linked: the next start records it as completed, not unfinished."""
        source = make_file(tmp_path / "src" / "k.bin", 2 * SMALL_CHUNK)
        server = server_factory(small_chunks)
        server.add_file(source)
        out = tmp_path / "out"
        engine = engine_for(tmp_path, server)
        try:
            leave_earlier_run(engine, out, "k.bin", engine.server.manifest("k.bin"), source.read_bytes(), range(2))
        finally:
            engine.close()
        os.link(out / "k.bin.part", out / "k.bin")  # how far install() had got
        engine = engine_for(tmp_path, server)
        try:
            seen = (engine.unfinished_downloads(), [Path(done.path).name for done in engine.store.completed_files()])
        finally:
            engine.close()
        assert (([], ["k.bin"]), ["k.bin"]) == (seen, sorted(p.name for p in out.iterdir()))


class TestLocalDiskProblems:
    def test_unwritable_output_folder(self, tmp_path, server_factory):
        """An output path that cannot be created fails with a one-line reason, not a traceback."""
        source = make_file(tmp_path / "src" / "a.bin", 100)
        server = server_factory()
        server.add_file(source)
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where a folder should be")
        engine = engine_for(tmp_path, server)
        try:
            with pytest.raises(DownloadError, match="a.bin: cannot write"):
                engine.download("a.bin", blocker / "sub")
        finally:
            engine.close()


class TestStopping:
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_paused_download_leaves_no_stale_replies_in_the_pool(self, tmp_path, server_factory, small_chunks):
        """After a download is stopped with requests in flight, the next request on the engine gets its own reply."""
        from error_handler import DownloadCancelled

        big = make_file(tmp_path / "src" / "big.bin", 200 * SMALL_CHUNK, seed=3)
        small = make_file(tmp_path / "src" / "small.bin", 1000, seed=4)
        server = server_factory(small_chunks)
        server.add_file(big)
        server.add_file(small)
        server.set_upload_limit(2_000_000)  # slow enough to be stopped midway
        cancel = threading.Event()
        engine = engine_for(tmp_path, server, on_progress=lambda p: p.chunks_done >= 5 and cancel.set())
        try:
            with pytest.raises(DownloadCancelled):
                engine.download("big.bin", tmp_path / "out", cancel)
            server.set_upload_limit(0)
            assert sha256_file(small) == sha256_file(engine.download("small.bin", tmp_path / "out").path)
            assert sha256_file(big) == sha256_file(engine.download("big.bin", tmp_path / "out").path)  # resumed
        finally:
            engine.close()


class TestOneHashPass:
    def test_a_fresh_download_never_reads_its_file_back(self, tmp_path, server_factory, small_chunks, monkeypatch):
        """Every byte is hashed once, as its chunk arrives: nothing of the .part file is read back to hash it again."""
        from minitorrent.common import partfile

        reads: list[int] = []
        read_exactly_at = partfile.read_exactly_at
        monkeypatch.setattr(partfile, "read_exactly_at",
                            lambda fd, view, offset: reads.append(offset) or read_exactly_at(fd, view, offset))
        source = make_file(tmp_path / "src" / "once.bin", 40 * SMALL_CHUNK + 5, seed=11)
        server = server_factory(small_chunks)
        server.add_file(source)
        engine = engine_for(tmp_path, server)
        try:
            result = engine.download("once.bin", tmp_path / "out")
        finally:
            engine.close()
        assert ([], sha256_file(source)) == (reads, sha256_file(result.path))
