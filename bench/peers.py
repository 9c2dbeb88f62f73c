"""Benchmark: the same file downloaded by MiniTorrent and by its verified peers, in one run.

    python bench/peers.py [--size 1G] [--rounds 5] [--quick] [--folder /dev/shm]

Every tool moves the same random file over 127.0.0.1 and every output is
checked: its SHA-256 must equal the source's (exit 1 if one differs). Each
time is the wall clock of a fresh process (or pipeline), start-up included,
because that is what a user waits for:

* ``minitorrent``: ``client.py get`` from a real headless ``main_server.py``
  (both ports explicit; the backup's is 0, so nothing else is dialled).
* ``minitorrent plain`` (information): the same from a second server whose
  config says ``transfer.encrypt: false``, to race the plain HTTP peers like
  for like.
* ``curl+openssl``: ``curl | tee FILE | openssl dgst -sha256`` from
  ``python3 -m http.server``: one read, stored and hashed as it streams.
* ``curl https`` (information): the same pipeline over HTTPS (TLS 1.3, the
  same standard-library server wrapped in ``ssl``), to race MiniTorrent's
  default, TLS, like for like.
* ``aria2c``: ``aria2c --checksum=sha-256=HEX`` from the same HTTP server.
* ``libtorrent``: a downloader process (the pip package, a fresh session)
  fetching from a seed session in this process; both bound to 127.0.0.1,
  no DHT, LSD, UPnP, NAT-PMP or tracker, the seed given as the one peer.

The tools run in turn, round by round, in an order that alternates, so drift
on a shared machine hits all alike; medians are reported, with MiniTorrent's
speed-up over each (target: at least 1.5 x over the fastest verified peer).
A tool that is not installed is reported as missing, with how to install it,
and left out of the verdict. ``--quick`` is a small file and one round.
"""
from __future__ import annotations

# transfer first: it imports common, which puts the project root on sys.path
# (and takes bench/ off it, so this is the only bench module imported by name).
from transfer import FILE_NAME, config_settings, run_client

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from common import (
    BenchError,
    exit_status,
    install_interrupts,
    parse_size,
    report_line,
    sha256_of,
    start_server,
    starting,
    stop_process,
    temp_folder,
    verdict,
    wait_listening,
    write_random_file,
)

from minitorrent.common.launcher import free_port, write_config
from minitorrent.wire import identity

CHUNK_SIZE = 1 << 20
SPEEDUP_TARGET = 1.5  # over the fastest verified peer (issue 10)
QUICK_SIZE = 16 << 20
START_TIMEOUT_S = 30.0  # a helper process start on a loaded machine
MIN_RATE_BPS = 5e6  # any slower than this and a download is considered hung
DEFAULT_FOLDER = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # tmpfs: no fsync timing in the figures
TOOLS = ("minitorrent", "minitorrent plain", "curl+openssl", "curl https", "aria2c", "libtorrent")
PLAIN_PEERS = ("curl+openssl", "aria2c", "libtorrent")  # the peers without encryption
INFO_TOOLS = ("minitorrent plain", "curl https")  # like-for-like races, not judged by the target
INSTALL = {"curl+openssl": "apt-get install -y curl openssl", "curl https": "apt-get install -y curl openssl",
           "aria2c": "apt-get install -y aria2",
           "libtorrent": "pip install libtorrent==2.1.1"}

# libtorrent settings for both sessions: loopback only, nothing announced or discovered.
# TCP only: uTP's delay-based congestion control crawls on loopback (3 MB/s measured here).
LT_SETTINGS = {
    "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
    "enable_outgoing_utp": False, "enable_incoming_utp": False,
    "dht_bootstrap_nodes": "", "outgoing_interfaces": "127.0.0.1", "alert_mask": 0,
}

