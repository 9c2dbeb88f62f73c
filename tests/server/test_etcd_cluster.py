"""Three servers electing their leader in a real etcd: SIGKILL, SIGSTOP/SIGCONT, etcd itself stopped.

Every member is a real ``main_server.py --headless`` process with
``cluster.mode: etcd``; etcd runs on free ports with its data in tmp_path
(the ``etcd`` fixture: skipped without etcd, a failure with REQUIRE_ETCD=1).
The leader lease lasts ``TTL_S``; after a SIGKILL another member must lead
within TTL + 1 s of the kill.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import (
    LONG_TIMEOUT,
    ROOT,
    SHORT_TIMEOUT,
    TLS,
    make_file,
    wait_until,
    write_config,
)

from config_loader import load_config
from error_handler import NotActive
from integrity import sha256_file
from minitorrent.client.engine import ClientEngine
from minitorrent.client.progress import Progress
from minitorrent.common.launcher import ServerProcess, free_port
from minitorrent.net import remote
from minitorrent.net.remote import ServerSession
from minitorrent.server.member import leader_name
from minitorrent.wire import protocol

MiB = 1024 * 1024
SECRET = "etcd cluster test secret"
TTL_S = 2
INTERVAL_S = 0.5
IO_TIMEOUT_S = 2.0
NAMES = ("a", "b", "c")


class EtcdCluster:
    """Three members on free ports, one config folder per member (its log is ``<name>/server.stderr``)."""

    def __init__(self, root: Path, etcd, ack: str = "leader", chunk_size: int = MiB) -> None:
        self.root = root
        self.etcd = etcd
        self.ports = {name: free_port() for name in NAMES}
        self.ack = ack
        self.chunk_size = chunk_size
        self.processes: dict[str, ServerProcess] = {}
        self.closers: list[Callable[[], None]] = []

    def settings(self, name: str = "") -> dict:
        servers = [{"name": n, "host": "127.0.0.1", "port": p, "data_dir": str(self.root / f"{n}-data")}
                   for n, p in self.ports.items()]
        return {
            "server": {"secret": SECRET,
                       "main": {"host": "127.0.0.1", "port": self.ports["a"]},
                       "backup": {"host": "127.0.0.1", "port": self.ports["b"], "heartbeat_interval": INTERVAL_S,
                                  "heartbeat_timeout": TTL_S}},
            "cluster": {"mode": "etcd", "name": name, "ack": self.ack, "servers": servers,
                        "etcd": {"endpoints": [self.etcd.endpoint], "prefix": "/test"}},
            "transfer": {"chunk_size": self.chunk_size, "io_timeout": IO_TIMEOUT_S},
        }

    def config_path(self, name: str) -> Path:
        return write_config(self.root / name, self.settings(name))

    def start(self, name: str, add: list[Path] = ()) -> ServerProcess:
        self.processes[name] = ServerProcess(self.config_path(name), add)
        return self.processes[name]

    def status(self, name: str) -> dict | None:
        return remote.status_of(("127.0.0.1", self.ports[name]), 1.0, TLS)

    def leader(self, *, excluding: str = "") -> tuple[str, int] | None:
        """(name, epoch) of the one member that is active, if exactly one is (among those not ``excluding``)."""
        active = []
        for name in NAMES:
            status = self.status(name) if name != excluding else None
            if status and status["role"] == "active":
                active.append((name, status["epoch"]))
        return active[0] if len(active) == 1 else None

    def wait_leader(self, *, excluding: str = "", above: int = 0, timeout: float = LONG_TIMEOUT) -> tuple[str, int]:
        def found():
            leader = self.leader(excluding=excluding)
            return leader if leader and leader[1] > above else None
        return wait_until(found, timeout, f"one leader with an epoch above {above}")

    def holds(self, name: str, source: Path) -> bool:
        """True if member ``name``'s catalog lists ``source``'s content (asked over a peer link)."""
        from minitorrent.server.member import holders

        return name in holders(load_config(self.config_path(name)), sha256_file(source))

    def client(self, on_progress: Callable[[Progress], None] | None = None, download_limit: int = 0) -> ClientEngine:
        path = write_config(self.root / "client", {**self.settings(), "client": {"retry_deadline": 30.0},
                                                   "transfer": {"io_timeout": IO_TIMEOUT_S,
                                                                "download_limit": download_limit}})
        engine = ClientEngine(load_config(path), on_progress=on_progress)
        self.closers.append(engine.close)
        return engine

    def log(self, name: str) -> str:
        return self.processes[name].stderr_path.read_text(encoding="utf-8")

    def close(self) -> None:
        for close in self.closers:
            close()
        for process in self.processes.values():
            process.kill()  # SIGKILL also ends a SIGSTOPped process


@pytest.fixture
def etcd_cluster(tmp_path, etcd):
    made: list[EtcdCluster] = []

    def make(**kwargs) -> EtcdCluster:
        made.append(EtcdCluster(tmp_path / f"cluster{len(made)}", etcd, **kwargs))
        return made[-1]

    yield make
    for built in made:
        built.close()


def started_with(cluster: EtcdCluster, files: list[Path]) -> tuple[str, int]:
    """Start "a" alone sharing ``files`` (it leads), then "b" and "c"; wait until both hold every file."""
    cluster.start("a", files)
    leader = cluster.wait_leader()
    cluster.start("b")
    cluster.start("c")
    wait_until(lambda: all(cluster.holds(n, f) for n in ("b", "c") for f in files), LONG_TIMEOUT,
               "b and c to replicate the files")
    return leader


def sigkill(process: ServerProcess) -> None:
    process.process.send_signal(signal.SIGKILL)
    process.process.wait(SHORT_TIMEOUT)


class TestLeaderKilledMidDownload:
    @pytest.mark.timeout(120)
    def test_another_leads_within_the_ttl_and_the_download_is_byte_exact(self, etcd_cluster, tmp_path):
        """SIGKILL of the leader mid-download: another member leads with a higher epoch within TTL + 1 s; no chunk twice."""
        size = 24 * MiB
        source = make_file(tmp_path / "src" / "big.bin", size, seed=7)
        cluster = etcd_cluster()
        leader, epoch = started_with(cluster, [source])
        events: list[Progress] = []
        client = cluster.client(on_progress=events.append, download_limit=6 * MiB)  # about 4 s: running at the kill
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=client.download("big.bin", tmp_path / "dl")),
                                  daemon=True)
        thread.start()
        wait_until(lambda: events and events[-1].chunks_done >= 4, LONG_TIMEOUT, "4 verified chunks")
        sigkill(cluster.processes[leader])
        killed_at = time.monotonic()
        new_leader, new_epoch = cluster.wait_leader(excluding=leader, above=epoch)
        outage_s = time.monotonic() - killed_at
        thread.join(LONG_TIMEOUT)

        assert (True, True) == (new_leader != leader, new_epoch > epoch)
        assert outage_s <= TTL_S + 1, f"no leader for {outage_s:.2f} s"
        result = outcome["result"]
        assert (sha256_file(source), size, 0) == (sha256_file(tmp_path / "dl" / "big.bin"), result.fetched_bytes,
                                                  result.duplicate_chunks)


class TestCleanStop:
    @pytest.mark.timeout(120)
    def test_stopped_leader_hands_the_key_on_before_its_ttl(self, etcd_cluster, tmp_path):
        """SIGTERM to the leader: by the time it has exited (within the TTL) it no longer holds the key; another leads."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=13)
        cluster = etcd_cluster()
        leader, epoch = started_with(cluster, [first])
        stopping_at = time.monotonic()
        assert 0 == cluster.processes[leader].stop(signal.SIGTERM)
        holder = leader_name(load_config(cluster.config_path(leader)))
        assert (True, True) == (holder != leader, time.monotonic() - stopping_at < TTL_S), holder
        cluster.wait_leader(excluding=leader, above=epoch)


