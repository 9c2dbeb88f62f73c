"""Failover and failback with real server processes: SIGKILL, SIGSTOP/SIGCONT, never a polite stop.

Each test builds a small cluster under ``tmp_path``: a main and a backup
process that know each other's fixed port from their configs (ports found
free by binding port 0 on a throwaway socket), ``server.secret`` set, short
heartbeats, and ``transfer.io_timeout: 2`` so a frozen server is given up on
quickly. Clients run in-process (``ClientEngine``) so a test sees every
``Progress`` event and the ``DownloadResult``. Every test bounds its own run
time and the ``cluster`` fixture SIGKILLs whatever is left (a SIGSTOPped
process included) in teardown.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import (
    LONG_TIMEOUT,
    ROOT,
    SHORT_TIMEOUT,
    TLS,
    SlowProxy,
    run_client,
    make_config,
    make_file,
    wait_until,
    write_config,
)

from config_loader import load_config
from database import ServerStore
from error_handler import NotActive
from integrity import sha256_file
from minitorrent.client.downloader import DownloadResult
from minitorrent.client.engine import ClientEngine
from minitorrent.client.progress import Progress
from minitorrent.common.launcher import ServerProcess, free_port
from minitorrent.net import remote
from minitorrent.net.remote import ServerSession
from minitorrent.server.backup import BackupServer
from minitorrent.server.catalog import Catalog
from minitorrent.server.main import MainServer
from minitorrent.wire import protocol

MiB = 1024 * 1024
SECRET = "correct horse battery staple"
IO_TIMEOUT_S = 2.0  # a frozen server is given up on after this long
STATUS_TIMEOUT_S = 2.0
CLIENT_RETRY_DEADLINE_S = 30.0  # far above heartbeat_timeout: a failover must never make a client give up
FAILOVER_TIMEOUT = 30.0  # heartbeat_timeout, a process start and a catch-up, on a loaded machine


# Helpers --------------------------------------------------------------------------------------------------


def status_of(address: tuple[str, int]) -> dict | None:
    """One server's own status, asked directly; None if it does not answer."""
    return remote.status_of(address, STATUS_TIMEOUT_S, TLS)


def catalog_of(data_dir: Path) -> dict[str, str]:
    """``{name: sha256}`` of the catalog in ``data_dir``, read from its database."""
    store = ServerStore(data_dir / "catalog.db")
    try:
        return {record.name: record.sha256 for record in store.list_files(None)}
    finally:
        store.close()


def downloads_of(data_dir: Path) -> dict[str, int]:
    """Downloads per name (the sum over origins) in the catalog in ``data_dir``."""
    store = ServerStore(data_dir / "catalog.db")
    try:
        return {record.name: record.downloads for record in store.list_files(None)}
    finally:
        store.close()


def holds(data_dir: Path, name: str, source: Path) -> bool:
    """True if the catalog in ``data_dir`` serves ``source``'s exact bytes under ``name``."""
    sha256 = sha256_file(source)
    blob = data_dir / "store" / sha256
    return catalog_of(data_dir).get(name) == sha256 and blob.is_file() and blob.stat().st_size == source.stat().st_size


def log_of(process: ServerProcess) -> str:
    """Everything the server wrote on stderr so far (its log)."""
    return process.stderr_path.read_text(encoding="utf-8")


def in_thread(function: Callable[[], object]) -> tuple[threading.Thread, dict]:
    """Run ``function`` in a thread; the dict gets ``result`` or ``error``."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="test-client", daemon=True)
    thread.start()
    return thread, outcome


def joined(thread: threading.Thread, outcome: dict, timeout: float = LONG_TIMEOUT):
    """Wait for ``in_thread``'s thread; its result, or its exception raised here."""
    thread.join(timeout)
    assert not thread.is_alive(), f"the client thread did not finish within {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class PortTaken(Exception):
    """A server could not bind its configured port: something else took it after ``free_port``."""


