"""Benchmark: a crowd of clients fetching one file from a rate-limited server, with and without seeding.

    python bench/swarm.py [--size 256M] [--clients 8] [--server-limit 40M]

What runs, all on 127.0.0.1, in one temporary folder removed at the end (also
on Ctrl-C, SIGTERM or an error):

* The real ``main_server.py --headless --add FILE`` process, with
  ``transfer.upload_limit`` at ``--server-limit`` bytes per second (40M means
  40,000,000 B/s) and ``max_connections`` raised for the crowd.
* ``--clients`` client processes. Each is this script in worker mode: it
  builds the real ``ClientEngine`` from its own config (its own folder,
  database and seed port), starts seeding if ``client.seeding`` is true
  (exactly what ``client.py get`` does), says "ready", waits for "go",
  downloads the file with ``ClientEngine.download`` (the code ``client.py
  get`` runs), reports, and then **keeps seeding until told to stop**. The
  benchmark tells every worker to stop only when the last one has finished.
  A ``client.py get`` process would exit at the end of its download and take
  its seeder out of the crowd; in a real crowd people leave their client
  running for a while, and here they leave it running until everyone is done.
* Two runs in the same invocation, on the same server: seeding on, then
  seeding off (``client.seeding: false``: no seeder, no announcements, so
  the tracker has nobody to name and every byte comes from the server).
  Every run uses fresh client folders: nothing is resumed, nothing is
  already present.

The time of a run is the wall clock from "go" (sent to all workers at once)
to the last worker's "done": process start-up, imports and the seeder's
start happen before "go" and are not counted, in both runs alike. The
server's share is its ``bytes_sent`` counter (from ``client.py status
--json``) after minus before the run, over clients x size. Every downloaded
file is hashed again and compared with the source; a mismatch exits 1.

Targets: time with seeding / time without <= 0.6; server's share of the bytes
with seeding <= 50 %. A benchmark, not a test: PASS or MISS per target, exit 0.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

# common first: importing it puts the project root on sys.path (the workers' imports need it too).
from common import (
    ROOT,
    BenchError,
    exit_status,
    install_interrupts,
    parse_size,
    report_line,
    sha256_of,
    start_server,
    stop_process,
    temp_folder,
    verdict,
    write_random_file,
)

from minitorrent.common.launcher import ServerProcess, write_config

FILE_NAME = "swarm payload.bin"
TIME_RATIO_TARGET = 0.6  # the crowd with seeding finishes in at most 60 % of the time without
SERVER_SHARE_TARGET = 0.5  # with seeding, at most half the bytes leave the server
START_TIMEOUT_S = 60.0  # a process start on a loaded machine
MIN_RATE_BPS = 1e6  # a run moving less than this per client is considered hung
ANNOUNCE_INTERVAL_S = 1.0  # how often seeders tell the tracker what they hold
_RATE_UNITS = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}


def parse_rate(text: str) -> int:
    """``"40M"`` -> 40000000 bytes per second (decimal units, as MB/s)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:B(?:/s)?)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 40M for 40 MB/s)")
    rate = int(float(match.group(1)) * _RATE_UNITS[match.group(2).upper()])
    if rate <= 0:
        raise argparse.ArgumentTypeError("the server's limit must be positive")
    return rate


# Worker mode: one client of the crowd --------------------------------------------------------


def worker(config_path: str, name: str, output: str) -> int:
    """Run one client: ready, wait for go, download, report, seed until stop. One JSON line per event."""
    from config_loader import load_config
    from error_handler import MiniTorrentError
    from minitorrent.client.engine import ClientEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops its workers itself
    engine = ClientEngine(load_config(config_path))
    try:
        seed_address = engine.start_seeding()
        say(ready=True, seeding=seed_address is not None)
        if sys.stdin.readline().strip() != "go":
            return 1
        started = time.perf_counter()
        try:
            result = engine.download(name, Path(output))
        except MiniTorrentError as error:
            say(error=str(error))
            return 1
        say(done=time.perf_counter() - started, sources=result.sources)
        sys.stdin.readline()  # "stop" (or EOF): until then this client keeps seeding
        uploaded = engine.seeder.metrics.snapshot()["bytes_sent"] if engine.seeder else 0
        say(stopped=True, uploaded=uploaded)
        return 0
    finally:
        engine.close()