# The libtorrent downloader, run as ``python -c LT_DOWNLOADER TORRENT SAVE_DIR SEED_PORT TIMEOUT``:
# a fresh session that fetches the torrent from the one seed it is given and exits
# when every piece has passed libtorrent's own hash check.
LT_DOWNLOADER = r"""
import signal, sys, time
import libtorrent as lt
signal.signal(signal.SIGINT, signal.SIG_IGN)  # on Ctrl-C the benchmark ends this process itself
torrent, save_dir, seed_port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
settings = dict(%(settings)r, listen_interfaces="127.0.0.1:0")
session = lt.session(settings)
params = lt.add_torrent_params()
params.ti = lt.torrent_info(torrent)
params.save_path = save_dir
handle = session.add_torrent(params)
handle.connect_peer(("127.0.0.1", seed_port))
deadline = time.monotonic() + timeout
while not handle.status().is_seeding:
    if time.monotonic() > deadline:
        sys.exit("libtorrent download timed out at %%.1f%%%%" %% (handle.status().progress * 100))
    time.sleep(0.005)  # a poll of libtorrent's state: its own threads do the work
""" % {"settings": LT_SETTINGS}


def missing_tools() -> dict[str, str]:
    """Tools not installed here, each with how to install it."""
    curl = shutil.which("curl") and shutil.which("openssl")
    present = {"curl+openssl": curl, "curl https": curl,
               "aria2c": shutil.which("aria2c"),
               "libtorrent": importlib.util.find_spec("libtorrent")}
    return {tool: INSTALL[tool] for tool, found in present.items() if not found}


def run_timed(command: list[str], size: int, cwd: Path) -> float:
    """Run ``command`` to its end; wall-clock seconds. A failure or a hang is a ``BenchError``."""
    started = time.perf_counter()
    try:
        run = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                             timeout=START_TIMEOUT_S + size / MIN_RATE_BPS)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{command[0]} did not finish in time") from None
    seconds = time.perf_counter() - started
    if run.returncode:
        raise BenchError(f"{' '.join(command)[:200]} exited {run.returncode}:\n{(run.stderr or run.stdout)[-1500:]}")
    return seconds


def curl_and_hash(url: str, output: Path, source_sha: str, size: int, work: Path, curl_options: str = "") -> float:
    """``curl URL | tee OUTPUT | openssl dgst -sha256``; seconds. The digest it printed must be the source's."""
    pipeline = (f"set -o pipefail; curl -sSf {curl_options} {url!r} | tee {str(output)!r} | openssl dgst -sha256 "
                f"> {str(output)!r}.sha256")
    seconds = run_timed(["bash", "-c", pipeline], size, work)
    printed = Path(f"{output}.sha256").read_text().split()[-1]
    if printed != source_sha:
        raise BenchError(f"curl | openssl printed sha256 {printed} != source {source_sha}")
    return seconds


# The peers ---------------------------------------------------------------------------


class HttpPeers:
    """``python3 -m http.server`` on an explicit port, and the two HTTP clients fetching from it."""

    def __init__(self, source: Path, source_sha: str, size: int, work: Path) -> None:
        self.source_sha, self.size, self.work = source_sha, size, work
        port = free_port()
        with starting():
            self.server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                            "--directory", str(source.parent)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port, self.server, START_TIMEOUT_S)
        self.url = f"http://127.0.0.1:{port}/{urllib.parse.quote(source.name)}"

    def curl(self, output: Path) -> float:
        """``curl | tee | openssl dgst -sha256``; the digest it printed must be the source's too."""
        return curl_and_hash(self.url, output, self.source_sha, self.size, self.work)

    def aria2c(self, output: Path) -> float:
        """``aria2c --checksum``: it fails (and so does the run) if the file's SHA-256 differs."""
        return run_timed(["aria2c", "--no-conf=true", f"--checksum=sha-256={self.source_sha}",
                          "--dir", str(output.parent), "--out", output.name, "--file-allocation=none",
                          "--allow-overwrite=true", "--auto-file-renaming=false", "--console-log-level=warn",
                          "--summary-interval=0", "--quiet=true", self.url], self.size, self.work)

    def close(self) -> None:
        stop_process(self.server)