class Cluster:
    """A main and a backup process on fixed free ports, their configs, data folders and logs.

    Each server instance gets its own config folder (so its ``server.stderr``
    is its own log) while restarts of one server share its data folder.
    A port found free can be taken by another program before the server binds
    it (other test runs bind port 0 too): ``start_pair`` then moves both
    servers to new ports, and a restart waits for its port to be free again.
    """

    def __init__(self, root: Path, *, chunk_size: int, heartbeat_interval: float, heartbeat_timeout: float,
                 failback: str = "auto", backup_secret: str = SECRET):
        self.root = root
        self.main_port, self.backup_port = free_port(), free_port()
        self.main_dir, self.backup_dir = root / "main-data", root / "backup-data"
        self.chunk_size = chunk_size
        self.heartbeat = {"heartbeat_interval": heartbeat_interval, "heartbeat_timeout": heartbeat_timeout,
                          "failback": failback}
        self.backup_secret = backup_secret
        self.proxy_to_backup: SlowProxy | None = None  # set: the main replicates through it
        self.processes: list[ServerProcess] = []
        self.closers: list[Callable[[], None]] = []

    @property
    def main_sees_backup_at(self) -> int:
        return self.proxy_to_backup.address[1] if self.proxy_to_backup else self.backup_port

    @property
    def main_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.main_port)

    @property
    def backup_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.backup_port)

    def _settings(self, secret: str, backup_port: int) -> dict:
        return {
            "server": {
                "secret": secret,
                "main": {"host": "127.0.0.1", "port": self.main_port, "data_dir": str(self.main_dir)},
                "backup": {"host": "127.0.0.1", "port": backup_port, "data_dir": str(self.backup_dir),
                           **self.heartbeat},
            },
            "transfer": {"chunk_size": self.chunk_size, "io_timeout": IO_TIMEOUT_S},
        }

    def main_config(self, instance: str = "main") -> Path:
        """The main's config (its backup may be a proxy's address), in folder ``instance``."""
        return write_config(self.root / instance, self._settings(SECRET, self.main_sees_backup_at))

    def backup_config(self, instance: str = "backup") -> Path:
        return write_config(self.root / instance, self._settings(self.backup_secret, self.backup_port))

    def start_pair(self, add: list[Path] = ()) -> tuple[ServerProcess, ServerProcess]:
        """Start the main (sharing ``add``), then the backup; (main, backup)."""
        for _ in range(3):
            try:
                main = self._start(lambda: ServerProcess(self.main_config(), add))
            except PortTaken:
                self.main_port = free_port()
                continue
            try:
                return main, self._start(lambda: ServerProcess(self.backup_config(), script="backup_server.py"))
            except PortTaken:
                sigkill(main)  # it knows the old backup port: both start again on new ones
                self.main_port, self.backup_port = free_port(), free_port()
        raise AssertionError("three pairs of free ports were taken before the servers could bind them")

    def start_main_alone(self, add: list[Path] = ()) -> ServerProcess:
        """Start only the main (sharing ``add``); the backup may be started later with ``restart_backup``."""
        return self._restart(lambda: ServerProcess(self.main_config(), add))

    def start_backup_alone(self) -> ServerProcess:
        """Start only the backup (no main will ever beat: it promotes itself after heartbeat_timeout)."""
        return self._start(lambda: ServerProcess(self.backup_config(), script="backup_server.py"))

    def restart_main(self, instance: str) -> ServerProcess:
        """Start the main again on its data folder and port, logging to ``instance``/server.stderr."""
        return self._restart(lambda: ServerProcess(self.main_config(instance)))

    def restart_backup(self, instance: str) -> ServerProcess:
        return self._restart(lambda: ServerProcess(self.backup_config(instance), script="backup_server.py"))

    def _restart(self, start: Callable[[], ServerProcess]) -> ServerProcess:
        def started():
            try:
                return self._start(start)
            except PortTaken:
                return None
        return wait_until(started, SHORT_TIMEOUT, "the server's port to be free for its restart")

    def _start(self, start: Callable[[], ServerProcess]) -> ServerProcess:
        try:
            process = start()
        except RuntimeError as error:
            if "Address already in use" in str(error):
                raise PortTaken(str(error)) from error
            raise
        self.processes.append(process)
        return process

    def client(self, *, main_port: int | None = None, on_progress: Callable[[Progress], None] | None = None,
               instance: str = "client") -> ClientEngine:
        """An in-process client engine knowing both servers (the main possibly through a proxy)."""
        path = write_config(self.root / instance, {
            "server": {"main": {"host": "127.0.0.1", "port": main_port or self.main_port},
                       "backup": {"host": "127.0.0.1", "port": self.backup_port}},
            "client": {"retry_deadline": CLIENT_RETRY_DEADLINE_S},
            "transfer": {"io_timeout": IO_TIMEOUT_S},
        })
        engine = ClientEngine(load_config(path), on_progress=on_progress)
        self.closers.append(engine.close)
        return engine

    def status(self, which: str) -> dict | None:
        return status_of(self.main_address if which == "main" else self.backup_address)

    def roles(self) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """((main role, epoch), (backup role, epoch)); None for a server that does not answer."""
        main, backup = self.status("main"), self.status("backup")
        return ((main["role"], main["epoch"]) if main else None,
                (backup["role"], backup["epoch"]) if backup else None)

    def wait_replicated(self, files: dict[str, Path], timeout: float = LONG_TIMEOUT) -> None:
        """Wait until the backup's catalog serves each ``{name: source}`` byte-exact."""
        wait_until(lambda: all(holds(self.backup_dir, name, source) for name, source in files.items()),
                   timeout, f"the backup to replicate {sorted(files)}")

    def wait_paired(self) -> int:
        """Wait until the main is active and has a heartbeat answered by the standby backup; the main's epoch.

        The answer must carry the main's own epoch (the backup follows it): from then on the backup
        knows the main's epoch, so a promotion takes a higher one. An answer to a heartbeat sent before
        the main took its epoch does not count.
        """
        def paired():
            status = self.status("main")
            backup = (status or {}).get("backup", {})
            return (status and status["role"] == "active" and backup.get("role") == "standby"
                    and backup.get("epoch") == status["epoch"] and status["epoch"])
        return wait_until(paired, LONG_TIMEOUT, "the main's heartbeats to reach the standby backup")

    def wait_backup_active(self, above_epoch: int) -> int:
        """Wait until the backup serves as active with an epoch above ``above_epoch``; return it."""
        def promoted():
            status = self.status("backup")
            return status and status["role"] == "active" and status["epoch"] > above_epoch and status["epoch"]
        return wait_until(promoted, FAILOVER_TIMEOUT, f"the backup to become active above epoch {above_epoch}")

    def wait_main_took_back(self, backup_epoch: int, timeout: float = FAILOVER_TIMEOUT) -> tuple[int, int]:
        """Wait until the main is active with a new epoch above ``backup_epoch`` (the one the backup was
        active with) and the backup is on standby; returns (main, backup) epochs.

        The main's epoch is the highest of the two: the standby backup may
        adopt it from the heartbeats (``NodeState.follow``) but never exceed it.
        """
        def handed_back():
            main, backup = self.roles()
            if (main and backup and main[0] == "active" and backup[0] == "standby"
                    and main[1] > backup_epoch and main[1] >= backup[1]):
                return main[1], backup[1]
            return None
        return wait_until(handed_back, timeout,
                          f"the main to take the active role back with an epoch above {backup_epoch}")

    def close(self) -> None:
        for close in self.closers:
            close()
        for process in self.processes:
            process.kill()  # SIGKILL also ends a SIGSTOPped process


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Build clusters under ``tmp_path``; every process left is SIGKILLed, every proxy closed."""
    made: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        made.append(Cluster(tmp_path / f"cluster{len(made)}", **kwargs))
        return made[-1]

    yield make
    for built in made:
        built.close()


def sigkill(process: ServerProcess) -> None:
    """SIGKILL a server process and reap it."""
    process.process.send_signal(signal.SIGKILL)
    process.process.wait(SHORT_TIMEOUT)


def asleep_for_good(pid: int) -> Callable[[], bool]:
    """A condition: the process's main thread has been seen asleep in the kernel at every poll for 0.3 s."""
    since: list[float] = []

    def check() -> bool:
        if Path(f"/proc/{pid}/task/{pid}/wchan").read_text().strip() in ("", "0"):
            since.clear()
            return False
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] >= 0.3
    return check


