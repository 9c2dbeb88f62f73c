"""Benchmark: listing, searching and adding to big catalogs, before and after, over the wire.

    python bench/catalog.py [--files 10000 100000 1000000] [--add-files 100000]
                            [--before fb1c0ba] [--before-max-files 100000] [--rounds 3] [--folder /dev/shm]

For each catalog size it writes a catalog of synthetic files straight into
SQLite, in the schema of version 1 (what every existing catalog holds):
manifests with random digests, sizes log-uniform from 1 KiB to 1 GiB (so the
rows carry realistic digest blobs), names with spaces, accents, other scripts,
"|" and ":"; every 100th name holds "Quarterly Réport". Then, over loopback:

* **before**: the code of ``--before`` (a ``git archive`` of that commit in
  the folder) serves a copy of it as a real ``main_server.py --headless``;
  only up to ``--before-max-files``, as its paging is quadratic (6.5 s for a
  listing of 100,000 files, so about 11 minutes for 1,000,000);
* **after**: this tree's code migrates the other copy to the current schema
  (timed), then serves it the same way.

A client process of the same tree (``remote.ServerClient.list_files``, what
``client.py list`` calls) lists everything, searches "quarterly réport" (1 %
of the names, typed in another case), "report" (about 8 %) and a text found
nowhere; ``--rounds`` times each, before and after alternating. Every count is
checked. Each server serves all its rounds, so what it remembers from the
first (counts, a search's names, pages) serves the later ones: the median is
printed with the first round's time ("first"), when nothing was remembered yet. Both server ports are set explicitly (the backup's to a free port
nobody listens on) and the client is given the main's address only.

Last, ``main_server.py --add`` of ``--add-files`` small files (64-1024 bytes)
in one command, timed from start to the "listening" line (every file added
and durable), before and after.

Targets: full listing of 100,000 files <= 0.3 s and of 1,000,000 <= 3 s;
search <= 0.1 s at 1,000,000; adding 100,000 files < 60 s. Medians are
judged; the load average is printed beside each figure. Everything lives in
a temporary folder under ``--folder`` (default /dev/shm: tmpfs, so fsync
costs nothing and the disk is not what is measured), removed at the end.
Exit 1 only if a result is wrong.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

# common first: importing it puts the project root first on sys.path and takes bench/ off it,
# so "import catalog" imports the project's catalog.py, not this file.
from common import ROOT, BenchError, exit_status, install_interrupts, start_server, stop_process, temp_folder

from database import ServerStore
from minitorrent.common.launcher import free_port, write_config

CHUNK_SIZE = 1024 * 1024
RARE_TAG = "Quarterly Réport"  # in every 100th name
SEARCHES = {"all": "", "~1%": "quarterly réport", "~8%": "report", "none": "zz no such name qq"}
WORDS = ("holiday", "Café", "naïve", "Résumé", "Ñandú", "Smörgåsbord", "Zürich", "日本語", "Москва",
         "photo", "backup", "draft", "final", "año", "crème brûlée", "🎵 mix", "a|b", "x:y", "notes",
         "Ελληνικά", "video", "project", "report", "São Paulo")
EXTENSIONS = ("pdf", "jpg", "mkv", "tar.gz", "docx", "flac", "iso", "txt")
BUILD_BATCH = 10_000  # rows per insert batch while building
BEFORE_COMMIT = "fb1c0ba"  # the last commit with offset paging
LIST_TARGETS_S = {100_000: 0.3, 1_000_000: 3.0}
SEARCH_TARGET_S = 0.1  # at 1,000,000 files
ADD_TARGET_S = 60.0  # for 100,000 files

# Run by a fresh Python with the tree under test first on its path: times list_files per search.
LISTER = """
import json, sys, time
tree, host, port, searches = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
sys.path.insert(0, tree)
from minitorrent.net.remote import ServerClient
try:  # a tree with TLS on every connection (the code before it had none)
    from minitorrent.wire.tls import ClientTls
    secure = {"secure": ClientTls()}
