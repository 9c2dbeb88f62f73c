"""Benchmark: 10,000 files of 4 KiB in nested folders, downloaded as one folder, beside rsync and tar.

    python bench/small_files.py [--files 10000] [--size 4K] [--repeat 3]

Everything lives on /dev/shm (tmpfs: the disk is out of the comparison; the
per-file costs that are left are the protocol's, the syscalls' and the
interpreters'), all traffic on 127.0.0.1 with explicit ports:

* MiniTorrent: a real ``main_server.py --headless`` process sharing the tree
  (imported before timing starts), then ``client.py get tree/`` as a user runs
  it (a fresh process each round: its start-up is counted, as rsync's is;
  its bytecode cached as an installed program's, after one untimed run);
* rsync: ``rsync -a rsync://127.0.0.1:<port>/data/tree/`` from a local rsync
  daemon (``rsync --daemon --no-detach``, its config in the temp folder);
* tar: ``tar -cf - tree`` piped through a TCP socket into ``tar -xf -``;
* python floor: bench/python_floor.py, the least any Python receiver does (a
  fresh interpreter, TLS with the server pinned, SHA-256 and one
  ``open``/``write``/``close`` per file), from a sender thread of this
  process holding the files in memory (up to 512 MiB of them), so that it
  never waits on a sender. Not a target: it shows how much of the time a
  Python client has left for everything else (configuration, identity
  proof, catalog, staging).

Each round downloads into a fresh folder, the contenders' order rotated; the
medians of ``--repeat`` rounds are printed as files per second and CPU
seconds (of the processes the bench waits for), with MiniTorrent's ratio to rsync. Target:
at least as many files per second as rsync. Every copy is checked file by
file against the source (exit 1 on a difference). rsync missing: said, and
the comparison is skipped (``apt-get install -y rsync``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from common import (
    ROOT,
    BenchError,
    bytecode_cached_env,
    exit_status,
    install_interrupts,
    parse_size,
    start_server,
    stop_process,
    verdict,
    wait_listening,
)

from minitorrent.common.launcher import free_port, write_config
from minitorrent.wire.identity import Identity, load_or_create

SHM = Path("/dev/shm")
RSYNC_START_S = 10.0  # the rsync daemon binds its port in well under a second
FLOOR_HELD_BYTES = 512 * 1024 * 1024  # the python floor's sender holds the files in memory: larger trees go without
FLOOR_FRAME_BYTES = 1024 * 1024  # the python floor's frames hold up to 1 MiB of files, as a client's batches
FILES_PER_FOLDER = 100  # 10,000 files: 100 folders of 100, two levels deep (tree/dNN/eN/...)


def build_tree(root: Path, files: int, size: int) -> dict[str, str]:
    """Write ``files`` distinct files of ``size`` bytes under ``root``; relative path -> SHA-256."""
    digests = {}
    for i in range(files):
        folder = root / f"d{i // (FILES_PER_FOLDER * 10):02d}" / f"e{i // FILES_PER_FOLDER % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        data = hashlib.sha256(b"%d" % i).digest() * (size // 32 + 1)
        path = folder / f"file {i:05d}.bin"
        path.write_bytes(data[:size])
        digests[path.relative_to(root.parent).as_posix()] = hashlib.sha256(data[:size]).hexdigest()
    return digests


def check_copy(dest: Path, expected: dict[str, str], who: str) -> None:
    """Every file byte-exact where it belongs, and nothing else; ``BenchError`` otherwise."""
    found = {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in dest.rglob("*") if p.is_file()}
    if found != expected:
        missing = len(set(expected) - set(found))
        wrong = sum(1 for k in expected if k in found and found[k] != expected[k])
        raise BenchError(f"{who}: copy differs from the source ({missing} missing, {wrong} different, "
                         f"{len(set(found) - set(expected))} extra)")


def timed(run: Callable[[Path], None], work: Path, label: str, round_no: int) -> tuple[float, float, Path]:
    """(wall seconds, CPU seconds of the processes it ran and waited for, the copy): CPU is what load barely moves."""
    dest = work / f"{label}-{round_no}"
    dest.mkdir()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run(dest)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), dest


# The three contenders ---------------------------------------------------------------------


def minitorrent_get(client_config: Path, pycache: Path) -> Callable[[Path], None]:
    """``client.py get tree/``, its bytecode cached in ``pycache`` as an installed program's is.

    ``measure`` runs it once untimed first, so the cache is filled.
    """
    env = bytecode_cached_env(pycache)

    def run(dest: Path) -> None:
        done = subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(client_config),
                               "get", "tree/", "--output", str(dest)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise BenchError(f"client.py get tree/ failed: {done.stderr.strip()[-400:]}")
    return run


def python_floor(port: int, server_sha256: str) -> Callable[[Path], None]:
    """bench/python_floor.py: the least a Python receiver does (TLS, SHA-256 per file, one write per file)."""
    def run(dest: Path) -> None:
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "python_floor.py"), str(port), server_sha256,
                               str(dest)], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"the python floor failed: {done.stderr.strip()[-400:]}")
    return run


def start_floor_sender(source: Path, expected: dict[str, str], identity: Identity) -> socket.socket:
    """Serve the files of ``expected`` (path under ``source`` -> SHA-256) to bench/python_floor.py, over TLS as
    ``identity``, until closed. The bytes are read before timing starts (at most ``FLOOR_HELD_BYTES``: the caller
    checks): the floor measures the receiver, never waiting on a sender reading files.
    """
    listing = [[name, (source / name).stat().st_size, expected[name]] for name in sorted(expected)]
    frames = [_floor_frame(0, json.dumps(listing).encode()), *_floor_frames(source, listing)]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.path)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the bench is done
                return
            try:
                with context.wrap_socket(connection, server_side=True) as secure:
                    for frame in frames:
                        secure.sendall(frame)
            except OSError:  # that receiver failed (it says why); the next round's is served all the same
                connection.close()
    threading.Thread(target=serve, name="python-floor-sender", daemon=True).start()
    return listener


def _floor_frames(source: Path, listing: list[list]) -> Iterator[bytes]:
    """The files of ``listing`` in frames of up to ``FLOOR_FRAME_BYTES`` (a bigger file alone in its frame)."""
    batch: list[bytes] = []
    batch_bytes = 0
    for name, size, _ in listing:
        if batch and batch_bytes + size > FLOOR_FRAME_BYTES:
            yield _floor_frame(len(batch), b"".join(batch))
            batch, batch_bytes = [], 0
        batch.append((source / name).read_bytes())
        batch_bytes += size
    if batch:
        yield _floor_frame(len(batch), b"".join(batch))


def _floor_frame(files: int, body: bytes) -> bytes:
    """A frame of bench/python_floor.py's stream: its head (how many files, how many bytes: its ``FRAME_HEAD``;
    not imported from it, as bench/ is off the path once ``common`` is) and its body."""
    return struct.pack(">II", files, len(body)) + body


def start_rsync_daemon(work: Path, source: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = work / "rsyncd.conf"
    config.write_text(f"pid file = {work / 'rsyncd.pid'}\nuse chroot = no\nlog file = {work / 'rsyncd.log'}\n"
                      f"[data]\n  path = {source}\n  read only = yes\n  uid = {os.getuid()}\n"
                      f"  gid = {os.getgid()}\n")
    daemon = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={config}", f"--port={port}",
                               "--address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, daemon, RSYNC_START_S)
    except BenchError:
        stop_process(daemon)
        raise
    return daemon, port


def rsync_get(port: int) -> Callable[[Path], None]:
    def run(dest: Path) -> None:
        done = subprocess.run(["rsync", "-a", f"rsync://127.0.0.1:{port}/data/tree", str(dest) + "/"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"rsync failed: {done.stderr.strip()[-400:]}")
    return run


def tar_over_socket(source: Path) -> Callable[[Path], None]:
    """``tar -cf - tree`` on one end of a TCP connection on 127.0.0.1, ``tar -xf -`` on the other."""
    def run(dest: Path) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            sender_done: list[int] = []

            def send() -> None:
                connection, _ = listener.accept()
                with connection:
                    sender_done.append(subprocess.run(["tar", "-C", str(source), "-cf", "-", "tree"],
                                                      stdout=connection.fileno()).returncode)
            thread = threading.Thread(target=send, daemon=True)
            thread.start()
            with socket.create_connection(("127.0.0.1", port)) as receiver:
                code = subprocess.run(["tar", "-C", str(dest), "-xf", "-"], stdin=receiver.fileno()).returncode
            thread.join()
        if code != 0 or sender_done != [0]:
            raise BenchError(f"tar over a socket failed (receiver {code}, sender {sender_done})")
    return run


# The run ----------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, work: Path) -> int:
    source = work / "src"
    print(f"writing {args.files} files of {args.size} bytes under {source / 'tree'} (tmpfs)...", flush=True)
    expected = build_tree(source / "tree", args.files, args.size)
    server_config = write_config(work / "srv" / "config.yaml", {
        "server": {"main": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(work / "srv" / "data")},
                   "backup": {"port": 0}},
        "logging": {"log_to_file": False, "level": "WARNING"}})
    started = time.perf_counter()
    server = start_server(server_config, add=[source / "tree"])
    print(f"main server shares the tree (import and start: {time.perf_counter() - started:.1f} s)", flush=True)
    contenders: dict[str, Callable[[Path], None]] = {}
    rsync_daemon = floor_sender = None
    try:
        client_config = write_config(work / "cli" / "config.yaml", {
            "server": {"main": {"host": "127.0.0.1", "port": server.address[1]}, "backup": {"port": 0}},
            "client": {"data_dir": str(work / "cli" / "data"), "download_dir": str(work / "cli" / "dl"),
                       "seeding": False},
            "logging": {"log_to_file": False, "level": "WARNING"}})
        contenders["minitorrent"] = minitorrent_get(client_config, work / "pycache")
        timed(contenders["minitorrent"], work, "warm-up", 0)  # writes the bytecode cache; not counted
        if shutil.which("rsync"):
            rsync_daemon, port = start_rsync_daemon(work, source)
            contenders["rsync"] = rsync_get(port)
        else:
            print("rsync is not installed (apt-get install -y rsync): no rsync figure", flush=True)
        contenders["tar|tar"] = tar_over_socket(source)
        if args.files * args.size <= FLOOR_HELD_BYTES:
            floor_identity = load_or_create(work / "floor")
            floor_sender = start_floor_sender(source, expected, floor_identity)
            contenders["python floor"] = python_floor(floor_sender.getsockname()[1],
                                                      hashlib.sha256(floor_identity.certificate_der).hexdigest())
        else:
            print(f"no python floor: its sender holds every file in memory, at most "
                  f"{FLOOR_HELD_BYTES >> 20} MiB", flush=True)
        return report(run_rounds(contenders, work, expected, args.repeat), args.files)
    finally:
        if floor_sender is not None:
            floor_sender.close()
        if rsync_daemon is not None:
            stop_process(rsync_daemon)
        stop_process(server.process)


def run_rounds(contenders: dict[str, Callable[[Path], None]], work: Path, expected: dict[str, str],
               repeat: int) -> dict[str, list[tuple[float, float]]]:
    """Round-robin, the order rotated each round, so a burst of load elsewhere hits every contender alike."""
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_no in range(repeat):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, cpu, dest = timed(contenders[name], work, name.replace("|", "-"), round_no)
            check_copy(dest, expected, name)
            shutil.rmtree(dest)
            seconds[name].append((elapsed, cpu))
            print(f"  round {round_no + 1}: {name:12} {elapsed:6.2f} s  ({cpu:5.2f} CPU-s)", flush=True)
    return seconds


def report(seconds: dict[str, list[tuple[float, float]]], files: int) -> int:
    """Medians; CPU-s: the processes the bench runs and waits for (client.py, rsync's receiver, both tars), not servers."""
    walls = {name: statistics.median(wall for wall, _ in times) for name, times in seconds.items()}
    rates = {name: files / wall for name, wall in walls.items()}
    print(f"\nmedian of {len(next(iter(seconds.values())))} rounds, {files} files, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}:")
    for name, rate in rates.items():
        ratio = f"  ({rate / rates['rsync']:.2f} x rsync)" if "rsync" in rates else ""
        cpu = statistics.median(cpu for _, cpu in seconds[name])
        print(f"  {name:12} {rate:8.0f} files/s  {walls[name]:6.2f} s  {cpu:5.2f} CPU-s{ratio}")
    if "rsync" in rates:
        print(f"target: at least as many files/s as rsync: {verdict(rates['minitorrent'] >= rates['rsync'])}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--size", type=parse_size, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not SHM.is_dir():
        print("error: /dev/shm is missing; this benchmark keeps its data in memory", file=sys.stderr)
        return 1
    install_interrupts()

    def run() -> int:
        work = Path(tempfile.mkdtemp(prefix="mt-small-", dir=SHM))
        try:
            return measure(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