# 1. The main dies mid-download ------------------------------------------------------------------------------


class TestMainKilledMidDownload:
    @pytest.mark.timeout(90)
    def test_download_finishes_from_backup_byte_exact(self, cluster, tmp_path):
        """SIGKILL of the main after >= 10 verified chunks: the client finishes from the backup, no chunk twice."""
        size = 64 * MiB
        source = make_file(tmp_path / "src" / "big.bin", size, seed=11)
        c = cluster(chunk_size=MiB, heartbeat_interval=1, heartbeat_timeout=3)
        main, _ = c.start_pair(add=[source])
        c.wait_replicated({"big.bin": source})
        main_epoch = c.wait_paired()
        proxy = SlowProxy(c.main_address, 8_000_000)  # about 8 s for the whole file: still running at the kill
        c.closers.append(proxy.close)
        events: list[Progress] = []
        engine = c.client(main_port=proxy.address[1], on_progress=events.append)
        thread, outcome = in_thread(lambda: engine.download("big.bin", tmp_path / "dl"))

        wait_until(lambda: events and events[-1].chunks_done >= 10, LONG_TIMEOUT, "10 verified chunks")
        sigkill(main)
        proxy.close()  # a dead server's port refuses connections
        chunks_at_kill = events[-1].chunks_done
        result: DownloadResult = joined(thread, outcome)

        assert chunks_at_kill < 64, "the download ended before the kill: the test proved nothing"
        assert sha256_file(source) == sha256_file(tmp_path / "dl" / "big.bin")
        assert (size, 0, 0) == (result.fetched_bytes, result.duplicate_chunks, result.resumed_chunks)
        assert 64 == events[-1].chunks_done
        backup = c.status("backup")
        assert ("active", True) == (backup["role"], backup["epoch"] > main_epoch), backup
        assert "backup" == engine.status()["server"]


# 2. The backup dies during its initial sync --------------------------------------------------------------------


