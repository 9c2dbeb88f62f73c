"""The programs as a user runs them: real server and client processes, real signals."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    LONG_TIMEOUT,
    ROOT,
    SHORT_TIMEOUT,
    SlowProxy,
    client_config_for,
    make_file,
    run_client,
    wait_until,
    write_config,
)

from config_loader import load_config
from database import ClientStore, ServerStore
from integrity import sha256_file
from minitorrent.client.downloader import STREAMS_PER_DOWNLOAD
from minitorrent.wire.identity import load_or_create

CHUNK = 64 * 1024


@pytest.fixture
def shared(tmp_path, server_process):
    """A real server process sharing two files; yields (process, client config path, files)."""
    files = [make_file(tmp_path / "src" / "alpha report.txt", 3000, seed=1),
             make_file(tmp_path / "src" / "Beta Café.bin", 5 * CHUNK + 1, seed=2)]
    proc = server_process(write_config(tmp_path / "srv", {"transfer": {"chunk_size": CHUNK}}), add=files)
    return proc, client_config_for(tmp_path / "cli", proc.address), files


class TestList:
    def test_json_lists_every_file_with_its_fields(self, shared):
        """list --json prints objects with name, size, chunks, sha256 and downloads."""
        _, config, files = shared
        result = run_client(config, "list", "--json")
        assert 0 == result.returncode, result.stderr
        entries = {e["name"]: e for e in json.loads(result.stdout)}
        assert {"alpha report.txt", "Beta Café.bin"} == set(entries)
        beta = entries["Beta Café.bin"]
        assert (5 * CHUNK + 1, 6, sha256_file(files[1]), 0) == (beta["size"], beta["chunks"], beta["sha256"],
                                                                beta["downloads"])

    def test_search_is_case_insensitive(self, shared):
        """list --search matches any part of the name in any case, accents included."""
        _, config, _ = shared
        result = run_client(config, "list", "--json", "--search", "CAFÉ")
        assert ["Beta Café.bin"] == [e["name"] for e in json.loads(result.stdout)]

    def test_table_output(self, shared):
        """Plain list prints a header and one row per file with human sizes."""
        _, config, _ = shared
        lines = run_client(config, "list").stdout.splitlines()
        assert lines[0].startswith("NAME")
        assert 3 == len(lines)
        assert "320.0 KiB" in next(line for line in lines if line.startswith("Beta Café.bin"))


class TestGet:
    def test_get_several_files(self, shared, tmp_path):
        """get NAME NAME downloads both byte-exact and says so, exit 0."""
        _, config, files = shared
        out = tmp_path / "dl"
        result = run_client(config, "get", "alpha report.txt", "Beta Café.bin", "--output", str(out))
        assert 0 == result.returncode, result.stderr
        assert 2 == result.stdout.count("downloaded: ")
        for source in files:
            assert sha256_file(source) == sha256_file(out / source.name)

    def test_unknown_file_fails_with_one_line(self, shared, tmp_path):
        """An unknown name exits 1 with a one-line reason and no traceback."""
        _, config, _ = shared
        result = run_client(config, "get", "missing.txt", "--output", str(tmp_path / "dl"))
        assert 1 == result.returncode
        assert ["error: missing.txt: no such file on the server"] == result.stderr.strip().splitlines()

    def test_download_is_counted(self, shared, tmp_path):
        """After a finished download, list shows the file's download count and status shows it too."""
        _, config, _ = shared
        run_client(config, "get", "alpha report.txt", "--output", str(tmp_path / "dl"))
        entries = {e["name"]: e for e in json.loads(run_client(config, "list", "--json").stdout)}
        assert 1 == entries["alpha report.txt"]["downloads"]
        status = json.loads(run_client(config, "status", "--json").stdout)
        assert {"alpha report.txt": 1} == status["downloads_per_file"]
        assert ("main", "active", 1) == (status["server"], status["role"], status["epoch"])  # first activation takes epoch 1


class TestStatus:
    def test_status_prints_metrics(self, shared):
        """status prints both identities, then the server's counters, one per line."""
        _, config, _ = shared
        result = run_client(config, "status")
        assert 0 == result.returncode
        mine, headline, *lines = result.stdout.splitlines()
        assert f"this client's identity: {load_or_create(load_config(config).client.data_dir).id}" == mine
        server_id = next(line.split()[1] for line in lines if line.startswith("identity "))
        assert headline.startswith("main server at 127.0.0.1:")
        assert headline.endswith(f": active, epoch 1, identity {server_id}")
        keys = {line.split()[0] for line in lines if line and not line.startswith(" ")}
        assert {"uptime_s", "bytes_sent", "active_connections", "success_rate", "role", "epoch",
                "backup.replicating"} <= keys


