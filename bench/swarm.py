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
import hashlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK_BYTES = 1024 * 1024  # write and hash in 1 MiB blocks: never a whole file in memory
FILE_NAME = "swarm payload.bin"
TIME_RATIO_TARGET = 0.6  # the crowd with seeding finishes in at most 60 % of the time without
SERVER_SHARE_TARGET = 0.5  # with seeding, at most half the bytes leave the server
START_TIMEOUT_S = 60.0  # a process start on a loaded machine
MIN_RATE_BPS = 1e6  # a run moving less than this per client is considered hung
ANNOUNCE_INTERVAL_S = 1.0  # how often seeders tell the tracker what they hold
LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_RATE_UNITS = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}


class BenchError(Exception):
    """Something the benchmark relies on broke; the message says what."""


def parse_size(text: str) -> int:
    """``"256M"`` -> 268435456 (binary units), or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M, 1G or a number of bytes)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


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
    sys.path.insert(0, str(ROOT))
    from client import ClientEngine
    from config_loader import load_config
    from error_handler import MiniTorrentError

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


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes in 1 MiB blocks; return their SHA-256."""
    rng = random.Random(20261125)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            block = rng.randbytes(min(remaining, BLOCK_BYTES))
            digest.update(block)
            out.write(block)
            remaining -= len(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as source:
        while n := source.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def server_config(folder: Path, clients: int, limit_bps: int) -> Path:
    path = folder / "server.yaml"
    path.write_text(
        "server:\n"
        "  main: {host: 127.0.0.1, port: 0, data_dir: server}\n"
        "  backup: {port: 0}\n"
        f"transfer: {{upload_limit: {limit_bps}, max_connections: {max(64, clients * 4)},"
        f" announce_interval: {ANNOUNCE_INTERVAL_S}}}\n"
        "logging: {level: WARNING, log_to_file: false}\n",
        encoding="utf-8",
    )
    return path


def client_config(folder: Path, port: int, seeding: bool, clients: int) -> Path:
    folder.mkdir(parents=True)
    path = folder / "client.yaml"
    path.write_text(
        "server:\n"
        f"  main: {{host: 127.0.0.1, port: {port}}}\n"
        "  backup: {port: 0}\n"
        f"client: {{download_dir: downloads, data_dir: state, seeding: {str(seeding).lower()},"
        " retry_deadline: 30.0}\n"
        f"transfer: {{announce_interval: {ANNOUNCE_INTERVAL_S}, max_connections: {max(16, clients * 2)}}}\n"
        "logging: {level: WARNING, log_to_file: false}\n",
        encoding="utf-8",
    )
    return path


# Processes --------------------------------------------------------------------------------


class Server:
    """The real main server as a subprocess; its output drained to files so no pipe fills."""

    def __init__(self, config: Path, source: Path, size: int) -> None:
        folder = config.parent
        self.stderr_path = folder / "server.stderr"
        self._found = threading.Event()
        self.address: tuple[str, int] | None = None
        self.config = config
        command = [sys.executable, str(ROOT / "main_server.py"), "--config", str(config), "--headless",
                   "--add", str(source)]
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, cwd=folder)
        threading.Thread(target=self._drain_stdout, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S + size / 20e6  # --add copies and hashes first
        while not self._found.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"main server did not start (exit {self.process.poll()}):\n"
                                 + self.stderr_path.read_text(errors="replace")[-2000:])

    def _drain_stdout(self) -> None:
        for line in self.process.stdout:
            match = LISTENING.search(line.decode("utf-8", "replace"))
            if match and not self._found.is_set():
                self.address = match.group(1), int(match.group(2))
                self._found.set()

    def bytes_sent(self, client_yaml: Path) -> int:
        """The server's ``bytes_sent`` counter, asked the way a user would: ``client.py status --json``."""
        done = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(client_yaml), "status",
                               "--json"], capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if done.returncode != 0:
            raise BenchError(f"client.py status failed: {done.stderr.strip()}")
        return int(json.loads(done.stdout)["bytes_sent"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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


def run_crowd(folder: Path, server: Server, size: int, clients: int, seeding: bool, source_sha: str) -> RunResult:
    """Start the crowd, time it from go to the last done, stop it, check every file."""
    run_dir = folder / ("seeding" if seeding else "no-seeding")
    configs = [client_config(run_dir / f"client{n}", server.address[1], seeding, clients) for n in range(clients)]
    outputs = [config.parent / "downloads" for config in configs]
    before = server.bytes_sent(configs[0])
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
    after = server.bytes_sent(configs[0])
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


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def line(label: str, value: str) -> None:
    print(f"  {label:52} {value}", flush=True)


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
    source_dir = folder / "source"
    source_dir.mkdir()
    source = source_dir / FILE_NAME
    print(f"writing {size} random bytes ({size / (1 << 20):.0f} MiB) ...", flush=True)
    source_sha = write_random_file(source, size)
    print("starting the main server (importing the file) ...", flush=True)
    server = Server(server_config(folder, clients, limit_bps), source, size)
    print(f"server on {server.address[0]}:{server.address[1]}, upload limited to {limit_bps / 1e6:.1f} MB/s; "
          f"{clients} clients; without peers that is at least {clients * size / limit_bps:.1f} s", flush=True)
    try:
        runs = [run_crowd(folder, server, size, clients, seeding, source_sha) for seeding in (True, False)]
        for run in runs:
            report_run(run, size, clients)
    finally:
        server.stop()
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
    signal.signal(signal.SIGTERM, _interrupt)  # unwinds like Ctrl-C: processes stopped, folder removed
    folder = Path(tempfile.mkdtemp(prefix="minitorrent-swarm-"))
    try:
        bench(folder, args.size, args.clients, args.server_limit)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