class TestBackupKilledDuringInitialSync:
    @pytest.mark.timeout(90)
    def test_restarted_backup_resumes_without_recopying(self, cluster, tmp_path):
        """SIGKILL of the backup mid-sync, restart: only the chunks it had not verified are sent again."""
        size, chunk = 96 * MiB, 256 * 1024
        total = size // chunk
        source = make_file(tmp_path / "src" / "huge.bin", size, seed=12)
        c = cluster(chunk_size=chunk, heartbeat_interval=1, heartbeat_timeout=3)
        proxy = SlowProxy(lambda: c.backup_address, 24_000_000, pace="to_server")  # about 4 s for the whole sync
        c.closers.append(proxy.close)
        c.proxy_to_backup = proxy  # the main replicates through the proxy; clients would go direct
        main, backup = c.start_pair(add=[source])

        def quarter_acknowledged():
            status = c.status("main")
            lag = status and status["backup"]
            return lag and lag.get("files_pending") == 1 and lag["bytes_pending"] <= size * 3 // 4
        wait_until(quarter_acknowledged, LONG_TIMEOUT, "a quarter of the initial sync to be acknowledged")
        sigkill(backup)
        assert not holds(c.backup_dir, "huge.bin", source), "the sync ended before the kill: the test proved nothing"

        restarted = c.restart_backup(instance="backup-2")
        c.wait_replicated({"huge.bin": source})

        resumed = re.findall(r"resuming replication of huge\.bin: (\d+) of (\d+) chunks already verified",
                             log_of(restarted))
        sent = wait_until(lambda: [int(n) for n in re.findall(r"sent (\d+) chunks of huge\.bin to the backup",
                                                              log_of(main))],
                          SHORT_TIMEOUT, "the main to log the chunks it sent")  # it logs after the last ack
        assert 1 == len(resumed), log_of(restarted)
        already, of = map(int, resumed[0])
        assert (total, True) == (of, already >= total // 4), resumed
        assert [total - already] == sent, "chunks the backup had verified were sent again"
        blob = c.backup_dir / "store" / sha256_file(source)
        assert sha256_file(source) == sha256_file(blob)
        assert [] == sorted(p.name for p in (c.backup_dir / "store").glob(".replica-*"))
        assert ("standby", "active") == (c.status("backup")["role"], c.status("main")["role"])


# 3. Failover and failback with one client throughout -----------------------------------------------------------


class TestFailback:
    @pytest.mark.timeout(90)
    def test_restarted_main_catches_up_and_takes_back_the_role(self, cluster, tmp_path):
        """Main killed, backup serves (and counts), main restarts, catches up, takes over; counts once per client."""
        files = {"alpha.bin": make_file(tmp_path / "src" / "alpha.bin", 3 * MiB + 5, seed=21),
                 "beta.bin": make_file(tmp_path / "src" / "beta.bin", 2 * MiB, seed=22)}
        c = cluster(chunk_size=256 * 1024, heartbeat_interval=0.5, heartbeat_timeout=2)
        main, _ = c.start_pair(add=list(files.values()))
        c.wait_replicated(files)
        engine = c.client()

        assert {"alpha.bin", "beta.bin"} == {e["name"] for e in engine.list_files()}
        engine.download("alpha.bin", tmp_path / "dl1")
        assert ("main", 1) == (engine.status()["server"], downloads_of(c.main_dir)["alpha.bin"])
        main_epoch = c.wait_paired()

        sigkill(main)
        backup_epoch = c.wait_backup_active(above_epoch=main_epoch)
        assert {"alpha.bin", "beta.bin"} == {e["name"] for e in engine.list_files()}
        engine.download("beta.bin", tmp_path / "dl2")  # counted by the backup alone
        assert sha256_file(files["beta.bin"]) == sha256_file(tmp_path / "dl2" / "beta.bin")
        assert "backup" == engine.status()["server"]

        restarted = c.restart_main(instance="main-2")
        c.wait_main_took_back(backup_epoch)
        assert "catching up" in log_of(restarted)

        listing = {e["name"]: e for e in engine.list_files()}
        assert "main" == engine.status()["server"]
        assert {"alpha.bin": 1, "beta.bin": 1} == {name: e["downloads"] for name, e in listing.items()}
        engine.download("alpha.bin", tmp_path / "dl1-again")  # the same client again: counted once per file
        other = c.client(instance="client-2")  # another client's download counts
        other.download("alpha.bin", tmp_path / "dl3")
        assert sha256_file(files["alpha.bin"]) == sha256_file(tmp_path / "dl3" / "alpha.bin")
        wait_until(lambda: downloads_of(c.backup_dir) == {"alpha.bin": 2, "beta.bin": 1}, SHORT_TIMEOUT,
                   "the main to replicate the merged counts back to the backup")


    @pytest.mark.timeout(90)
    def test_file_added_on_the_active_backup_reaches_the_main(self, cluster, tmp_path):
        """backup_server.py --add on the active backup: served at once, and the main holds it after taking the role back."""
        first = make_file(tmp_path / "src" / "first.bin", MiB, seed=23)
        added = make_file(tmp_path / "src" / "added.bin", MiB + 7, seed=24)
        c = cluster(chunk_size=256 * 1024, heartbeat_interval=0.5, heartbeat_timeout=2)
        main, _ = c.start_pair(add=[first])
        c.wait_replicated({"first.bin": first})
        main_epoch = c.wait_paired()
        refused = run_backup(c, "--add", added)
        assert (1, "error: the backup is not active (standby): change the catalog on the main\n") == (
            refused.returncode, refused.stderr)

        sigkill(main)
        backup_epoch = c.wait_backup_active(above_epoch=main_epoch)
        run = run_backup(c, "--add", added)
        assert (0, "added: added.bin") == (run.returncode, run.stdout.split(" (")[0]), run.stderr
        engine = c.client()
        assert sha256_file(added) == sha256_file(engine.download("added.bin", tmp_path / "dl").path)

        c.restart_main(instance="main-2")
        c.wait_main_took_back(backup_epoch)
        assert True is holds(c.main_dir, "added.bin", added)


def run_backup(c: Cluster, *args: str | Path) -> subprocess.CompletedProcess:
    """``backup_server.py ARGS`` (``--add``, ``--remove``, ``--rename``) beside the cluster's running backup."""
    return subprocess.run([sys.executable, str(ROOT / "backup_server.py"), "--config", str(c.backup_config()),
                           *map(str, args)], capture_output=True, text=True, timeout=LONG_TIMEOUT, check=False)


class TestRemovalsOnTheActiveBackup:
    """What the active backup removed or renamed stays so once the main has taken the role back (tombstones)."""

    def fail_over(self, c: Cluster, files: list[Path]) -> int:
        """Start the pair sharing ``files``, SIGKILL the main; the epoch the backup is active with."""
        main, _ = c.start_pair(add=files)
        c.wait_replicated({f.name: f for f in files})
        main_epoch = c.wait_paired()
        sigkill(main)
        return c.wait_backup_active(above_epoch=main_epoch)

    def fail_back(self, c: Cluster, backup_epoch: int) -> None:
        """Restart the main; wait until it took the role back and the backup's catalog is the main's again."""
        c.restart_main(instance="main-2")
        c.wait_main_took_back(backup_epoch)
        wait_until(lambda: catalog_of(c.backup_dir) == catalog_of(c.main_dir), LONG_TIMEOUT,
                   "the backup to follow the main's catalog")

    @pytest.mark.timeout(90)
    def test_removed_and_renamed_files_stay_gone_on_both(self, cluster, tmp_path):
        """--remove and --rename on the active backup, then failback: gone on both servers and from clients' lists."""
        files = [make_file(tmp_path / "src" / name, 300_000 + n, seed=40 + n)
                 for n, name in enumerate(("keep.bin", "gone.bin", "old.bin"))]
        c = cluster(chunk_size=256 * 1024, heartbeat_interval=0.5, heartbeat_timeout=2)
        backup_epoch = self.fail_over(c, files)
        run = run_backup(c, "--remove", "gone.bin", "--rename", "old.bin", "new.bin")
        assert (0, "removed: gone.bin (1 files)\nrenamed: old.bin -> new.bin (1 files)\n") == (
            run.returncode, run.stdout), run.stderr

        self.fail_back(c, backup_epoch)
        expected = {"keep.bin": sha256_file(files[0]), "new.bin": sha256_file(files[2])}
        assert (expected, expected) == (catalog_of(c.main_dir), catalog_of(c.backup_dir))
        assert ["keep.bin", "new.bin"] == sorted(e["name"] for e in c.client().list_files())

    @pytest.mark.timeout(90)
    def test_a_file_added_again_after_its_removal_survives(self, cluster, tmp_path):
        """Removed then added again on the active backup (same content, and other content): both kept after failback."""
        same, replaced = make_file(tmp_path / "src" / "same.bin", 200_000, seed=50), make_file(
            tmp_path / "src" / "replaced.bin", 200_000, seed=51)
        newer = make_file(tmp_path / "newer" / "replaced.bin", 210_000, seed=52)
        c = cluster(chunk_size=256 * 1024, heartbeat_interval=0.5, heartbeat_timeout=2)
        backup_epoch = self.fail_over(c, [same, replaced])
        assert 0 == run_backup(c, "--remove", "same.bin", "replaced.bin").returncode
        run = run_backup(c, "--add", same, newer)
        assert 0 == run.returncode, run.stderr

        self.fail_back(c, backup_epoch)
        expected = {"same.bin": sha256_file(same), "replaced.bin": sha256_file(newer)}
        assert (expected, expected) == (catalog_of(c.main_dir), catalog_of(c.backup_dir))
        assert True is holds(c.main_dir, "replaced.bin", newer)


# 4. Split brain ----------------------------------------------------------------------------------------------------


class TestSplitBrain:
    @pytest.mark.timeout(90)
    def test_frozen_main_reconciles_with_active_backup(self, cluster, tmp_path):
        """Main SIGSTOPped past heartbeat_timeout, files added on both sides, SIGCONT: one active, nothing lost.

        The rule for two different files under one name (catalog.py, and
        ``_fetch_if_missing`` in replication.py): when the main catches up from
        the backup, the **main's** file keeps the name and the backup's other
        content is kept beside it as ``"stem (2).ext"`` (then ``(3)``, ...); the
        main then replicates both names back, so both catalogs end equal.

        The backup accepts no new files from users today, so the test writes
        one into its catalog directly (``Catalog.add_file`` on its data folder)
        to stand in for a file acknowledged by the backup while it was active.
        """
        src = tmp_path / "src"
        files = {"alpha.bin": make_file(src / "alpha.bin", MiB + 17, seed=31),
                 "beta.bin": make_file(src / "beta.bin", 700_000, seed=32)}
        new_file = make_file(src / "new.bin", 2 * MiB, seed=33)
        main_clash = make_file(src / "main-side" / "clash.txt", 300_000, seed=34)
        backup_clash = make_file(src / "backup-side" / "clash.txt", 200_000, seed=35)
        c = cluster(chunk_size=256 * 1024, heartbeat_interval=0.5, heartbeat_timeout=2)
        main, _ = c.start_pair(add=list(files.values()))
        c.wait_replicated(files)
        main_epoch = c.wait_paired()

        main.process.send_signal(signal.SIGSTOP)
        c.closers.insert(0, lambda: main.process.poll() is None and main.process.send_signal(signal.SIGCONT))
        backup_epoch = c.wait_backup_active(above_epoch=main_epoch)

        added = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(c.main_config()),
                                "--headless", "--add", str(new_file), str(main_clash)],
                               capture_output=True, text=True, timeout=LONG_TIMEOUT)
        assert 0 == added.returncode, added.stderr
        assert "added: new.bin" in added.stdout and "already running" in added.stdout, added.stdout
        backup_catalog = Catalog(c.backup_dir, c.chunk_size)
        try:
            backup_catalog.add_file(backup_clash)
        finally:
            backup_catalog.close()
        engine = c.client()
        engine.download("alpha.bin", tmp_path / "dl")  # skips the frozen main, counted by the backup
        assert 1 == downloads_of(c.backup_dir)["alpha.bin"]

        main.process.send_signal(signal.SIGCONT)
        expected = {**files, "new.bin": new_file, "clash.txt": main_clash, "clash (2).txt": backup_clash}

        def reconciled():
            if not all(holds(d, name, path) for d in (c.main_dir, c.backup_dir) for name, path in expected.items()):
                return None
            main_role, backup_role = c.roles()
            return (main_role and backup_role and main_role[0] == "active" and backup_role[0] == "standby"
                    and (main_role, backup_role))
        try:
            main_role, backup_role = wait_until(reconciled, FAILOVER_TIMEOUT, "one active server, equal catalogs")
        except AssertionError as timed_out:
            wanted = {name: sha256_file(path)[:8] for name, path in expected.items()}
            held = [{n: h[:8] for n, h in catalog_of(d).items()} for d in (c.main_dir, c.backup_dir)]
            raise AssertionError(f"{timed_out}: roles {c.roles()}; expected {wanted}; main holds {held[0]}; "
                                 f"backup holds {held[1]} (a file only the backup held was lost?)") from None

        assert main_role[1] > backup_epoch and main_role[1] >= backup_role[1], (main_role, backup_role)
        assert set(expected) == set(catalog_of(c.main_dir)) == set(catalog_of(c.backup_dir))
        listing = {e["name"]: e["downloads"] for e in engine.list_files()}
        assert "main" == engine.status()["server"]
        assert 1 == listing["alpha.bin"], listing

    @pytest.mark.timeout(60)
    def test_backup_that_never_heard_the_main_does_not_stay_active_beside_it(self, cluster, tmp_path):
        """A main frozen before its first heartbeat reached the backup: after SIGCONT exactly one is active.

        The main, finding no backup at start, serves alone and takes epoch 1;
        the backup, which never heard that epoch, promotes itself to epoch 1
        too. A server steps down only for a strictly higher epoch, so without
        a rule for the tie both would serve as active at epoch 1 for ever. The
        rule: an active backup at the main's own epoch makes the main step
        down, catch up and take the role back with a higher epoch.
        """
        source = make_file(tmp_path / "src" / "doc.bin", 600_000, seed=36)
        c = cluster(chunk_size=256 * 1024, heartbeat_interval=0.5, heartbeat_timeout=2)
        main = c.start_main_alone(add=[source])
        def serving_alone():
            status = c.status("main")
            return status and status["role"] == "active" and status["epoch"]
        main_epoch = wait_until(serving_alone, SHORT_TIMEOUT, "the main to serve alone")
        main.process.send_signal(signal.SIGSTOP)
        c.closers.insert(0, lambda: main.process.poll() is None and main.process.send_signal(signal.SIGCONT))
        c.restart_backup(instance="backup")
        backup_epoch = c.wait_backup_active(above_epoch=0)
        assert main_epoch == backup_epoch, "not the tie this test is about"

        main.process.send_signal(signal.SIGCONT)

        def one_active():
            main_role, backup_role = c.roles()
            one = main_role and backup_role and {main_role[0], backup_role[0]} == {"active", "standby"}
            return one and holds(c.backup_dir, "doc.bin", source) and (main_role, backup_role)
        try:
            main_role, backup_role = wait_until(one_active, FAILOVER_TIMEOUT, "exactly one active server")
        except AssertionError as timed_out:
            raise AssertionError(f"{timed_out}: (main, backup) = {c.roles()}") from None
        assert ("active", "standby") == (main_role[0], backup_role[0])
        assert main_role[1] > backup_epoch and main_role[1] >= backup_role[1], (main_role, backup_role)