class TestFailures:
    def test_unreachable_server(self, tmp_path):
        """With no server listening, a command exits 1 with one line naming the address."""
        import socket

        with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = client_config_for(tmp_path, ("127.0.0.1", port), {"client": {"retry_deadline": 0.5}})
        result = run_client(config, "list")
        assert 1 == result.returncode
        waiting, reason = result.stderr.strip().splitlines()  # what it waited for, then why it gave up
        assert f"waiting up to 0.5 s for a server at 127.0.0.1:{port} (none answers yet); Ctrl+C to stop" == waiting
        assert reason.startswith("error: ") and f"127.0.0.1:{port}" in reason, result.stderr

    def test_waiting_for_a_server_is_said_at_once(self, tmp_path):
        """With no server answering, the command says on stderr what it waits for and how long, before waiting."""
        config = client_config_for(tmp_path, ("127.0.0.1", _free_port()), {"client": {"retry_deadline": 60}})
        process = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "--config", str(config), "status"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            first_line = process.stderr.readline()  # blocks until it says something: the test times out if never
            still_waiting = process.poll() is None
        finally:
            process.kill()
            process.wait(SHORT_TIMEOUT)
            process.stderr.close()
        assert (True, "waiting up to 60 s for a server at 127.0.0.1:") == \
            (still_waiting, first_line[:len("waiting up to 60 s for a server at 127.0.0.1:")])

    def test_bad_config_is_one_line(self, tmp_path):
        """A config with a bad value exits 2 with one line naming the key."""
        config = tmp_path / "config.yaml"
        config.write_text("server:\n  main:\n    port: 99999\n")
        result = run_client(config, "list")
        assert 2 == result.returncode
        assert "server.main.port" in result.stderr and 1 == len(result.stderr.strip().splitlines())

    def test_add_missing_file(self, tmp_path):
        """main_server --add of a missing file exits 1 with a one-line reason."""
        config = write_config(tmp_path)
        result = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(config),
                                 "--headless", "--add", str(tmp_path / "nope.txt")],
                                capture_output=True, text=True, timeout=LONG_TIMEOUT)
        assert 1 == result.returncode
        assert "nope.txt: no such file" in result.stderr
        assert "Traceback" not in result.stderr

    def test_add_refuses_a_name_whose_part_file_could_not_exist(self, tmp_path):
        """--add of a file whose "<name>.part" would pass 255 bytes exits 1 with one line; nothing is added."""
        config = write_config(tmp_path)
        long_file = make_file(tmp_path / ("é" * 123 + ".bin"), 10, seed=1)
        result = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(config),
                                 "--headless", "--add", str(long_file)],
                                capture_output=True, text=True, timeout=LONG_TIMEOUT)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert (1, 1, True) == (result.returncode, len(errors), "partial download" in errors[0])
        with ServerStore(tmp_path / "server" / "catalog.db") as catalog:
            assert [] == catalog.list_files()


