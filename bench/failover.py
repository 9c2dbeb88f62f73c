"""Benchmark: what a downloading client sees when the main server dies mid-download.

    python bench/failover.py [--size 256M] [--runs 5] [--interval 1] [--timeout 3] [--throttle RATE] [--seed N]

Each run, all on 127.0.0.1, in a fresh temporary folder that is removed at the
end of the run (also on Ctrl-C, SIGTERM or an error):

1. Writes one random file of ``--size`` (1 MiB chunks).
2. Starts the real ``main_server.py --headless --add FILE`` and then the real
   ``backup_server.py --headless``, on fixed free ports, sharing a fresh
   ``server.secret``, with ``heartbeat_interval``/``heartbeat_timeout`` from
   the flags and ``transfer.io_timeout: 2``. The main starts first: its
   ``--add`` of a big file can take longer than ``heartbeat_timeout``, and a
   backup started first would promote itself meanwhile.
3. Waits until the main is active and its status says the backup is in sync.
4. Downloads the file with an in-process ``client.ClientEngine`` (in a thread),
   recording a ``time.monotonic`` timestamp for every verified chunk from the
   ``Progress`` events. When ``chunks_done`` reaches a random k in [10 %, 80 %]
   of the chunks, the callback sets an Event; a separate thread then sends
   SIGKILL to the main (so the callback never blocks). Another thread keeps
   asking the backup for its status over one session, to time its promotion.
5. Checks the download: SHA-256 against the source, ``duplicate_chunks``,
   ``fetched_bytes`` and ``resumed_chunks``.

Figures per run:

* **outage**: the client-visible gap, from the last chunk verified before the
  main died to the first chunk verified after it. Chunks that the main had
  already sent (they sit in the client's socket buffers) can still be verified
  just after the SIGKILL; they are counted ("drained") and the outage is then
  measured from the last of them. So the outage is the largest gap between
  consecutive verified chunks from the kill on.
* **kill -> promoted**: SIGKILL to the first status reply in which the backup
  says it is active (polled every 20 ms, so up to ~20 ms late).
* **hb age**: how old the backup's last heartbeat was at the kill. The backup
  promotes itself ``heartbeat_timeout - hb age`` (+ up to 0.1 s) after the
  kill; the client then needs one reconnect (backoff capped at 0.5 s).

Targets: worst outage <= heartbeat_timeout + 1 s; no verified chunk fetched
twice (``duplicate_chunks`` 0 and ``fetched_bytes`` == size); every file
byte-exact. A benchmark, not a test: it prints PASS or MISS per target and
exits 0. It exits 1 if something is broken: a download fails or does not match
its source, a process does not start, the kill cannot be placed mid-download.

``--throttle RATE`` (bytes/s, e.g. 100M) puts a pacing proxy process in front
of the main, for machines where the whole download is too fast to be killed
mid-way. The output says when it is used. Off by default.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# common first: importing it puts the project root first on sys.path and takes bench/ off it,
# so "import catalog" (done by the servers' modules) imports the project's catalog.py.
from common import (
    BenchError,
    exit_status,
    install_interrupts,
    parse_size,
    report_line,
    sha256_of,
    starting,
    stop_process,
    temp_folder,
    verdict,
    write_random_file,
)

from config_loader import load_config
from error_handler import MiniTorrentError
from minitorrent.client.downloader import DownloadResult
from minitorrent.client.engine import ClientEngine
from minitorrent.client.progress import Progress
from minitorrent.common.launcher import ServerProcess, free_port, write_config
from minitorrent.net import remote
from minitorrent.net.remote import ServerSession
from minitorrent.wire import protocol

CHUNK_BYTES = 1024 * 1024
FILE_NAME = "failover payload.bin"  # a space, as real names have
IO_TIMEOUT_S = 2.0  # transfer.io_timeout of every program: a silent peer is given up on after this
CLIENT_RETRY_DEADLINE_S = 30.0  # far above heartbeat_timeout: a failover must never make the client give up
OUTAGE_SLACK_S = 1.0  # target: outage <= heartbeat_timeout + this
MIN_SIZE = 64 * CHUNK_BYTES
KILL_RANGE = (0.10, 0.80)  # the kill lands when this fraction of the chunks is verified
STATUS_POLL_S = 0.02
SYNC_TIMEOUT_S = 60.0  # start-up and the first replication, on a loaded machine (plus size / SYNC_RATE_BPS)
SYNC_RATE_BPS = 20e6
MIN_RATE_BPS = 5e6  # a download slower than this (outage aside) is considered hung

# The pacing proxy, run as ``python -c PROXY TARGET_PORT RATE_BPS``: prints its
# port, forwards every connection to 127.0.0.1:TARGET_PORT, paces the
# server-to-client direction of all connections together at RATE_BPS. When the
# target is gone it closes new connections at once (like a refused connection)
# and cuts the open ones. It exits when its stdin closes (the benchmark died).
PROXY = r"""
import os, signal, socket, sys, threading, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the benchmark ends this process itself
target = ("127.0.0.1", int(sys.argv[1]))
rate = float(sys.argv[2])
BLOCK = 64 * 1024
lock = threading.Lock()
next_free = [time.monotonic()]