# The HTTPS peer, run as ``python -c HTTPS_SERVER PORT FOLDER CERT``: the standard library's file
# server (as ``python3 -m http.server``), its listening socket wrapped in TLS 1.3.
HTTPS_SERVER = r"""
import functools, http.server, signal, ssl, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
port, folder, certificate = int(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.minimum_version = ssl.TLSVersion.TLSv1_3
context.load_cert_chain(certificate)
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


class HttpsPeer:
    """The HTTPS file server, and ``curl | tee | openssl dgst`` fetching from it."""

    def __init__(self, source: Path, source_sha: str, size: int, work: Path) -> None:
        certificate = identity.load_or_create(work / "https-server").path
        port = free_port()
        with starting():
            self.server = subprocess.Popen([sys.executable, "-c", HTTPS_SERVER, str(port), str(source.parent),
                                            str(certificate)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(port, self.server, START_TIMEOUT_S)
        self.url = f"https://127.0.0.1:{port}/{urllib.parse.quote(source.name)}"
        self.source_sha, self.size, self.work = source_sha, size, work

    def curl(self, output: Path) -> float:
        """``curl --insecure`` (a throwaway certificate, on loopback), piped as for plain HTTP."""
        return curl_and_hash(self.url, output, self.source_sha, self.size, self.work, "--insecure")

    def close(self) -> None:
        stop_process(self.server)


class LibtorrentSeed:
    """A libtorrent session in this process seeding the source file; a fresh downloader process per run."""

    def __init__(self, source: Path, size: int, work: Path) -> None:
        import libtorrent as lt

        self.size, self.work = size, work
        creator = lt.create_torrent(lt.list_files(str(source)))  # v1 + v2 (hybrid), libtorrent's default
        lt.set_piece_hashes(creator, str(source.parent))
        self.torrent = work / "payload.torrent"
        self.torrent.write_bytes(lt.bencode(creator.generate()))
        self.session = lt.session(dict(LT_SETTINGS, listen_interfaces="127.0.0.1:0"))
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(str(self.torrent))
        params.save_path = str(source.parent)
        params.flags |= lt.torrent_flags.seed_mode  # the file is the source: no need to re-hash it
        self.session.add_torrent(params)
        self.port = self.session.listen_port()

    def download(self, output: Path) -> float:
        """The downloader process, from start to every piece verified; the file lands as ``output``."""
        save_dir = output.parent / "libtorrent"
        save_dir.mkdir(parents=True, exist_ok=True)
        seconds = run_timed([sys.executable, "-c", LT_DOWNLOADER, str(self.torrent), str(save_dir),
                             str(self.port), str(START_TIMEOUT_S + self.size / MIN_RATE_BPS)], self.size, self.work)
        (save_dir / FILE_NAME).rename(output)
        shutil.rmtree(save_dir)
        return seconds

    def close(self) -> None:
        del self.session  # ends libtorrent's threads and sockets


# The run -----------------------------------------------------------------------------


@dataclass
class Results:
    size: int
    missing: dict[str, str]
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, tool: str, seconds: float) -> None:
        self.seconds.setdefault(tool, []).append(seconds)

    def median(self, tool: str) -> float:
        return statistics.median(self.seconds[tool])

    def report(self, rounds: int) -> None:
        print()
        print(f"file size {self.size} bytes ({self.size / (1 << 20):.0f} MiB); medians of {rounds} round(s); "
              f"every output's SHA-256 checked")
        mini = self.median("minitorrent")
        for tool in TOOLS:
            if tool in self.missing:
                line(tool, f"MISSING: install with `{self.missing[tool]}`")
            elif tool != "minitorrent":
                line(tool, f"{self.median(tool):7.2f} s  minitorrent speed-up {self.median(tool) / mini:5.2f} x")
            else:
                line(tool, f"{mini:7.2f} s  {self.size / mini / 1e6:7.1f} MB/s")
        line("load average (1, 5, 15 min)", " ".join(f"{v:.2f}" for v in os.getloadavg()))
        self.like_for_like("minitorrent plain", PLAIN_PEERS, "no encryption")
        self.like_for_like("minitorrent", ("curl https",), "TLS")
        peers = [tool for tool in self.seconds if tool != "minitorrent" and tool not in INFO_TOOLS]
        if peers:
            fastest = min(peers, key=self.median)
            speedup = self.median(fastest) / mini
            line(f"TARGET speed-up over fastest ({fastest}) >= {SPEEDUP_TARGET}",
                 f"{speedup:7.2f} x  {verdict(speedup >= SPEEDUP_TARGET)}")

    def like_for_like(self, tool: str, peers: tuple[str, ...], what: str) -> None:
        """(information) ``tool``'s speed-up over the fastest of ``peers`` that ran: both sides with ``what``."""
        ran = [peer for peer in peers if peer in self.seconds]
        if tool in self.seconds and ran:
            fastest = min(ran, key=self.median)
            line(f"like for like ({what}): {tool} over {fastest} (info)",
                 f"{self.median(fastest) / self.median(tool):7.2f} x")