# 5. Authentication ---------------------------------------------------------------------------------------------------


class TestFrozenMainCostsLittle:
    @pytest.mark.timeout(120)
    def test_a_new_list_waits_at_most_heartbeat_timeout_and_a_second(self, cluster, tmp_path):
        """With the main SIGSTOPped, a new `client.py list` (io_timeout 10 s) ends within heartbeat_timeout + 1 s
        of the freeze, beyond what a list costs anyway (process start included, measured just before)."""
        source = make_file(tmp_path / "src" / "alpha.bin", 300_000, seed=61)
        heartbeat_timeout = 3.0
        c = cluster(chunk_size=256 * 1024, heartbeat_interval=0.5, heartbeat_timeout=heartbeat_timeout)
        main, _ = c.start_pair(add=[source])
        c.wait_replicated({"alpha.bin": source})
        c.wait_paired()
        config = write_config(tmp_path / "cli", {
            "server": {"main": {"host": "127.0.0.1", "port": c.main_port},
                       "backup": {"host": "127.0.0.1", "port": c.backup_port}},
            "client": {"retry_deadline": CLIENT_RETRY_DEADLINE_S, "seeding": False},
            "transfer": {"io_timeout": 10.0}})
        started = time.monotonic()
        assert "alpha.bin" in run_client(config, "list").stdout
        baseline = time.monotonic() - started

        main.process.send_signal(signal.SIGSTOP)
        c.closers.insert(0, lambda: main.process.poll() is None and main.process.send_signal(signal.SIGCONT))
        frozen_at = time.monotonic()
        listed = run_client(config, "list")
        elapsed = time.monotonic() - frozen_at
        assert (0, True) == (listed.returncode, "alpha.bin" in listed.stdout), listed.stderr
        assert elapsed <= heartbeat_timeout + 1.0 + baseline, (
            f"list took {elapsed:.2f} s with the main frozen (a list costs {baseline:.2f} s)")