def pace(n):
    with lock:
        now = time.monotonic()
        start = max(now, next_free[0])
        next_free[0] = start + n / rate
    if start > now:
        time.sleep(start - now)

def pump(source, sink, paced):
    try:
        while True:
            data = source.recv(BLOCK)
            if not data:
                break
            if paced:
                pace(len(data))
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

def watch_parent():
    sys.stdin.read()
    os._exit(0)

threading.Thread(target=watch_parent, daemon=True).start()
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
while True:
    client, _ = listener.accept()
    try:
        upstream = socket.create_connection(target, timeout=5)
        upstream.settimeout(None)
    except OSError:
        client.close()
        continue
    threading.Thread(target=pump, args=(client, upstream, False), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client, True), daemon=True).start()
"""


# Watching the client and the backup ------------------------------------------------------------


class ChunkClock:
    """The ``on_progress`` callback: a timestamp per verified chunk, and the kill trigger at chunk k.

    Called from the download's stream threads; it only takes a lock, appends
    and sets an Event, so it never holds up a stream.
    """

    def __init__(self, kill_at: int) -> None:
        self.kill_at = kill_at
        self.reached = threading.Event()
        self.times: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        with self._lock:
            new = progress.chunks_done - len(self.times)
            if new > 0:
                self.times.extend([now] * new)
            if len(self.times) >= self.kill_at:
                self.reached.set()

    def snapshot(self) -> list[float]:
        with self._lock:
            return list(self.times)


class Killer(threading.Thread):
    """Waits for ``trigger``, then SIGKILLs ``process`` and notes when (and how far the download was)."""

    def __init__(self, process: subprocess.Popen, trigger: threading.Event, clock: ChunkClock,
                 cancel: threading.Event) -> None:
        super().__init__(name="killer", daemon=True)
        self.process, self.trigger, self.clock, self.cancel = process, trigger, clock, cancel
        self.killed_at: float | None = None
        self.chunks_at_kill = 0

    def run(self) -> None:
        while not self.trigger.wait(0.05):
            if self.cancel.is_set():
                return
        self.chunks_at_kill = len(self.clock.snapshot())
        self.killed_at = time.monotonic()
        self.process.send_signal(signal.SIGKILL)


@dataclass
class StatusSample:
    at: float
    role: str
    since_heartbeat_s: float


class BackupWatcher(threading.Thread):
    """Asks the backup for its status every ``STATUS_POLL_S`` over one session (reopened if it drops)."""

    def __init__(self, address: tuple[str, int], stop: threading.Event) -> None:
        super().__init__(name="backup-watch", daemon=True)
        self.address, self.stop = address, stop
        self.samples: list[StatusSample] = []

    def run(self) -> None:
        session: ServerSession | None = None
        while not self.stop.wait(STATUS_POLL_S):
            try:
                if session is None:
                    session = ServerSession.open(*self.address, io_timeout_s=IO_TIMEOUT_S)
                status = session.call(protocol.GetStatus(), protocol.StatusInfo).message.metrics
            except MiniTorrentError:
                if session is not None:
                    session.close()
                session = None
                continue
            since = status.get("main", {}).get("seconds_since_heartbeat", float("nan"))
            self.samples.append(StatusSample(time.monotonic(), status.get("role", "?"), since))
        if session is not None:
            session.close()

    def promoted_at(self) -> float | None:
        return next((s.at for s in self.samples if s.role == "active"), None)

    def heartbeat_age_at(self, killed: float) -> float | None:
        """How long before the kill the backup last heard a heartbeat.

        From the first sample after the kill in which the backup is still on
        standby: no heartbeat arrives after the kill, so its age then, minus
        the time since the kill, is its age at the kill. (A sample from before
        the kill would miss a heartbeat that came between it and the kill.)
        """
        after = [s for s in self.samples if s.at > killed and s.role == "standby"]
        if not after:
            return None
        return after[0].since_heartbeat_s - (after[0].at - killed)


def status_of(address: tuple[str, int]) -> dict | None:
    """One server's own status, asked directly; None if it does not answer."""
    return remote.status_of(address, IO_TIMEOUT_S)