class TestFrozenLeader:
    @pytest.mark.timeout(120)
    def test_leader_frozen_past_its_ttl_steps_down_at_once(self, etcd_cluster, tmp_path):
        """SIGSTOP the leader past its TTL, SIGCONT: it is on standby at once and its replication is refused."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=1)
        cluster = etcd_cluster()
        leader, epoch = started_with(cluster, [first])
        frozen = cluster.processes[leader]
        frozen.process.send_signal(signal.SIGSTOP)
        cluster.closers.insert(0, lambda: frozen.process.poll() is None and frozen.process.send_signal(signal.SIGCONT))
        new_leader, new_epoch = cluster.wait_leader(excluding=leader, above=epoch)
        frozen.process.send_signal(signal.SIGCONT)
        status = wait_until(lambda: cluster.status(leader), SHORT_TIMEOUT, "the thawed leader to answer")

        assert ("standby", True) == (status["role"], new_epoch > epoch)
        assert (new_leader, new_epoch) == cluster.leader()
        log = cluster.log(leader)
        assert "steps down to STANDBY" in log, log


STALE_READ_CONNECTIONS = 8  # connections with requests queued at the frozen leader: more chances to slip through
STALE_READS_EACH = 16


def queued_lists(session: ServerSession) -> None:
    """Queue ``STALE_READS_EACH`` list requests on ``session`` without waiting for the replies."""
    session.connection.send_many([protocol.ListFiles()] * STALE_READS_EACH)


def answered_lists(session: ServerSession) -> int:
    """How many of the queued list requests were answered with a listing (the others refused as on standby)."""
    answered = 0
    for _ in range(STALE_READS_EACH):
        try:
            session.receive(protocol.FileList)
            answered += 1
        except NotActive:
            pass
    return answered


class TestThawedLeaderRefusesReads:
    @pytest.mark.timeout(120)
    def test_requests_waiting_at_a_leader_frozen_past_its_lease_are_all_refused(self, etcd_cluster, tmp_path):
        """Reads queued at a leader SIGSTOPped until another leads are all refused the moment it gets SIGCONT."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=3)
        cluster = etcd_cluster()
        leader, epoch = started_with(cluster, [first])
        sessions = [ServerSession.open("127.0.0.1", cluster.ports[leader], io_timeout_s=LONG_TIMEOUT, secure=TLS)
                    for _ in range(STALE_READ_CONNECTIONS)]
        cluster.closers.extend(session.close for session in sessions)
        assert [1] * len(sessions) == [s.call(protocol.ListFiles(), protocol.FileList).message.total
                                      for s in sessions]
        frozen = cluster.processes[leader]
        frozen.process.send_signal(signal.SIGSTOP)
        cluster.closers.insert(0, lambda: frozen.process.poll() is None and frozen.process.send_signal(signal.SIGCONT))
        cluster.wait_leader(excluding=leader, above=epoch)
        for session in sessions:  # they wait in its sockets until it runs again
            queued_lists(session)
        frozen.process.send_signal(signal.SIGCONT)

        assert [0] * len(sessions) == [answered_lists(session) for session in sessions]
        assert "standby" == wait_until(lambda: cluster.status(leader), SHORT_TIMEOUT, "the thawed leader")["role"]