class TestWrongSecret:
    @pytest.mark.timeout(60)
    def test_refused_on_both_sides_and_nothing_replicated(self, cluster, tmp_path):
        """A backup with another secret: both logs say so, nothing is replicated, the backup promotes itself."""
        source = make_file(tmp_path / "src" / "doc.bin", 300_000, seed=41)
        c = cluster(chunk_size=64 * 1024, heartbeat_interval=0.5, heartbeat_timeout=2,
                    backup_secret="not the main's secret")
        main, backup = c.start_pair(add=[source])

        wait_until(lambda: "failed authentication: the main and the backup must set the same server.secret" in log_of(backup), SHORT_TIMEOUT,
                   "the backup to log the peer's failed authentication")
        wait_until(lambda: "could not prove it knows the cluster key" in log_of(main), SHORT_TIMEOUT,
                   "the main to log that the backup could not prove the secret")
        epoch = c.wait_backup_active(above_epoch=0)

        assert 1 == epoch
        assert {} == catalog_of(c.backup_dir)
        assert [] == [p.name for p in (c.backup_dir / "store").iterdir()]
        assert not re.search(r"peer \S+ authenticated", log_of(backup)), log_of(backup)
        assert False is c.status("main")["backup"]["connected"]


# 6. Manual failback ------------------------------------------------------------------------------------------------