except ImportError:
    secure = {}
client = ServerClient([(host, port)], io_timeout_s=600, pool_size=2, retry_deadline_s=10, **secure)
client.status()  # open the pooled connection first (cheaply): the timings are of listing, not connecting
result = {}
for search in searches:
    started, cpu = time.perf_counter(), time.process_time()
    count = len(client.list_files(search))
    result[search] = [time.perf_counter() - started, count, time.process_time() - cpu]
client.close()
print(json.dumps(result))
"""


def fold(text: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", text).casefold())


def load() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


# Building -------------------------------------------------------------------------------


def synthetic_rows(files: int, rng: random.Random):
    """Rows of the version 1 files table, in batches."""
    batch = []
    for index in range(files):
        tag = f" {RARE_TAG}" if index % 100 == 0 else ""
        name = f"{' '.join(rng.sample(WORDS, 2))}{tag} {index:07d}.{rng.choice(EXTENSIONS)}"
        size = int(math.exp(rng.uniform(math.log(1024), math.log(1 << 30))))
        digests = rng.randbytes(32 * -(-size // CHUNK_SIZE))
        batch.append((name, fold(name), size, CHUNK_SIZE, rng.randbytes(32).hex(), 1764500000.0 + index, digests))
        if len(batch) == BUILD_BATCH:
            yield batch
            batch = []
    yield batch


def build_version_one(path: Path, files: int) -> dict[str, int]:
    """Write a catalog of schema version 1 at ``path``; how many names each search must find."""
    path.parent.mkdir(parents=True)
    expected = dict.fromkeys(SEARCHES.values(), 0)
    with sqlite3.connect(path, isolation_level=None) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.executescript(ServerStore.MIGRATIONS[0] + "PRAGMA user_version = 1;")
        for batch in synthetic_rows(files, random.Random(20261125)):
            connection.execute("BEGIN")
            connection.executemany("INSERT INTO files (name, name_folded, size, chunk_size, sha256, added_at,"
                                   " chunk_digests) VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
            connection.execute("COMMIT")
            for text in expected:
                expected[text] += sum(fold(text) in row[1] for row in batch)
    connection.close()
    return expected


def copy_catalog(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True)
    shutil.copyfile(source, target)  # the WAL was checkpointed when the builder closed


def migrate(tree: Path, catalog: Path) -> float:
    """Open ``catalog`` once with ``tree``'s code (which migrates it); seconds taken."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r});"
                    f"from database import ServerStore; ServerStore({str(catalog)!r}).close()"], check=True)
    return time.perf_counter() - started


def checkout(commit: str, folder: Path) -> Path:
    """The project as of ``commit`` (``git archive``), unpacked in ``folder``."""
    folder.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


# Serving and listing -----------------------------------------------------------------------


def server_config(folder: Path) -> Path:
    """A main server on a free port and no backup (port 0): nothing else is dialled (5002 may be another program's)."""
    return write_config(folder / "config.yaml", {
        "server": {"main": {"host": "127.0.0.1", "port": free_port(), "data_dir": "server"},
                   "backup": {"port": 0}},
        "logging": {"level": "WARNING", "log_to_file": False},
    })


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_listings(tree: Path, server) -> dict[str, list]:
    """One round: per search, [seconds, entries, client CPU-s, server CPU-s], by ``tree``'s client.

    One client process per search, so the server's CPU time can be read around each.
    """
    result = {}
    for text in SEARCHES.values():
        before = cpu_seconds(server.process.pid)
        run = subprocess.run([sys.executable, "-c", LISTER, str(tree), *map(str, server.address),
                              json.dumps([text])], capture_output=True, text=True)
        if run.returncode:
            raise BenchError(f"lister failed: {run.stderr.strip()[-500:]}")
        result[text] = json.loads(run.stdout)[text] + [cpu_seconds(server.process.pid) - before]
    return result