def _free_port() -> int:
    """A port that was free a moment ago: nothing listens there."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TestReaderGoneEarly:
    @pytest.mark.parametrize("command", [["status"], ["list", "--json"], ["list"]])
    def test_a_closed_pipe_ends_quietly(self, shared, command):
        """When whoever reads the output has gone (`| head -1`), the command exits 0 with nothing on stderr."""
        _, config, _ = shared
        process = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "--config", str(config), *command],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        process.stdout.close()  # the reader is gone before anything is printed: every write meets EPIPE
        _, stderr = process.communicate(timeout=LONG_TIMEOUT)
        assert (0, "") == (process.returncode, stderr)


class TestServerLifecycle:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_signal_stops_cleanly(self, tmp_path, server_process, sig):
        """SIGTERM or SIGINT stops the headless server with exit status 0."""
        proc = server_process(write_config(tmp_path))
        assert 0 == proc.stop(sig)

    def test_catalog_and_counts_survive_restart(self, tmp_path, server_process):
        """Files and download counts are still there after the server is stopped and started again."""
        source = make_file(tmp_path / "src" / "keep.txt", 1234)
        server_config = write_config(tmp_path / "srv")
        first = server_process(server_config, add=[source])
        run_client(client_config_for(tmp_path / "c1", first.address), "get", "keep.txt",
                   "--output", str(tmp_path / "dl"))
        assert 0 == first.stop()
        second = server_process(server_config)
        entries = json.loads(run_client(client_config_for(tmp_path / "c2", second.address), "list", "--json").stdout)
        assert [("keep.txt", 1234, 1)] == [(e["name"], e["size"], e["downloads"]) for e in entries]


class TestResumeAfterKill:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_sigkilled_client_resumes_without_refetching(self, tmp_path, server_process):
        """A client SIGKILLed mid-download resumes: verified chunks are not fetched again."""
        source = make_file(tmp_path / "src" / "movie.bin", 64 * CHUNK, seed=7)
        server = server_process(write_config(tmp_path / "srv", {"transfer": {"chunk_size": CHUNK}}), add=[source])
        proxy = SlowProxy(server.address, rate_bps=1_000_000)  # ~4 s for the whole file
        slow_config = client_config_for(tmp_path / "cli", proxy.address)
        out = tmp_path / "dl"
        first = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "--config", str(slow_config),
                                  "get", "movie.bin", "--output", str(out)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        store = ClientStore(tmp_path / "cli" / "client" / "client.db")
        try:
            wait_until(lambda: store.in_progress() and len(store.in_progress()[0].verified) >= 20,
                       LONG_TIMEOUT, "20 verified chunks")
            first.send_signal(signal.SIGKILL)
            first.wait(SHORT_TIMEOUT)
            verified_before = len(store.in_progress()[0].verified)
        finally:
            store.close()
            proxy.close()
        assert not (out / "movie.bin").exists()
        fast_config = client_config_for(tmp_path / "cli", server.address)
        sent_before = json.loads(run_client(fast_config, "status", "--json").stdout)["bytes_sent"]
        result = run_client(fast_config, "get", "movie.bin", "--output", str(out))
        assert 0 == result.returncode, result.stderr
        assert f"{verified_before} chunks resumed" in result.stdout
        sent_after = json.loads(run_client(fast_config, "status", "--json").stdout)["bytes_sent"]
        payload_sent = sent_after - sent_before
        missing_bytes = (64 - verified_before) * CHUNK
        assert missing_bytes <= payload_sent < missing_bytes + CHUNK  # headers only, not one chunk more
        assert sha256_file(source) == sha256_file(out / "movie.bin")
        assert not (out / "movie.bin.part").exists()

    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_sigkill_loses_at_most_the_chunks_in_flight(self, tmp_path, server_process):
        """Every chunk a client reported verified before SIGKILL is resumed; at most the ones being written are lost."""
        source = make_file(tmp_path / "src" / "movie.bin", 64 * CHUNK, seed=8)
        server = server_process(write_config(tmp_path / "srv", {"transfer": {"chunk_size": CHUNK}}), add=[source])
        proxy = SlowProxy(server.address, rate_bps=750_000)  # ~6 s for the whole file
        out = tmp_path / "dl"
        first = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "--config",
                                  str(client_config_for(tmp_path / "cli", proxy.address)), "get", "movie.bin",
                                  "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            # A line per 10 %, read as it is printed: 40 % is 26 chunks, far from a multiple of 8 (the old batches).
            reported = chunks_reported_at(first, percent_at_least=40.0)
            first.send_signal(signal.SIGKILL)
            first.wait(SHORT_TIMEOUT)
        finally:
            first.kill()
            proxy.close()
        store = ClientStore(tmp_path / "cli" / "client" / "client.db")
        try:
            [state] = store.in_progress()
        finally:
            store.close()
        written_not_recorded = chunks_sound_on_disk(out / "movie.bin.part", state.manifest) - state.verified
        result = run_client(client_config_for(tmp_path / "cli", server.address), "get", "movie.bin",
                            "--output", str(out))
        assert 0 == result.returncode, result.stderr
        resumed = int(re.search(r"(\d+) chunks resumed", result.stdout).group(1))
        assert (True, True) == (reported < 64, resumed >= reported), (reported, resumed)
        assert len(written_not_recorded) <= STREAMS_PER_DOWNLOAD, sorted(written_not_recorded)
        assert sha256_file(source) == sha256_file(out / "movie.bin")


def chunks_reported_at(process: subprocess.Popen, percent_at_least: float) -> int:
    """Read a ``get``'s progress lines until one reaches ``percent_at_least``; the chunks done it reports."""
    for line in process.stdout:
        match = re.search(r"movie\.bin\s+([\d.]+)%", line)
        if match and float(match.group(1)) >= percent_at_least:
            return round(float(match.group(1)) * 64 / 100)
    raise AssertionError("the client ended without reporting progress")


def chunks_sound_on_disk(part: Path, manifest) -> set[int]:
    """The chunks whose bytes in ``part`` match the manifest."""
    data = part.read_bytes()
    return {i for i in range(manifest.chunk_count)
            if manifest.verify_chunk(i, data[manifest.chunk_span(i)[0]:sum(manifest.chunk_span(i))])}