def say(**event: object) -> None:
    print(json.dumps(event), flush=True)


# Preparing --------------------------------------------------------------------------------


def server_config(folder: Path, clients: int, limit_bps: int) -> Path:
    """The main server's: any free port, no backup, the upload limit, room for the crowd's connections."""
    return write_config(folder / "server.yaml", {
        "server": {"main": {"host": "127.0.0.1", "port": 0, "data_dir": "server"}, "backup": {"port": 0}},
        "transfer": {"upload_limit": limit_bps, "max_connections": max(64, clients * 4),
                     "announce_interval": ANNOUNCE_INTERVAL_S},
        "logging": {"level": "WARNING", "log_to_file": False},
    })


def client_config(folder: Path, port: int, seeding: bool, clients: int) -> Path:
    """One worker's, in its own folder: its downloads and state apart from every other's."""
    return write_config(folder / "client.yaml", {
        "server": {"main": {"host": "127.0.0.1", "port": port}, "backup": {"port": 0}},
        "client": {"download_dir": "downloads", "data_dir": "state", "seeding": seeding, "retry_deadline": 30.0},
        "transfer": {"announce_interval": ANNOUNCE_INTERVAL_S, "max_connections": max(16, clients * 2)},
        "logging": {"level": "WARNING", "log_to_file": False},
    })


# Processes --------------------------------------------------------------------------------


def server_bytes_sent(client_yaml: Path) -> int:
    """The server's ``bytes_sent`` counter, asked the way a user would: ``client.py status --json``."""
    done = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(client_yaml), "status",
                           "--json"], capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if done.returncode != 0:
        raise BenchError(f"client.py status failed: {done.stderr.strip()}")
    return int(json.loads(done.stdout)["bytes_sent"])


class Worker:
    """One client process in worker mode; its JSON events read by a thread."""

    def __init__(self, config: Path, output: Path) -> None:
        self.stderr_path = config.parent / "worker.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(config), FILE_NAME, str(output)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=config.parent)
        self.events: list[dict] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self.changed:
                self.events.append(event)
                self.changed.notify_all()
        with self.changed:
            self.events.append({"exited": self.process.wait()})
            self.changed.notify_all()

    def wait_for(self, key: str, deadline: float) -> dict:
        """The first event carrying ``key``; ``BenchError`` if the worker failed, exited or ran out of time."""
        with self.changed:
            while True:
                for event in self.events:
                    if key in event:
                        return event
                    if "error" in event or "exited" in event:
                        raise BenchError(f"a client failed: {event}\n"
                                         + self.stderr_path.read_text(errors="replace")[-2000:])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"a client did not report {key!r} in time")
                self.changed.wait(remaining)

    def send(self, line: str) -> None:
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


# One run ---------------------------------------------------------------------------------------


@dataclass
class RunResult:
    seeding: bool
    seconds: float
    client_seconds: list[float]
    server_bytes: int
    peer_bytes: int
    uploaded: int
    sources: list[dict[str, int]] = field(default_factory=list)


def run_crowd(folder: Path, server: ServerProcess, size: int, clients: int, seeding: bool, source_sha: str) -> RunResult:
    """Start the crowd, time it from go to the last done, stop it, check every file."""
    run_dir = folder / ("seeding" if seeding else "no-seeding")
    configs = [client_config(run_dir / f"client{n}", server.address[1], seeding, clients) for n in range(clients)]
    outputs = [config.parent / "downloads" for config in configs]
    before = server_bytes_sent(configs[0])
    workers = [Worker(config, output) for config, output in zip(configs, outputs)]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for worker_process in workers:
            worker_process.wait_for("ready", deadline)
        started = time.perf_counter()
        for worker_process in workers:
            worker_process.send("go")
        deadline = time.monotonic() + START_TIMEOUT_S + clients * size / MIN_RATE_BPS
        done = [worker_process.wait_for("done", deadline) for worker_process in workers]
        seconds = time.perf_counter() - started  # waited for every done: this is the last one
        for worker_process in workers:
            worker_process.send("stop")
        stopped = [worker_process.wait_for("stopped", time.monotonic() + START_TIMEOUT_S) for worker_process in workers]
    finally:
        for worker_process in workers:
            worker_process.kill()
    after = server_bytes_sent(configs[0])
    for output in outputs:
        got = sha256_of(output / FILE_NAME)
        if got != source_sha:
            raise BenchError(f"DOWNLOAD CORRUPT: {output / FILE_NAME} sha256 {got} != source {source_sha}")
    shutil.rmtree(run_dir, ignore_errors=True)
    sources = [event["sources"] for event in done]
    peer_bytes = sum(n for s in sources for label, n in s.items() if label.startswith("peer "))
    return RunResult(seeding, seconds, [event["done"] for event in done], after - before, peer_bytes,
                     sum(event["uploaded"] for event in stopped), sources)