class Results:
    """Times per (code, search) over the rounds, and the verdicts."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str], list[float]] = {}
        self.cpu: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (client, server) CPU-s
        self.loads: list[str] = []
        self.misses = 0

    def record(self, code: str, timings: dict, expected: dict[str, int]) -> None:
        for label, text in SEARCHES.items():
            seconds, count, client_cpu, server_cpu = timings[text]
            if count != expected[text]:
                raise BenchError(f"{code}: {label} search gave {count} entries, expected {expected[text]}")
            self.times.setdefault((code, label), []).append(seconds)
            self.cpu.setdefault((code, label), []).append((client_cpu, server_cpu))
        self.loads.append(load())

    def median(self, code: str, label: str) -> float | None:
        times = self.times.get((code, label))
        return statistics.median(times) if times else None

    def median_cpu(self, code: str, label: str) -> str:
        """Median client and server CPU time: what load on a shared machine changes least."""
        cpu = self.cpu.get((code, label))
        if not cpu:
            return ""
        return "cpu %.0f+%.0f ms" % tuple(statistics.median(c[i] for c in cpu) * 1000 for i in (0, 1))

    def judge(self, seconds: float, target: float | None) -> str:
        if target is None:
            return ""
        self.misses += seconds > target
        return f"target {target * 1000:.0f} ms {'PASS' if seconds <= target else 'MISS'}"


def bench_size(folder: Path, files: int, args: argparse.Namespace, before_tree: Path | None,
               results: Results) -> None:
    print(f"\n== {files:,} files ==", flush=True)
    started = time.perf_counter()
    original = folder / "before" / "server" / "catalog.db"
    expected = build_version_one(original, files)
    print(f"built a version 1 catalog in {time.perf_counter() - started:.1f} s "
          f"({original.stat().st_size / 1e6:.0f} MB); expected {expected}; {load()}", flush=True)
    copy_catalog(original, folder / "after" / "server" / "catalog.db")
    seconds = migrate(ROOT, folder / "after" / "server" / "catalog.db")
    print(f"migrated the copy to schema {len(ServerStore.MIGRATIONS)} in {seconds:.1f} s; {load()}", flush=True)
    servers = {"after": (ROOT, start_server(server_config(folder / "after")))}
    try:  # from here on, a failure (the before server not starting too) stops what was started
        if before_tree is not None and files <= args.before_max_files:
            # Migrated before it starts, as the after copy was: a server's start has a deadline
            # (a million files take a minute to migrate).
            seconds = migrate(before_tree, original)
            print(f"migrated the original with the before code in {seconds:.1f} s; {load()}", flush=True)
            servers["before"] = (before_tree, start_server(server_config(folder / "before")))
        for round_ in range(args.rounds):
            order = sorted(servers, reverse=bool(round_ % 2))  # alternate which code goes first
            for code in order:
                tree, server = servers[code]
                results.record(code, time_listings(tree, server), expected)
    finally:
        for _, server in servers.values():
            stop_process(server.process)
    report_size(files, servers, results, args.rounds)


def report_size(files: int, servers: dict, results: Results, rounds: int) -> None:
    print(f"medians of {rounds} listings each; loads seen: {', '.join(sorted(set(results.loads)))}")
    for label in SEARCHES:
        cells = []
        for code in ("before", "after"):
            seconds = results.median(code, label) if code in servers else None
            first = results.times[(code, label)][0] * 1000 if seconds is not None else 0.0
            cells.append(f"{code} {seconds * 1000:9.1f} ms ({results.median_cpu(code, label):>19}; first {first:.1f})"
                         if seconds is not None else f"{code} {'-':>48}")
        after = results.median("after", label)
        target = LIST_TARGETS_S.get(files) if label == "all" else (SEARCH_TARGET_S if files >= 1_000_000
                                                                   and label in ("~1%", "none") else None)
        print(f"  {label:5} {'  '.join(cells)}  {results.judge(after, target)}", flush=True)
    results.loads.clear()
    results.times.clear()
    results.cpu.clear()


# Adding ---------------------------------------------------------------------------------------


def write_small_files(folder: Path, count: int) -> list[str]:
    """``count`` files of 64-1024 random bytes with short names (100,000 of them must fit in argv)."""
    folder.mkdir(parents=True)
    rng = random.Random(7)
    names = [f"{i:05d}" for i in range(count)]
    for name in names:
        (folder / name).write_bytes(rng.randbytes(rng.randint(64, 1024)))
    return names


def time_add(tree: Path, folder: Path, sources: Path, names: list[str]) -> tuple[float, int]:
    """``main_server.py --add`` of every name (run in ``sources``): seconds until it listens, files added."""
    config = server_config(folder)
    started = time.perf_counter()
    adding = subprocess.Popen([sys.executable, str(tree / "main_server.py"), "--config", str(config),
                               "--headless", "--add", *names], cwd=sources, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, encoding="utf-8")
    added, seconds, cpu = 0, None, 0.0
    try:
        for line in adding.stdout:
            added += line.startswith("added: ")
            if "listening on" in line:
                seconds, cpu = time.perf_counter() - started, cpu_seconds(adding.pid)
                adding.send_signal(signal.SIGTERM)
    finally:
        stop_process(adding)
    if seconds is None:
        raise BenchError(f"{tree}/main_server.py --add stopped before it listened")
    return seconds, added, cpu


def bench_add(folder: Path, count: int, before_tree: Path | None, results: Results) -> None:
    print(f"\n== main_server.py --add of {count:,} small files ==", flush=True)
    names = write_small_files(folder / "src", count)
    for code, tree in (("before", before_tree), ("after", ROOT)):
        if tree is None:
            continue
        seconds, added, cpu = time_add(tree, folder / code, folder / "src", names)
        if added != count:
            raise BenchError(f"{code}: {added} files added, expected {count}")
        target = ADD_TARGET_S if count >= 100_000 and code == "after" else None
        print(f"  {code:6} {seconds:7.1f} s ({seconds / count * 1e6:.0f} us a file; CPU {cpu:.1f} s, "
              f"{cpu / count * 1e6:.0f} us a file)  {load()}  {results.judge(seconds, target)}", flush=True)
        shutil.rmtree(folder / code)


def bench(args: argparse.Namespace) -> int:
    parent = Path(args.folder)
    with temp_folder("minitorrent-bench-catalog-", parent) as folder:
        print(f"working folder {folder} ({'tmpfs' if str(folder).startswith('/dev/shm') else 'disk'}); {load()}")
        before_tree = checkout(args.before, folder / "before-code") if args.before else None
        results = Results()
        for files in args.files:
            bench_size(folder / f"catalog-{files}", files, args, before_tree, results)
            shutil.rmtree(folder / f"catalog-{files}")
        if args.add_files:
            bench_add(folder / "add", args.add_files, before_tree, results)
    print(f"\n{results.misses} target(s) missed" if results.misses else "\nall targets met")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="catalog sizes (default 10000 100000 1000000)")
    parser.add_argument("--add-files", type=int, default=100_000, help="files for the --add run (0: skip)")
    parser.add_argument("--before", default=BEFORE_COMMIT, help="commit to compare with ('': none)")
    parser.add_argument("--before-max-files", type=int, default=100_000,
                        help="largest catalog the before code lists (its paging is quadratic)")
    parser.add_argument("--rounds", type=int, default=3, help="listings per code and search (default 3)")
    parser.add_argument("--folder", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                        help="where the temporary folder goes (default /dev/shm)")
    args = parser.parse_args(argv)
    if min(args.files) < 100 or args.rounds < 1 or not 0 <= args.add_files <= 100_000:
        parser.error("--files must be at least 100, --rounds at least 1, --add-files 0..100000")
    install_interrupts()  # SIGTERM unwinds like Ctrl-C: stop the servers, remove the folder
    return exit_status(lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