# One run --------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    size: int
    chunks: int
    kill_at: int  # the chosen k
    chunks_at_kill: int  # verified when the SIGKILL was sent
    heartbeat_age_s: float | None
    kill_to_promoted_s: float | None
    last_before_to_kill_s: float
    kill_to_resume_s: float  # SIGKILL to the first chunk after the gap (from the backup)
    outage_s: float
    drained: int  # chunks verified after the kill, before the gap (already in the client's buffers)
    duplicate_chunks: int
    fetched_bytes: int
    resumed_chunks: int
    byte_exact: bool
    seconds: float

    @property
    def refetched(self) -> int:
        """Verified chunks fetched more than once, as far as the client can tell."""
        return self.duplicate_chunks + (self.fetched_bytes != self.size)


@dataclass
class Cluster:
    """The processes of one run; ``close`` ends all of them (SIGKILL if they do not stop)."""

    processes: list = field(default_factory=list)
    proxy: subprocess.Popen | None = None
    etcd: subprocess.Popen | None = None

    def close(self) -> None:
        for process in reversed(self.processes):
            stop_process(process.process)
        if self.etcd is not None:
            stop_process(self.etcd)
        if self.proxy is not None:
            if self.proxy.poll() is None:
                self.proxy.kill()
            self.proxy.wait()
            for stream in (self.proxy.stdin, self.proxy.stdout):
                stream.close()


def settings(folder: Path, main_port: int, backup_port: int, secret: str, interval: float, timeout: float) -> dict:
    return {
        "server": {
            "main": {"host": "127.0.0.1", "port": main_port, "data_dir": str(folder / "main-data")},
            "backup": {"host": "127.0.0.1", "port": backup_port, "data_dir": str(folder / "backup-data"),
                       "heartbeat_interval": interval, "heartbeat_timeout": timeout},
            "secret": secret,
        },
        "client": {"download_dir": str(folder / "downloads"), "data_dir": str(folder / "client-state"),
                   "retry_deadline": CLIENT_RETRY_DEADLINE_S},
        "transfer": {"chunk_size": CHUNK_BYTES, "io_timeout": IO_TIMEOUT_S},
        "logging": {"level": "INFO", "log_to_file": False, "log_dir": str(folder / "logs")},
    }