# The benchmark --------------------------------------------------------------------------------


line = partial(report_line, width=52)


def report_run(run: RunResult, size: int, clients: int) -> None:
    total = clients * size
    kind = "seeding on " if run.seeding else "seeding off"
    times = sorted(run.client_seconds)
    print(f"{kind}: last client done after {run.seconds:6.2f} s (clients: fastest {times[0]:.2f} s, "
          f"median {statistics.median(times):.2f} s, slowest {times[-1]:.2f} s)", flush=True)
    print(f"             server sent {run.server_bytes / (1 << 20):8.1f} MiB = {run.server_bytes / total:6.1%} of "
          f"{clients} x {size / (1 << 20):.0f} MiB; peers sent {run.peer_bytes / (1 << 20):.1f} MiB "
          f"(seeders' upload counters: {run.uploaded / (1 << 20):.1f} MiB)", flush=True)


def bench(folder: Path, size: int, clients: int, limit_bps: int) -> None:
    source = folder / "source" / FILE_NAME
    print(f"writing {size} random bytes ({size / (1 << 20):.0f} MiB) ...", flush=True)
    source_sha = write_random_file(source, size)
    print("starting the main server (importing the file) ...", flush=True)
    server = start_server(server_config(folder, clients, limit_bps), add=[source])
    print(f"server on {server.address[0]}:{server.address[1]}, upload limited to {limit_bps / 1e6:.1f} MB/s; "
          f"{clients} clients; without peers that is at least {clients * size / limit_bps:.1f} s", flush=True)
    try:
        runs = [run_crowd(folder, server, size, clients, seeding, source_sha) for seeding in (True, False)]
        for run in runs:
            report_run(run, size, clients)
    finally:
        stop_process(server.process)
    with_seeding, without = runs
    ratio = with_seeding.seconds / without.seconds
    share = with_seeding.server_bytes / (clients * size)
    print()
    print(f"file {size / (1 << 20):.0f} MiB, {clients} clients, server limit {limit_bps / 1e6:.1f} MB/s "
          f"(MB = 10^6 bytes)")
    line("seeding on: time until the last client is done", f"{with_seeding.seconds:7.2f} s")
    line("seeding off: time until the last client is done", f"{without.seconds:7.2f} s")
    line("seeding off: server's share of the bytes (info)", f"{without.server_bytes / (clients * size):7.1%}")
    line(f"TARGET time ratio seeding on/off <= {TIME_RATIO_TARGET}",
         f"{ratio:7.2f}    {verdict(ratio <= TIME_RATIO_TARGET)}")
    line(f"TARGET server's share with seeding <= {SERVER_SHARE_TARGET:.0%}",
         f"{share:7.1%}    {verdict(share <= SERVER_SHARE_TARGET)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(*argv[1:4])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 << 20, help="file size: 256M, 1G ... (default 256M)")
    parser.add_argument("--clients", type=int, default=8, help="client processes (default 8)")
    parser.add_argument("--server-limit", type=parse_rate, default=40_000_000,
                        help="main server upload limit, bytes/s: 40M = 40 MB/s (default 40M)")
    args = parser.parse_args(argv)
    if args.clients < 2:
        parser.error("--clients must be at least 2: a crowd of one has nobody to trade with")
    install_interrupts()  # SIGTERM unwinds like Ctrl-C: processes stopped, folder removed
    with temp_folder("minitorrent-swarm-") as folder:
        return exit_status(lambda: bench(folder, args.size, args.clients, args.server_limit))


if __name__ == "__main__":
    sys.exit(main())