line = partial(report_line, width=72)


@dataclass
class Runner:
    source_sha: str
    size: int
    work: Path
    runs: dict[str, Callable[[Path], float]]  # per tool: download to the given path, seconds

    def round(self, label: str, order: list[str], results: Results) -> None:
        for tool in order:
            output = self.work / "out" / FILE_NAME
            output.parent.mkdir(exist_ok=True)
            try:
                seconds = self.runs[tool](output)
                got = sha256_of(output)
                if got != self.source_sha:
                    raise BenchError(f"{tool}: DOWNLOAD CORRUPT: sha256 {got} != source {self.source_sha}")
            finally:
                shutil.rmtree(output.parent, ignore_errors=True)
                shutil.rmtree(self.work / "client-state", ignore_errors=True)  # MiniTorrent: no resumable state
            results.add(tool, seconds)
            print(f"  {label:8} {tool:17} {seconds:7.2f} s {self.size / seconds / 1e6:8.1f} MB/s  sha256 verified"
                  f"  (load {os.getloadavg()[0]:.2f})", flush=True)


def minitorrent_server(folder: Path, source: Path, size: int, encrypt: bool,
                       closers: list[Callable[[], None]]) -> Callable[[Path], float]:
    """A main server sharing ``source`` (its stop added to ``closers``); what runs ``client.py get`` from it."""
    port, kind = free_port(), "tls" if encrypt else "plain"
    server = start_server(write_config(folder / f"server-{kind}.yaml", config_settings(CHUNK_SIZE, port, encrypt)),
                          add=[source])
    closers.append(lambda: stop_process(server.process))
    config = write_config(folder / f"client-{kind}.yaml", config_settings(CHUNK_SIZE, port, encrypt))
    return lambda output: run_client(config, output.parent, size, folder).seconds


def bench(folder: Path, size: int, rounds: int) -> None:
    missing = missing_tools()
    for tool, how in missing.items():
        print(f"{tool}: MISSING (install with `{how}`); left out of this run", flush=True)
    source = folder / "source" / FILE_NAME
    print(f"writing {size} random bytes to {source} ...", flush=True)
    source_sha = write_random_file(source, size)
    closers: list[Callable[[], None]] = []
    try:
        runs = {"minitorrent": minitorrent_server(folder, source, size, encrypt=True, closers=closers),
                "minitorrent plain": minitorrent_server(folder, source, size, encrypt=False, closers=closers)}
        if "curl+openssl" not in missing or "aria2c" not in missing:
            http = HttpPeers(source, source_sha, size, folder)
            closers.append(http.close)
            runs.update({tool: run for tool, run in (("curl+openssl", http.curl), ("aria2c", http.aria2c))
                         if tool not in missing})
        if "curl https" not in missing:
            https = HttpsPeer(source, source_sha, size, folder)
            closers.append(https.close)
            runs["curl https"] = https.curl
        if "libtorrent" not in missing:
            seed = LibtorrentSeed(source, size, folder)
            closers.append(seed.close)
            runs["libtorrent"] = seed.download
        runner = Runner(source_sha, size, folder, runs)
        results = Results(size, missing)
        tools = [tool for tool in TOOLS if tool in runs]
        for number in range(rounds):
            runner.round(f"round {number + 1}", tools if number % 2 == 0 else tools[::-1], results)
    finally:
        for close in reversed(closers):
            close()
    results.report(rounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, help="file size: bytes, or 256M, 1G ... (default 1G; --quick 16M)")
    parser.add_argument("--rounds", type=int, help="rounds of every tool, alternated; medians reported "
                                                   "(default 5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a small file and one round: does everything work?")
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER,
                        help=f"where the temporary folder goes (default {DEFAULT_FOLDER or 'the system temp'})")
    args = parser.parse_args(argv)
    size = args.size if args.size is not None else (QUICK_SIZE if args.quick else 1 << 30)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    install_interrupts()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; folder in {args.folder or 'the system temp'}",
          flush=True)
    with temp_folder("minitorrent-bench-peers-", args.folder) as folder:
        status = exit_status(lambda: bench(folder, size, rounds))
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