def start_proxy(target_port: int, rate_bps: float) -> subprocess.Popen:
    proxy = subprocess.Popen([sys.executable, "-c", PROXY, str(target_port), str(rate_bps)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proxy.stdout.readline()
    if not line.strip().isdigit():
        proxy.kill()
        proxy.wait()
        raise BenchError(f"throttling proxy did not start (said {line!r})")
    proxy.port = int(line)
    return proxy


def wait_in_sync(main: ServerProcess, backup: ServerProcess, deadline_s: float) -> None:
    """Until the main is active and says the backup holds everything."""
    deadline = time.monotonic() + deadline_s
    while True:
        status = status_of(main.address)
        if status and status.get("role") == "active" and status.get("backup", {}).get("in_sync") is True:
            return
        for name, process in (("main", main), ("backup", backup)):
            if process.process.poll() is not None:
                raise BenchError(f"the {name} server exited ({process.process.returncode}):\n"
                                 + process.stderr_path.read_text(errors="replace")[-2000:])
        if time.monotonic() > deadline:
            raise BenchError(f"the backup was not in sync after {deadline_s:.0f} s; main status: {status}")
        time.sleep(0.1)


def one_run(folder: Path, size: int, interval: float, timeout: float, throttle: float | None,
            rng: random.Random) -> RunResult:
    source = folder / "source" / FILE_NAME
    source_sha = write_random_file(source, size, rng.getrandbits(64))
    main_port, backup_port = free_port(), free_port()
    shared = settings(folder, main_port, backup_port, secrets.token_hex(16), interval, timeout)
    cluster = Cluster()
    stop = threading.Event()
    try:
        with starting():
            main = ServerProcess(write_config(folder / "main" / "config.yaml", shared), add=[source])
            cluster.processes.append(main)
        with starting():
            backup = ServerProcess(write_config(folder / "backup" / "config.yaml", shared), script="backup_server.py")
            cluster.processes.append(backup)
        wait_in_sync(main, backup, SYNC_TIMEOUT_S + size / SYNC_RATE_BPS)

        client_settings = shared
        if throttle:
            with starting():
                cluster.proxy = start_proxy(main_port, throttle)
            client_settings = {**shared, "server": {**shared["server"],
                                                   "main": {**shared["server"]["main"], "port": cluster.proxy.port}}}
        client_config = load_config(write_config(folder / "client" / "config.yaml", client_settings))
        return download_and_kill(client_config, main, [backup.address], size, source_sha, timeout, rng, stop)
    finally:
        stop.set()
        cluster.close()


# One run in etcd mode ---------------------------------------------------------------------------------


MEMBERS = ("a", "b", "c")


def start_etcd(folder: Path, cluster: Cluster) -> str:
    """A real etcd on free 127.0.0.1 ports, its data in ``folder``; returns its client URL."""
    binary = shutil.which("etcd")
    if binary is None:
        raise BenchError("etcd is not installed: apt-get install etcd-server (--mode etcd needs it)")
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    with open(folder / "etcd.log", "w", encoding="utf-8") as log:  # etcd keeps its own copy of the descriptor
        cluster.etcd = subprocess.Popen([binary, "--name", "bench", "--data-dir", str(folder / "etcd-data"),
                                         "--listen-client-urls", client, "--advertise-client-urls", client,
                                         "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                                         "--initial-cluster", f"bench={peer}"], stdout=log, stderr=log)
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while not etcd_answers(client):
        if time.monotonic() > deadline or cluster.etcd.poll() is not None:
            raise BenchError(f"etcd did not start: {(folder / 'etcd.log').read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    return client


def etcd_answers(url: str) -> bool:
    request = urllib.request.Request(url + "/v3/kv/range", data=b'{"key": "AA=="}', method="POST")
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def etcd_settings(folder: Path, ports: dict[str, int], endpoint: str, secret: str, interval: float,
                  timeout: float, name: str = "") -> dict:
    shared = settings(folder, ports["a"], ports["b"], secret, interval, timeout)
    servers = [{"name": n, "host": "127.0.0.1", "port": p, "data_dir": str(folder / f"{n}-data")}
               for n, p in ports.items()]
    return {**shared, "cluster": {"mode": "etcd", "name": name, "servers": servers,
                                  "etcd": {"endpoints": [endpoint], "prefix": "/bench"}}}


def wait_leader_in_sync(leader: ServerProcess, followers: int, deadline_s: float) -> None:
    """Until ``leader`` is active and says ``followers`` followers hold everything (0: only active)."""
    deadline = time.monotonic() + deadline_s
    while True:
        status = status_of(leader.address) or {}
        states = status.get("cluster", {}).get("followers", {})
        if status.get("role") == "active" and sum(bool(state.get("in_sync")) for state in states.values()) >= followers:
            return
        if leader.process.poll() is not None:
            raise BenchError("the first member exited:\n" + leader.stderr_path.read_text(errors="replace")[-2000:])
        if time.monotonic() > deadline:
            raise BenchError(f"the followers were not in sync after {deadline_s:.0f} s; leader status: {status}")
        time.sleep(0.1)


def one_etcd_run(folder: Path, size: int, interval: float, timeout: float, throttle: float | None,
                 rng: random.Random) -> RunResult:
    """Three members and etcd; "a" starts alone sharing the file (so it leads), then b and c; kill a."""
    source = folder / "source" / FILE_NAME
    source_sha = write_random_file(source, size, rng.getrandbits(64))
    ports = {name: free_port() for name in MEMBERS}
    cluster = Cluster()
    stop = threading.Event()
    try:
        endpoint = start_etcd(folder, cluster)
        secret = secrets.token_hex(16)
        members = {}
        for name in MEMBERS:
            config = write_config(folder / name / "config.yaml",
                                  etcd_settings(folder, ports, endpoint, secret, interval, timeout, name))
            with starting():
                members[name] = ServerProcess(config, add=[source] if name == "a" else ())
                cluster.processes.append(members[name])
            if name == "a":
                wait_leader_in_sync(members["a"], 0, SYNC_TIMEOUT_S + size / SYNC_RATE_BPS)
        wait_leader_in_sync(members["a"], len(MEMBERS) - 1, SYNC_TIMEOUT_S + size / SYNC_RATE_BPS)
        client_ports = dict(ports)
        if throttle:
            with starting():
                cluster.proxy = start_proxy(ports["a"], throttle)
            client_ports["a"] = cluster.proxy.port
        client_settings = etcd_settings(folder, client_ports, endpoint, secret, interval, timeout)
        client_config = load_config(write_config(folder / "client" / "config.yaml", client_settings))
        watched = [("127.0.0.1", ports[name]) for name in MEMBERS[1:]]
        return download_and_kill(client_config, members["a"], watched, size, source_sha, timeout, rng, stop)
    finally:
        stop.set()
        cluster.close()


def download_and_kill(client_config, victim: ServerProcess, watched: list[tuple[str, int]], size: int,
                      source_sha: str, timeout: float, rng: random.Random, stop: threading.Event) -> RunResult:
    """Download the file, SIGKILL ``victim`` at a random chunk, watch ``watched`` take over; the run's figures."""
    chunks = math.ceil(size / CHUNK_BYTES)
    low, high = math.ceil(KILL_RANGE[0] * chunks), math.floor(KILL_RANGE[1] * chunks)
    kill_at = rng.randint(max(1, low), max(1, low, high))
    clock = ChunkClock(kill_at)
    engine = ClientEngine(client_config, on_progress=clock)
    killer = Killer(victim.process, clock.reached, clock, stop)
    watchers = [BackupWatcher(address, stop) for address in watched]
    try:
        killer.start()
        for watcher in watchers:
            watcher.start()
        outcome: dict = {}

        def download() -> None:
            try:
                outcome["result"] = engine.download(FILE_NAME)
            except BaseException as error:  # handed to the benchmark's thread
                outcome["error"] = error

        started = time.monotonic()
        thread = threading.Thread(target=download, name="client", daemon=True)
        thread.start()
        thread.join(SYNC_TIMEOUT_S + timeout + size / MIN_RATE_BPS)
        seconds = time.monotonic() - started
        stop.set()
        killer.join(5)
        for watcher in watchers:
            watcher.join(5)
        if thread.is_alive():
            raise BenchError(f"the download did not finish within {seconds:.0f} s")
        if "error" in outcome:
            raise BenchError(f"the download failed: {outcome['error']}")
        result: DownloadResult = outcome["result"]
        if killer.killed_at is None:
            raise BenchError("the kill was never triggered")
        if killer.chunks_at_kill >= chunks:
            raise BenchError("the download finished before the kill landed: it is too fast to kill mid-way "
                             "on this machine; try --throttle 200M")
        byte_exact = sha256_of(result.path) == source_sha
        return measure(clock.snapshot(), killer, watchers, result, chunks, kill_at, byte_exact, seconds, size)
    finally:
        engine.close()


def measure(times: list[float], killer: Killer, watchers: list[BackupWatcher], result: DownloadResult, chunks: int,
            kill_at: int, byte_exact: bool, seconds: float, size: int) -> RunResult:
    killed = killer.killed_at
    times = sorted(times)
    before = [t for t in times if t <= killed]
    after = [t for t in times if t > killed]
    if not before or not after:
        raise BenchError(f"no verified chunk on one side of the kill ({len(before)} before, {len(after)} after)")
    # The outage is the largest gap from the last chunk before the kill on; chunks in front of it were
    # already in the client's socket buffers when the main died ("drained").
    series = [before[-1]] + after
    gaps = [(series[i + 1] - series[i], i) for i in range(len(series) - 1)]
    outage, at = max(gaps)
    promotions = [at for at in (watcher.promoted_at() for watcher in watchers) if at is not None]
    promoted = min(promotions, default=None)
    if promoted is not None and series[at + 1] < promoted - 0.1:  # 0.1 s: the status polling lags a little
        raise BenchError("the download finished from chunks the main had sent before it died; the file is too "
                         "small to see a failover: use a larger --size or --throttle")
    return RunResult(
        size=size, chunks=chunks, kill_at=kill_at, chunks_at_kill=killer.chunks_at_kill,
        heartbeat_age_s=watchers[0].heartbeat_age_at(killed) if len(watchers) == 1 else None,
        kill_to_promoted_s=None if promoted is None else promoted - killed,
        last_before_to_kill_s=killed - before[-1], kill_to_resume_s=series[at + 1] - killed,
        outage_s=outage, drained=at, duplicate_chunks=result.duplicate_chunks,
        fetched_bytes=result.fetched_bytes, resumed_chunks=result.resumed_chunks, byte_exact=byte_exact,
        seconds=seconds,
    )


# Reporting ------------------------------------------------------------------------------------------


def fmt_s(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"


HEADER = (f"  {'run':>3}  {'killed at':>9}  {'hb age':>6}  {'last->kill':>10}  {'kill->promoted':>14}  "
          f"{'kill->resume':>12}  {'outage':>6}  {'drained':>7}  {'refetched':>9}  {'sha256':>6}  {'total':>6}")
LEGEND = """\
seconds. killed at: verified chunks when the SIGKILL was sent. hb age: age of the backup's last
heartbeat at the kill. last->kill: last chunk verified before the kill to the kill. kill->promoted:
to the backup's first 'active' status. kill->resume: to the first chunk after the outage. outage:
the client-visible gap. drained: chunks verified after the kill from the dead main's socket
buffers (before the gap). refetched: duplicate_chunks + (fetched_bytes != size). total: download."""


def row(number: int, run: RunResult) -> str:
    killed = f"{run.chunks_at_kill}/{run.chunks}"
    return (f"  {number:>3}  {killed:>9}  {fmt_s(run.heartbeat_age_s)}  {fmt_s(run.last_before_to_kill_s):>10}  "
            f"{fmt_s(run.kill_to_promoted_s):>14}  {fmt_s(run.kill_to_resume_s):>12}  {run.outage_s:6.3f}  "
            f"{run.drained:>7}  {run.refetched:>9}  {'ok' if run.byte_exact else 'BAD':>6}  {run.seconds:6.2f}")


def report(runs: list[RunResult], timeout: float) -> bool:
    """Print the summary under the table; True if every file is byte-exact."""
    outages = [run.outage_s for run in runs]
    promoted = [run.kill_to_promoted_s for run in runs if run.kill_to_promoted_s is not None]
    resume = [run.kill_to_resume_s - run.kill_to_promoted_s for run in runs if run.kill_to_promoted_s is not None]
    refetched = sum(run.refetched for run in runs)
    exact = sum(run.byte_exact for run in runs)
    worst = max(outages)
    print()
    line(f"outage: median / worst of {len(runs)}", f"{statistics.median(outages):.3f} s / {worst:.3f} s "
                                                 f"(heartbeat_timeout {timeout:g} s)")
    if promoted:
        line("kill -> backup promoted: median / worst (info)",
             f"{statistics.median(promoted):.3f} s / {max(promoted):.3f} s")
        line("promoted -> client resumed: median / worst (info)",
             f"{statistics.median(resume):.3f} s / {max(resume):.3f} s")
    line("load average at the end (info)", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    line(f"TARGET worst outage <= heartbeat_timeout + {OUTAGE_SLACK_S:g} s",
         f"{worst:.3f} s (<= {timeout + OUTAGE_SLACK_S:g} s)  {verdict(worst <= timeout + OUTAGE_SLACK_S)}")
    line("TARGET no verified chunk fetched twice", f"{refetched} refetched  {verdict(refetched == 0)}")
    line("TARGET every file byte-exact", f"{exact}/{len(runs)}  {verdict(exact == len(runs))}")
    return exact == len(runs)


line = partial(report_line, width=50)


def measure_runs(count: int, size: int, interval: float, timeout: float, throttle: float | None,
                 rng: random.Random, mode: str = "pair") -> list[RunResult]:
    """``count`` failovers, each in a fresh folder removed after it; a row of the table per run."""
    runs: list[RunResult] = []
    print(HEADER, flush=True)
    run_once = one_etcd_run if mode == "etcd" else one_run
    for number in range(1, count + 1):
        with temp_folder("minitorrent-failover-") as folder:
            run = run_once(folder, size, interval, timeout, throttle, rng)
        runs.append(run)
        print(row(number, run), flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 << 20, help="file size: bytes, or 256M, 1G ... "
                        "(default 256M)")
    parser.add_argument("--runs", type=int, default=5, help="failovers to measure (default 5)")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat_interval in seconds (default 1)")
    parser.add_argument("--timeout", type=float, default=3.0, help="heartbeat_timeout in seconds (default 3)")
    parser.add_argument("--throttle", type=parse_size, default=None, metavar="RATE",
                        help="pace the main's link at RATE bytes/s through a proxy (e.g. 100M); default off")
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill points and file contents")
    parser.add_argument("--mode", choices=("pair", "etcd"), default="pair",
                        help="pair: main + backup (default); etcd: three members and a real etcd, the leader killed")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not 0 < args.interval < args.timeout:
        parser.error("need 0 < --interval < --timeout")
    if args.size < MIN_SIZE:
        # Two streams with 8 requests in flight each: the last 16 chunks may all be on their way when the
        # main dies, and then the download ends without the backup.
        parser.error(f"--size must be at least {MIN_SIZE >> 20} MiB, to kill the main mid-download")
    install_interrupts()  # SIGTERM unwinds like Ctrl-C: processes stopped, folders removed
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    rng = random.Random(seed)
    link = (f"THROTTLED: the main's link is paced at {args.throttle / (1 << 20):.0f} MiB/s by a proxy" if args.throttle
            else "plain loopback, no throttling")
    if args.mode == "etcd":
        args.timeout = float(math.ceil(args.timeout))  # etcd leases are whole seconds
    print(f"{args.mode} mode: {args.runs} run(s), file of {args.size} bytes ({math.ceil(args.size / CHUNK_BYTES)} chunks of 1 MiB), "
          f"heartbeat_interval {args.interval:g} s, heartbeat_timeout {args.timeout:g} s, {link}; seed {seed}")
    print(LEGEND, flush=True)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    return exit_status(lambda: 0 if report(measure_runs(args.runs, args.size, args.interval, args.timeout,
                                                        args.throttle, rng, args.mode), args.timeout) else 1)


if __name__ == "__main__":
    sys.exit(main())