class TestAddManyFiles:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_every_file_reported_added_survives_sigkill(self, tmp_path):
        """main_server --add of 3,000 files, SIGKILLed once 1,200 are reported: each reported file is in the catalog."""
        sources = [make_file(tmp_path / "src" / f"small {i:04d}.txt", 64, seed=i) for i in range(3000)]
        config = write_config(tmp_path / "srv")
        adding = subprocess.Popen([sys.executable, str(ROOT / "main_server.py"), "--config", str(config),
                                   "--headless", "--add", *map(str, sources)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
        reported: list[str] = []
        try:
            for line in adding.stdout:
                if line.startswith("added: "):
                    reported.append(line[len("added: "):].split(" (", 1)[0])
                if len(reported) == 1200:
                    break
            adding.send_signal(signal.SIGKILL)
            adding.wait(SHORT_TIMEOUT)
        finally:
            adding.kill()
            adding.stdout.close()
        with ServerStore(tmp_path / "srv" / "server" / "catalog.db") as catalog:
            missing = [name for name in reported if catalog.get_file(name) is None]
            unstored = [name for name in reported if name not in missing
                        and sha256_file(tmp_path / "srv" / "server" / "store" / catalog.get_file(name).sha256)
                        != sha256_file(tmp_path / "src" / name)]
        assert (1200, [], []) == (len(reported), missing, unstored)


class TestFolders:
    @pytest.fixture
    def tree(self, tmp_path, server_process):
        """A real server sharing photos/ (nested, two small files and a multi-chunk one); yields (config, root)."""
        root = tmp_path / "src" / "photos"
        make_file(root / "2024" / "beach.jpg", 3000, seed=1)
        make_file(root / "2024" / "big.raw", 3 * CHUNK + 1, seed=2)
        make_file(root / "notes.txt", 10, seed=3)
        proc = server_process(write_config(tmp_path / "srv", {"transfer": {"chunk_size": CHUNK}}), add=[root])
        return client_config_for(tmp_path / "cli", proc.address), root

    def test_list_shows_folders(self, tree):
        """client.py list prints each folder with its file count before the files' paths."""
        config, _ = tree
        listed = run_client(config, "list")
        folders = [line.split()[0::3] for line in listed.stdout.splitlines() if line.startswith("photos/") and
                   line.split()[0].endswith("/")]
        assert (0, [["photos/", "3"], ["photos/2024/", "2"]]) == (listed.returncode, folders), listed.stdout

    def test_get_folder_keeps_the_structure(self, tree, tmp_path):
        """client.py get photos/ downloads every file at its relative path, verified; one summary line."""
        config, root = tree
        got = run_client(config, "get", "photos/", "--output", str(tmp_path / "out"))
        assert 0 == got.returncode, got.stderr
        for source in root.rglob("*"):
            if source.is_file():
                assert sha256_file(source) == sha256_file(tmp_path / "out" / source.relative_to(root.parent))
        assert "photos/: 3 downloaded, 0 already present, 0 failed, of 3 files" in got.stdout


class TestFolderResumeAfterKill:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_sigkilled_folder_download_resumes_and_completes(self, tmp_path, server_process):
        """client.py get tree/ SIGKILLed mid-way leaves no unverified file under a final name; run again, all arrive."""
        root = tmp_path / "src" / "tree"
        for i in range(300):
            make_file(root / f"d{i // 100}" / f"f{i:03d}.bin", 4096, seed=i)
        proc = server_process(write_config(tmp_path / "srv"), add=[root])
        proxy = SlowProxy(proc.address, 256 * 1024)  # ~5 s for the folder: room to kill it in the middle
        config = client_config_for(tmp_path / "cli", proxy.address)
        out = tmp_path / "out"
        staging = out / ".minitorrent-incoming"
        try:
            first = subprocess.Popen([sys.executable, str(ROOT / "client.py"), "--config", str(config), "get", "tree/",
                                      "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: sum(len(names) for _, _, names in os.walk(staging)) >= 50, LONG_TIMEOUT,
                           "50 files staged")
                first.send_signal(signal.SIGKILL)
                first.wait(SHORT_TIMEOUT)
            finally:
                first.kill()
            installed = [p for p in out.rglob("*.bin") if ".minitorrent-incoming" not in p.parts]
            wrong = [p for p in installed if sha256_file(p) != sha256_file(root.parent / p.relative_to(out))]
            again = run_client(config, "get", "tree/", "--output", str(out))
        finally:
            proxy.close()
        assert ([], 0) == (wrong, again.returncode), again.stderr
        assert "0 failed, of 300 files" in again.stdout
        for source in root.rglob("*.bin"):
            assert sha256_file(source) == sha256_file(out / source.relative_to(root.parent))
        assert not staging.exists()
