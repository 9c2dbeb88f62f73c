"""Benchmark: download one big file with the real programs, against a raw-socket baseline.

    python bench/transfer.py [--size 1G] [--repeat N] [--chunk-size 1M] [--folder /dev/shm] [--no-warmup]

What runs, all on 127.0.0.1, all in one temporary folder that is removed at
the end (also on Ctrl-C or an error). The folder is on ``/dev/shm`` (tmpfs)
by default, so the figures measure the transfer and not the disk's fsync
timing (``--folder`` to change it). Both server ports are set explicitly:
the main's is its own, the backup's is a port this process holds bound and
never listens on, so no other program on 127.0.0.1 can answer the client.

* MiniTorrent: the real ``main_server.py --headless --add FILE`` subprocess,
  and the real ``client.py get NAME`` subprocess. Its time is the wall clock
  from starting the client process to its exit, start-up included, because
  that is what a user waits for. Its peak RSS comes from ``os.wait4``.
* Baseline: the fastest plain Python can do on this machine right now. A
  receiver process accepts one connection and ``recv_into``s a reused 1 MiB
  buffer, writing each piece to a file; this process sends the same source
  file with ``socket.sendfile``. Its time runs from ``connect`` to the
  receiver having closed its file. Receiver and sender are separate processes
  so they do not share a GIL.

* Integrity floor (information only): the same receiver also doing what
  MiniTorrent's integrity rules demand of any receiver, in one thread: a
  SHA-256 per 1 MiB chunk (one pass over every byte), an fsync at the end.
* TLS floor (information only): the least a Python receiver can take for
  what MiniTorrent does by default, with nothing else: two TLS 1.3
  connections (as a download's two server streams), each chunk read into a
  reused buffer, hashed and written at its place, an fsync at the end; the
  sender reads each chunk into a reused buffer and writes it in one call, as
  the server does. No protocol, no bookkeeping, no process start: the figure
  no TLS download on this machine can beat, beside the ratio target.

The kinds are alternated run by run and the medians compared, so a noisy,
shared machine slows all alike. The figures are ratios against that
baseline, never absolute speeds: those depend on the machine. A first,
uncounted warm-up round absorbs one-off costs (on a VM, the first touch of
never-used memory is several times slower than later ones).

The client's CPU time (user + system, from ``os.wait4``) is reported per GiB:
run with ``--chunk-size 64K`` and ``--chunk-size 1M`` to see that it does not
grow with the number of chunks.

Targets: MiniTorrent / baseline >= 0.6, client peak RSS <= 100 MiB. The ratio
target was set before every connection ran TLS; ``baseline / TLS floor``
says how much of it any TLS receiver can reach on the machine at hand.
A benchmark, not a test: it prints PASS or MISS per target and exits 0. It
exits 1 only if something is broken (a process fails, a download's SHA-256
differs from the source's).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

# common first: importing it puts the project root on sys.path.
from common import (
    ROOT,
    BenchError,
    bytecode_cached_env,
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
from minitorrent.wire import identity

FILE_NAME = "bench payload.bin"  # a space, as real names have
RATIO_TARGET = 0.6  # set for plain TCP (a SHA-256 pass beside the raw transfer: about 0.7); TLS allows less: the TLS floor row
RSS_TARGET_MIB = 100.0  # the client's memory must not grow with the file
START_TIMEOUT_S = 60.0  # a process start on a loaded machine
MIN_RATE_BPS = 5e6  # any slower than this and a run is considered hung
DEFAULT_FOLDER = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # tmpfs: no fsync timing in the figures
CLIENT_SPEED = re.compile(r"100\.0%.*?([\d.]+ [KMGT]?i?B)/s")

# The baseline receiver, run as ``python -c RECEIVER OUT MODE``: prints its
# port, receives one connection into a reused 1 MiB buffer, writes it to OUT,
# prints "done BYTES". MODE "plain" is the baseline. MODE "integrity" also
# does, in this one thread, what MiniTorrent's rules demand of any receiver:
# a SHA-256 of every 1 MiB chunk, an fsync before the file counts as saved.
# It shows what those rules cost on their own.
RECEIVER = r"""
import hashlib, os, signal, socket, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the benchmark ends this process itself
BLOCK = 1024 * 1024
integrity = sys.argv[2] == "integrity"
with socket.create_server(("127.0.0.1", 0)) as listener:
    listener.settimeout(60)  # never outlive a benchmark that died
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.settimeout(60)
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    total = 0
    with conn, open(sys.argv[1], "wb", buffering=0) as out:
        while True:
            got = 0
            while got < BLOCK:
                n = conn.recv_into(view[got:])
                if not n:
                    break
                got += n
                if not integrity:
                    break
            if not got:
                break
            piece = view[:got]
            if integrity:
                hashlib.sha256(piece).digest()
            while piece:
                piece = piece[out.write(piece):]
            total += got
        if integrity:
            os.fsync(out.fileno())