class TestStaleWritesRefused:
    @pytest.mark.timeout(120)
    def test_follower_refuses_replication_from_a_link_proving_an_older_epoch(self, etcd_cluster, tmp_path):
        """A peer link whose heartbeat proves an epoch below the leader's cannot remove a follower's file."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=5)
        cluster = etcd_cluster()
        leader, epoch = started_with(cluster, [first])
        follower = next(name for name in NAMES if name != leader)
        stale = ServerSession.open("127.0.0.1", cluster.ports[follower], io_timeout_s=SHORT_TIMEOUT, secure=TLS, secret=SECRET)
        cluster.closers.append(stale.close)
        stale.call(protocol.Heartbeat(epoch - 1, 0, "127.0.0.1:1"), protocol.HeartbeatAck)
        with pytest.raises(NotActive) as refused:  # the STANDBY error code
            stale.call(protocol.RemoveFile("first.bin"), protocol.Ok)
        assert (True, True) == ("replication refused" in str(refused.value), cluster.holds(follower, first))


    @pytest.mark.timeout(120)
    def test_a_clients_claimed_epoch_neither_fences_the_leader_nor_blocks_a_successor(self, etcd_cluster, tmp_path):
        """Client hellos claiming a huge epoch at the followers: replication goes on, and one of them still takes over."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=6)
        later = make_file(tmp_path / "src" / "later.bin", 200_000, seed=7)
        cluster = etcd_cluster()
        leader, epoch = started_with(cluster, [first])
        followers = [name for name in NAMES if name != leader]
        for follower in followers:
            ServerSession.open("127.0.0.1", cluster.ports[follower], io_timeout_s=SHORT_TIMEOUT, secure=TLS,
                               epoch=epoch + 100).close()
        run = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config",
                              str(cluster.config_path(leader)), "--headless", "--add", str(later)],
                             capture_output=True, text=True, timeout=LONG_TIMEOUT, check=False)
        assert 0 == run.returncode, run.stderr
        wait_until(lambda: all(cluster.holds(f, later) for f in followers), LONG_TIMEOUT,
                   "the followers to replicate later.bin")
        sigkill(cluster.processes[leader])
        new_leader, new_epoch = cluster.wait_leader(excluding=leader, above=epoch)
        assert (True, True) == (new_leader in followers, new_epoch < epoch + 100)