class TestManualFailback:
    @pytest.mark.timeout(90)
    def test_main_waits_for_the_operator(self, cluster, tmp_path):
        """failback: manual: the restarted main stays standby until the backup gets SIGUSR1."""
        source = make_file(tmp_path / "src" / "doc.bin", MiB, seed=51)
        c = cluster(chunk_size=256 * 1024, heartbeat_interval=0.5, heartbeat_timeout=2, failback="manual")
        main, backup = c.start_pair(add=[source])
        c.wait_replicated({"doc.bin": source})
        main_epoch = c.wait_paired()
        sigkill(main)
        backup_epoch = c.wait_backup_active(above_epoch=main_epoch)

        restarted = c.restart_main(instance="main-2")
        wait_until(lambda: log_of(restarted).count("waits for its operator") >= 3, FAILOVER_TIMEOUT,
                   "the main to ask for the role three times")
        main_role, backup_role = c.roles()
        assert ("standby", ("active", backup_epoch)) == (main_role[0], backup_role), (main_role, backup_role)
        engine = c.client()
        assert ["doc.bin"] == [e["name"] for e in engine.list_files()]
        assert "backup" == engine.status()["server"]

        backup.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: "the operator approved" in log_of(backup), SHORT_TIMEOUT,
                   "the backup to act on SIGUSR1 (lost? see test_sigusr1_to_any_thread_is_acted_on)")
        c.wait_main_took_back(backup_epoch)
        assert ["doc.bin"] == [e["name"] for e in engine.list_files()]
        assert "main" == engine.status()["server"]