print("done", total, flush=True)
"""

# The TLS floor's receiver, run as ``python -c TLS_RECEIVER OUT SIZE CERT STREAMS``: prints its port,
# takes STREAMS TLS connections, connection k carrying chunks k, k + STREAMS, ...; each chunk is hashed
# and written at its place; an fsync; prints "done BYTES".
TLS_STREAMS = 2  # as a MiniTorrent download's server streams
CHUNK_BLOCK = 1024 * 1024  # the receivers' BLOCK
TLS_RECEIVER = r"""
import hashlib, os, signal, socket, ssl, sys, threading
signal.signal(signal.SIGINT, signal.SIG_IGN)
BLOCK = 1024 * 1024
size, streams = int(sys.argv[2]), int(sys.argv[4])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[3])
out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
received = []

def stream(conn, first):
    with context.wrap_socket(conn, server_side=True) as tls:
        tls.settimeout(60)
        view = memoryview(bytearray(BLOCK))
        for offset in range(first * BLOCK, size, streams * BLOCK):
            length, got = min(BLOCK, size - offset), 0
            while got < length:
                got += tls.recv_into(view[got:length]) or sys.exit("connection closed early")
            hashlib.sha256(view[:length]).digest()
            os.pwrite(out, view[:length], offset)
            received.append(length)