class TestEtcdOutage:
    @pytest.mark.timeout(120)
    def test_leader_demotes_when_etcd_stops_and_service_resumes_when_it_returns(self, etcd_cluster, tmp_path, etcd):
        """etcd SIGKILLed: the leader steps down saying why; etcd back: a leader serves again."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=2)
        cluster = etcd_cluster()
        leader, _ = started_with(cluster, [first])
        etcd.stop()
        wait_until(lambda: cluster.leader() is None and (cluster.status(leader) or {}).get("role") == "standby",
                   TTL_S + LONG_TIMEOUT, "the leader to step down")
        assert "etcd" in cluster.log(leader).split("steps down to STANDBY", 1)[1].splitlines()[0]
        etcd.start()
        cluster.wait_leader()
        names = [entry["name"] for entry in cluster.client().list_files()]
        assert ["first.bin"] == names


class TestQuorumAcknowledgement:
    @pytest.mark.timeout(150)
    def test_file_acknowledged_by_a_quorum_survives_the_leaders_death(self, etcd_cluster, tmp_path):
        """ack: quorum: --add returns once a majority holds the file; SIGKILL the leader at once; the new leader serves it."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=3)
        added = make_file(tmp_path / "src" / "added.bin", 5 * MiB + 3, seed=4)
        cluster = etcd_cluster(ack="quorum")
        leader, epoch = started_with(cluster, [first])
        run = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config",
                              str(cluster.config_path(leader)), "--headless", "--add", str(added)],
                             capture_output=True, text=True, timeout=LONG_TIMEOUT, check=False)
        assert 0 == run.returncode, run.stderr
        assert "acknowledged by a quorum of 2" in run.stdout, run.stdout
        sigkill(cluster.processes[leader])
        cluster.wait_leader(excluding=leader, above=epoch)
        got = cluster.client().download("added.bin", tmp_path / "dl")
        assert sha256_file(added) == sha256_file(got.path)


class TestAddingFiles:
    @pytest.mark.timeout(120)
    def test_add_beside_a_follower_is_refused_naming_the_leader(self, etcd_cluster, tmp_path):
        """--add beside a running follower exits 1 saying who leads; the file is shared by nobody."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=8)
        extra = make_file(tmp_path / "src" / "extra.bin", 100_000, seed=9)
        cluster = etcd_cluster()
        leader, _ = started_with(cluster, [first])
        follower = next(name for name in NAMES if name != leader)
        run = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config",
                              str(cluster.config_path(follower)), "--headless", "--add", str(extra)],
                             capture_output=True, text=True, timeout=LONG_TIMEOUT, check=False)
        assert (1, f"error: {follower} is not the leader ({leader} leads): add files on the leader\n") == (
            run.returncode, run.stderr)
        assert [] == [name for name in NAMES if cluster.holds(name, extra)]

    def test_member_without_a_name_is_a_config_error(self, etcd_cluster, tmp_path):
        """A server in etcd mode with no cluster.name exits 2 with one line naming the key."""
        cluster = etcd_cluster()
        run = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(cluster.config_path("")),
                              "--headless"], capture_output=True, text=True, timeout=LONG_TIMEOUT, check=False)
        assert (2, "error: cluster.name: must name this server (one of cluster.servers) in etcd mode\n") == (
            run.returncode, run.stderr)


class TestFollowerCatchUp:
    @pytest.mark.timeout(120)
    def test_follower_killed_and_restarted_catches_up_by_inventory(self, etcd_cluster, tmp_path):
        """A follower SIGKILLed while the leader gains a file gets it after its restart, without a change of leader."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=11)
        later = make_file(tmp_path / "src" / "later.bin", 2 * MiB + 1, seed=12)
        cluster = etcd_cluster()
        leader, epoch = started_with(cluster, [first])
        follower = next(name for name in NAMES if name != leader)
        sigkill(cluster.processes[follower])
        run = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config",
                              str(cluster.config_path(leader)), "--headless", "--add", str(later)],
                             capture_output=True, text=True, timeout=LONG_TIMEOUT, check=False)
        assert 0 == run.returncode, run.stderr
        cluster.start(follower)
        wait_until(lambda: cluster.holds(follower, later), LONG_TIMEOUT, "the restarted follower to catch up")
        assert ((leader, epoch), "standby") == (cluster.leader(), cluster.status(follower)["role"])