class TestSignals:
    @pytest.mark.timeout(30)
    def test_sigusr1_reaches_the_main_thread_whatever_the_kernel_picks(self, cluster):
        """SIGUSR1 approves the hand-back: every thread blocks it, so the kernel queues it for the main thread's sigwait.

        POSIX lets the kernel hand a process-directed signal to any thread that
        does not block it, and Python runs handlers only in the main thread
        when it runs Python code: a signal handed to a worker while the main
        thread sleeps would be lost. ``daemon.serve_until_signalled`` blocks
        the signals before any thread starts (threads inherit the mask) and
        waits for them with ``sigwait``. Checked here on the real process:
        every worker thread's blocked mask holds SIGUSR1, and a plain kill is acted on.
        """
        c = cluster(chunk_size=64 * 1024, heartbeat_interval=0.5, heartbeat_timeout=60, failback="manual")
        backup = c.start_backup_alone()
        pid = backup.process.pid
        wait_until(asleep_for_good(pid), SHORT_TIMEOUT, "the backup's main thread to wait for signals")
        bit = 1 << (signal.SIGUSR1 - 1)
        workers = [tid for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
        assert workers
        # (The main thread's own mask reads empty while it sits in sigwait: the kernel opens it for the wait.)
        assert all(int(_status_field(pid, tid, "SigBlk"), 16) & bit for tid in workers)

        os.kill(pid, signal.SIGUSR1)
        wait_until(lambda: "the operator approved" in log_of(backup), SHORT_TIMEOUT,
                   "the backup to act on SIGUSR1")


def _status_field(pid: int, tid: str, field: str) -> str:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split()[1]
    raise AssertionError(f"{field} missing from /proc/{pid}/task/{tid}/status")


# 7. Fencing by a client's hello: only a proven epoch counts ---------------------------------------------------


def proven(epoch: int, server_id: str = "the-other-server") -> remote.EpochClaim:
    """What a client relays after a server holding SECRET welcomed it with ``epoch``."""
    from minitorrent.wire import auth

    return remote.EpochClaim(epoch, server_id, auth.prove_epoch(SECRET, epoch, server_id))


class TestClientHelloFencing:
    @pytest.mark.timeout(30)
    def test_main_alone_ignores_an_unproven_higher_epoch(self, server_factory):
        """A main serving alone keeps its role and epoch when a client claims a higher epoch without a proof."""
        engine: MainServer = server_factory()  # no backup: active alone
        host, port = engine.server.address
        epoch = status_of((host, port))["epoch"]
        events = []
        engine.node.listeners.insert(0, events.append)

        claim = remote.EpochClaim(epoch + 5, "someone", "0" * 64)
        ServerSession.open(host, port, io_timeout_s=SHORT_TIMEOUT, claim=claim, secure=TLS).close()
        assert ([], "active", epoch) == (events, engine.node.role.value, engine.node.epoch)

    @pytest.mark.timeout(30)
    def test_promoted_backup_steps_down_on_a_proven_higher_epoch(self, tmp_path):
        """An active backup greeted by a client relaying a proven newer epoch refuses its next request."""
        config = make_config(tmp_path / "backup", {"server": {"secret": SECRET, "backup": {
            "heartbeat_interval": 1, "heartbeat_timeout": 60}}})
        engine = BackupServer(config)
        host, port = engine.start()
        try:
            epoch = engine.promote_now()
            client = ServerSession.open(host, port, io_timeout_s=SHORT_TIMEOUT, secure=TLS)
            assert ("active", True) == (client.welcome.role, bool(client.welcome.epoch_proof))
            client.call(protocol.ListFiles("", 0), protocol.FileList)  # served while current
            newer = ServerSession.open(host, port, io_timeout_s=SHORT_TIMEOUT, claim=proven(epoch + 1), secure=TLS)
            newer.close()
            with pytest.raises(NotActive):
                client.call(protocol.ListFiles("", 0), protocol.FileList)  # the same connection, now refused
            client.close()
            assert ("standby", epoch) == (engine.node.role.value, engine.node.epoch)
        finally:
            engine.stop()


# 8. The operator's promotion while the main lives -----------------------------------------------------------------


class TestOperatorPromotion:
    @pytest.mark.timeout(60)
    def test_backup_keeps_the_role_it_was_given_until_the_operator_hands_it_back(self, tmp_path):
        """Promote now beside a live main with failback auto: the backup keeps the role until approved, then hands it back."""
        ports = {"main": free_port(), "backup": free_port()}
        settings = {"server": {"secret": SECRET, "main": {"port": ports["main"]}, "backup": {
            "port": ports["backup"], "heartbeat_interval": 0.3, "heartbeat_timeout": 3, "failback": "auto"}}}
        backup = BackupServer(make_config(tmp_path / "backup", settings))
        backup.start()
        main = MainServer(make_config(tmp_path / "main", settings))
        try:
            main.start()
            wait_until(lambda: main.node.is_active() and backup.node.epoch == main.node.epoch, LONG_TIMEOUT,
                       "the pair to form")
            epoch = backup.promote_now()
            wait_until(lambda: backup.seconds_since_handback_request() is not None, LONG_TIMEOUT,
                       "the main to ask for the role back")
            wait_until(lambda: "waiting for the operator" in backup.loop.last().get("reason", ""),
                       LONG_TIMEOUT, "the backup to answer the main's request")
            held = (backup.node.role.value, backup.node.epoch, main.node.role.value, backup.main_link()["failback"])
            assert ("active", epoch, "standby", "manual") == held
            backup.approve_handback()
            wait_until(lambda: main.node.is_active() and main.node.epoch > epoch and not backup.node.is_active(),
                       LONG_TIMEOUT, "the main to take the role back once approved")
        finally:
            main.stop()
            backup.stop()