with socket.create_server(("127.0.0.1", 0)) as listener:
    listener.settimeout(60)  # never outlive a benchmark that died
    print(listener.getsockname()[1], flush=True)
    threads = [threading.Thread(target=stream, args=(listener.accept()[0], k)) for k in range(streams)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
os.fsync(out)
print("done", sum(received), flush=True)
"""


@dataclass
class ClientRun:
    seconds: float
    peak_rss_mib: float
    reported_speed: str
    cpu_s: float  # user + system


# Preparing --------------------------------------------------------------------------


def config_settings(chunk_size: int, port: int = 0, encrypt: bool = True) -> dict:
    """The server's config (port 0: any free port) or the client's (the server's real port).

    ``encrypt`` False is the plaintext row: the same programs over plain TCP,
    to show what TLS costs.
    """
    return {
        "server": {"main": {"host": "127.0.0.1", "port": port, "data_dir": "server" if encrypt else "server-plain"},
                   "backup": {"port": 0}},  # no backup: nothing else is dialled (5002 may be another program's)
        "client": {"download_dir": "downloads", "data_dir": "client-state", "retry_deadline": 10.0},
        "transfer": {"encrypt": encrypt, "chunk_size": chunk_size},
        "logging": {"level": "WARNING", "log_to_file": False, "log_dir": "logs"},
    }


# Processes --------------------------------------------------------------------------


def peak_rss_mib(server: ServerProcess) -> float | None:
    """The server process's peak RSS so far (``VmHWM``), or None where /proc does not say."""
    try:
        status = Path(f"/proc/{server.process.pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else None


def run_client(config: Path, output: Path, size: int, log_folder: Path) -> ClientRun:
    """Run ``client.py get``; wall-clock seconds and peak RSS of the whole process."""
    command = [sys.executable, str(ROOT / "client.py"), "--config", str(config), "get", FILE_NAME,
               "--output", str(output)]
    stdout_path, stderr_path = log_folder / "client.stdout", log_folder / "client.stderr"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, cwd=log_folder,
                                   env=bytecode_cached_env(log_folder / "pycache"))
        watchdog = threading.Timer(START_TIMEOUT_S + size / MIN_RATE_BPS, _kill, (process,))
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            _kill(process)
            process.wait()
            raise
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # tell Popen the child is reaped
    if process.returncode != 0:
        raise BenchError(f"client exited {process.returncode}:\n" + stderr_path.read_text(errors="replace")[-2000:])
    speeds = CLIENT_SPEED.findall(stdout_path.read_text(errors="replace"))
    return ClientRun(seconds, usage.ru_maxrss / 1024, speeds[-1] + "/s" if speeds else "n/a",
                     usage.ru_utime + usage.ru_stime)


def _kill(process: subprocess.Popen) -> None:
    try:
        process.kill()
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def receiver_process(script: str, *args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """A receiver run as ``python -c script args...`` and the port it printed; killed (if still there) at the end."""
    receiver = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    try:
        line = receiver.stdout.readline()
        if not line.strip().isdigit():
            raise BenchError(f"receiver did not start (said {line!r})")
        yield receiver, int(line)
        receiver.wait(START_TIMEOUT_S)
    finally:
        _kill(receiver)
        receiver.wait()
        receiver.stdout.close()


def run_baseline(source: Path, target: Path, size: int, mode: str = "plain") -> float:
    """Send ``source`` over 127.0.0.1 with sendfile to a recv_into receiver process; seconds taken."""
    with receiver_process(RECEIVER, str(target), mode) as (receiver, port), open(source, "rb") as file:
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT_S) as sock:
            sent = sock.sendfile(file)
            sock.shutdown(socket.SHUT_WR)
            done = receiver.stdout.readline()  # the receiver has closed its file
        seconds = time.perf_counter() - started
    if sent != size or done.split() != ["done", str(size)]:
        raise BenchError(f"baseline moved {sent} bytes, receiver said {done.strip()!r}; expected {size}")
    return seconds


def run_tls_floor(source: Path, target: Path, size: int, certificate: Path) -> float:
    """Send ``source`` over ``TLS_STREAMS`` TLS connections to the TLS floor's receiver; seconds taken."""
    with receiver_process(TLS_RECEIVER, str(target), str(size), str(certificate), str(TLS_STREAMS)) as (
            receiver, port):
        started = time.perf_counter()
        senders = [threading.Thread(target=_send_tls_stream, args=(source, port, size, k)) for k in range(TLS_STREAMS)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        done = receiver.stdout.readline()  # every chunk hashed, written and the file synced
        seconds = time.perf_counter() - started
    if done.split() != ["done", str(size)]:
        raise BenchError(f"TLS floor receiver said {done.strip()!r}; expected {size} bytes")
    return seconds


def _send_tls_stream(source: Path, port: int, size: int, first: int) -> None:
    """Chunks ``first``, ``first + TLS_STREAMS``, ... of ``source``, each read into one buffer and written in one call."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # a throwaway certificate, on loopback
    view = memoryview(bytearray(CHUNK_BLOCK))
    fd = os.open(source, os.O_RDONLY)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT_S) as raw, \
                context.wrap_socket(raw) as tls:
            for offset in range(first * CHUNK_BLOCK, size, TLS_STREAMS * CHUNK_BLOCK):
                got = os.preadv(fd, [view[:min(CHUNK_BLOCK, size - offset)]], offset)
                tls.sendall(view[:got])
            tls.recv(1)  # the receiver closes once it has everything: closing first could cut its last bytes
    finally:
        os.close(fd)


# The run ----------------------------------------------------------------------------


def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def bench(folder: Path, size: int, repeat: int, warmup: bool, chunk_size: int) -> None:
    source = folder / "source" / FILE_NAME
    print(f"writing {size} random bytes to {source} ...", flush=True)
    source_sha = write_random_file(source, size)
    print(f"starting the main servers, TLS and plaintext (importing the file in chunks of {chunk_size} bytes) ...",
          flush=True)
    started = time.perf_counter()
    server = start_server(write_config(folder / "server.yaml", config_settings(chunk_size)), add=[source])
    plain = start_server(write_config(folder / "server-plain.yaml", config_settings(chunk_size, encrypt=False)),
                         add=[source])
    print(f"servers listening on {server.address[0]}:{server.address[1]} (TLS) and port {plain.address[1]} "
          f"(plain) (start-up with --add: {time.perf_counter() - started:.1f} s)", flush=True)
    results = Results(size)
    configs = {"minitorrent": write_config(folder / "client.yaml", config_settings(chunk_size, server.address[1])),
               "plaintext": write_config(folder / "client-plain.yaml",
                                         config_settings(chunk_size, plain.address[1], False))}
    runner = Runner(folder, source, source_sha, size, configs, identity.load_or_create(folder / "tls-floor").path)
    try:
        if warmup:
            runner.round("warm-up", ("baseline", "tls floor", "minitorrent", "plaintext"), Results(size))
        for run in range(repeat):
            order = KINDS if run % 2 == 0 else KINDS[::-1]  # alternate, so drift hits all alike
            runner.round(f"run {run + 1}", order, results)
        server_rss = peak_rss_mib(server)
    finally:
        stop_process(server.process)
        stop_process(plain.process)
    results.report(repeat, server_rss)


KINDS = ("baseline", "integrity", "tls floor", "minitorrent", "plaintext")


@dataclass
class Results:
    size: int
    baseline_s: list[float] = field(default_factory=list)
    integrity_s: list[float] = field(default_factory=list)
    tls_floor_s: list[float] = field(default_factory=list)
    client_runs: list[ClientRun] = field(default_factory=list)
    plain_runs: list[ClientRun] = field(default_factory=list)  # the same programs over plain TCP

    def report(self, repeat: int, server_rss: float | None) -> None:
        size = self.size
        base = statistics.median(self.baseline_s)
        floor = statistics.median(self.integrity_s)
        mini = statistics.median(run.seconds for run in self.client_runs)
        ratio = base / mini  # throughput ratio: minitorrent MB/s / baseline MB/s
        rss = max(run.peak_rss_mib for run in self.client_runs)
        print()
        print(f"file size {size} bytes ({size / (1 << 20):.0f} MiB); medians of {repeat} run(s); MB/s = 1e6 bytes/s")
        line("baseline: sendfile -> recv_into + write", f"{mb_per_s(size, base):7.1f} MB/s  {base:6.2f} s")
        line("integrity floor (info): + 1x SHA-256, fsync", f"{mb_per_s(size, floor):7.1f} MB/s  {floor:6.2f} s")
        line("minitorrent: client process, wall clock", f"{mb_per_s(size, mini):7.1f} MB/s  {mini:6.2f} s")
        line("minitorrent / integrity floor (info)", f"{floor / mini:7.2f}")
        tls_floor = statistics.median(self.tls_floor_s)
        line("TLS floor (info): 2 TLS streams, SHA-256, fsync", f"{mb_per_s(size, tls_floor):7.1f} MB/s  {tls_floor:6.2f} s")
        line("minitorrent / TLS floor (info)", f"{tls_floor / mini:7.2f}")
        line("best ratio any TLS receiver reaches (info)", f"{base / tls_floor:7.2f}")
        cpu = statistics.median(run.cpu_s for run in self.client_runs)
        line("client CPU, user + system (info)", f"{cpu / (size / (1 << 30)):7.2f} s/GiB")
        plain = statistics.median(run.seconds for run in self.plain_runs)
        line("plaintext: same, transfer.encrypt false", f"{mb_per_s(size, plain):7.1f} MB/s  {plain:6.2f} s")
        line("TLS cost: minitorrent / plaintext (info)", f"{plain / mini:7.2f}")
        line("load average (1, 5, 15 min)", " ".join(f"{v:.2f}" for v in os.getloadavg()))
        if server_rss is not None:
            line("server peak RSS (info)", f"{server_rss:7.1f} MiB")
        line(f"TARGET ratio minitorrent/baseline >= {RATIO_TARGET}", f"{ratio:7.2f}       {verdict(ratio >= RATIO_TARGET)}")
        line(f"TARGET client peak RSS <= {RSS_TARGET_MIB:.0f} MiB", f"{rss:7.1f} MiB   {verdict(rss <= RSS_TARGET_MIB)}")


line = partial(report_line, width=46)


@dataclass
class Runner:
    folder: Path
    source: Path
    source_sha: str
    size: int
    client_configs: dict[str, Path]  # per kind: the client's config (TLS, plaintext)
    certificate: Path  # the TLS floor receiver's certificate and key

    def round(self, label: str, order: tuple[str, ...], results: Results) -> None:
        for kind in order:
            if kind in self.client_configs:
                run = self.minitorrent(kind)
                (results.client_runs if kind == "minitorrent" else results.plain_runs).append(run)
                print(f"  {label:8} {kind:11} {run.seconds:7.2f} s {mb_per_s(self.size, run.seconds):8.1f} MB/s"
                      f"  peak RSS {run.peak_rss_mib:.1f} MiB  CPU {run.cpu_s:.2f} s"
                      f"  (client says {run.reported_speed}; load {os.getloadavg()[0]:.2f})", flush=True)
                continue
            seconds = self.baseline(kind)
            {"baseline": results.baseline_s, "integrity": results.integrity_s,
             "tls floor": results.tls_floor_s}[kind].append(seconds)
            print(f"  {label:8} {kind:11} {seconds:7.2f} s {mb_per_s(self.size, seconds):8.1f} MB/s", flush=True)

    def baseline(self, mode: str) -> float:
        target = self.folder / "baseline.out"
        try:
            if mode == "tls floor":
                return run_tls_floor(self.source, target, self.size, self.certificate)
            return run_baseline(self.source, target, self.size, "plain" if mode == "baseline" else mode)
        finally:
            target.unlink(missing_ok=True)

    def minitorrent(self, kind: str) -> ClientRun:
        output = self.folder / "downloads"
        try:
            result = run_client(self.client_configs[kind], output, self.size, self.folder)
            got = sha256_of(output / FILE_NAME)
            if got != self.source_sha:
                raise BenchError(f"DOWNLOAD CORRUPT: sha256 {got} != source {self.source_sha}")
            return result
        finally:
            # A fresh client every run: no finished file, no resumable state.
            shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(self.folder / "client-state", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="file size: bytes, or 256M, 1G ... (default 1G)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternated; medians reported (default 1)")
    parser.add_argument("--chunk-size", type=parse_size, default=1 << 20,
                        help="the server's transfer.chunk_size: 64K, 1M ... (default 1M)")
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER,
                        help=f"where the temporary folder goes (default {DEFAULT_FOLDER or 'the system temp'})")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the uncounted first round (see docs/performance.md)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    install_interrupts()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; folder in {args.folder or 'the system temp'}",
          flush=True)
    with temp_folder("minitorrent-bench-", args.folder) as folder:
        status = exit_status(lambda: bench(folder, args.size, args.repeat, args.warmup, args.chunk_size))
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