class TestClientDiscovery:
    @pytest.mark.timeout(120)
    def test_client_knowing_one_follower_finds_the_leader(self, etcd_cluster, tmp_path):
        """A client whose config lists one follower (and a dead address) learns the members from it and is served."""
        first = make_file(tmp_path / "src" / "first.bin", 300_000, seed=10)
        cluster = etcd_cluster()
        leader, _ = started_with(cluster, [first])
        follower = next(name for name in NAMES if name != leader)
        settings = cluster.settings()
        settings["cluster"]["servers"] = [
            {"name": follower, "host": "127.0.0.1", "port": cluster.ports[follower]},
            {"name": "gone", "host": "127.0.0.1", "port": free_port()}]
        settings["client"] = {"retry_deadline": 10.0}
        client = ClientEngine(load_config(write_config(tmp_path / "one-member-client", settings)))
        cluster.closers.append(client.close)
        assert ["first.bin"] == [entry["name"] for entry in client.list_files()]


def names_on(cluster: EtcdCluster, name: str) -> set[str] | None:
    """The names in member ``name``'s catalog (its inventory over a peer link); None if it does not answer."""
    from minitorrent.server.member import inventory_of

    config = load_config(cluster.config_path(name))
    files = inventory_of(config, config.cluster.member(name))
    return None if files is None else {entry.get("name") for entry in files}


def edit_on(cluster: EtcdCluster, member: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``main_server.py --headless ARGS`` beside running member ``member``."""
    return subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(cluster.config_path(member)),
                           "--headless", *args], capture_output=True, text=True, timeout=LONG_TIMEOUT, check=False)


def started_with_folder(cluster: EtcdCluster, folder: Path, names: set[str]) -> str:
    """Start "a" alone sharing ``folder`` (it leads), then "b" and "c"; wait until each lists exactly ``names``."""
    cluster.start("a", [folder])
    leader, _ = cluster.wait_leader()
    cluster.start("b")
    cluster.start("c")
    for name in ("b", "c"):
        wait_until(lambda name=name: names_on(cluster, name) == names, LONG_TIMEOUT,
                   f"{name} to replicate {folder.name}/")
    return leader


ALBUM = {"album/a.jpg", "album/b.jpg", "album/trip/c.jpg"}


class TestRemoveAndRename:
    @pytest.fixture
    def album(self, tmp_path) -> Path:
        root = tmp_path / "src" / "album"
        make_file(root / "a.jpg", 3000, seed=21)
        make_file(root / "b.jpg", 3001, seed=22)
        make_file(root / "trip" / "c.jpg", 3002, seed=23)
        return root

    @pytest.mark.timeout(150)
    def test_remove_and_rename_on_the_leader_reach_every_follower_and_clients(self, etcd_cluster, album):
        """--remove and --rename beside the running leader: each follower's catalog and a client's list follow."""
        cluster = etcd_cluster()
        leader = started_with_folder(cluster, album, ALBUM)
        followers = [name for name in NAMES if name != leader]
        client = cluster.client()
        assert ALBUM == {entry["name"] for entry in client.list_files()}

        removed = edit_on(cluster, leader, "--remove", "album/a.jpg")
        renamed = edit_on(cluster, leader, "--rename", "album/trip", "album/journey")
        assert (0, 0) == (removed.returncode, renamed.returncode), removed.stderr + renamed.stderr
        after = {"album/b.jpg", "album/journey/c.jpg"}
        assert after == {entry["name"] for entry in client.list_files()}
        for follower in followers:
            wait_until(lambda follower=follower: names_on(cluster, follower) == after, LONG_TIMEOUT,
                       f"follower {follower} to follow the remove and the rename")

    @pytest.mark.timeout(150)
    def test_remove_beside_a_follower_is_refused_naming_the_leader(self, etcd_cluster, album):
        """--remove or --rename beside a running follower exits 1 saying who leads; no catalog changes."""
        cluster = etcd_cluster()
        leader = started_with_folder(cluster, album, ALBUM)
        follower = next(name for name in NAMES if name != leader)
        removed = edit_on(cluster, follower, "--remove", "album/a.jpg")
        renamed = edit_on(cluster, follower, "--rename", "album/b.jpg", "album/z.jpg")
        refusal = f"error: {follower} is not the leader ({leader} leads): edit the catalog on the leader\n"
        assert [(1, refusal), (1, refusal)] == [(run.returncode, run.stderr) for run in (removed, renamed)]
        assert [ALBUM] * 3 == [names_on(cluster, name) for name in NAMES]
