"""Benchmark: a hundred clients at once against one server with default settings.

    python bench/crowd.py [--clients 100] [--files 3] [--size 1M] [--rounds 3]

What runs, all on 127.0.0.1, in one temporary folder removed at the end (also
on Ctrl-C, SIGTERM or an error):

* The real ``main_server.py --headless --add FILE...`` process with the
  default settings (``max_connections: 10``, ``idle_timeout: 30``, ...); only
  its port is set (a free one) and the backup's port is 0 (no backup), so no
  other program on 5001/5002 can take part.
* Per round, two crowds launched at once, order alternating between rounds:
  ``--clients`` bare ``python client.py --help`` processes (the floor: the
  client's own start-up), and ``--clients`` ``python client.py get F1 F2 F3
  --output DIR`` processes, each with its own config, folders and default
  settings (seeding on, as ``get`` does).

The time of a crowd is the wall clock from launching the first process to the
last one's exit. A client failing (exit status not 0) is counted; every
downloaded file is hashed again and compared with its source (a mismatch
exits 1). The load average is printed beside each figure.

Targets (issue 10): no failed client; the get crowd's median time within 2x
the --help crowd's. A benchmark, not a test: PASS or MISS per target, exit 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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

from minitorrent.common.launcher import free_port, write_config

CLIENT = str(ROOT / "client.py")
CROWD_TIMEOUT_S = 600.0  # a crowd that takes longer than this is broken, not slow


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="clients launched at once (default 100)")
    parser.add_argument("--files", type=int, default=3, help="files each client downloads (default 3)")
    parser.add_argument("--size", type=parse_size, default=parse_size("1M"), help="size of each file (default 1M)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both crowds, interleaved (default 3)")
    return parser.parse_args()


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run_crowd(commands: list[list[str]]) -> tuple[float, list[subprocess.CompletedProcess]]:
    """Launch every command at once; the wall time until the last exits, and how each ended."""
    started = time.monotonic()
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    try:
        results = []
        for process, command in zip(processes, commands):
            out, err = process.communicate(timeout=max(1.0, CROWD_TIMEOUT_S - (time.monotonic() - started)))
            results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                stop_process(process)
    return time.monotonic() - started, results


def client_config(folder: Path, port: int) -> Path:
    """A client config with default settings but every port and folder explicit."""
    return write_config(folder / "config.yaml", {
        "server": {"main": {"host": "127.0.0.1", "port": port}, "backup": {"host": "127.0.0.1", "port": 0}},
        "client": {"download_dir": str(folder / "downloads"), "data_dir": str(folder / "data")},
        "logging": {"log_to_file": False, "level": "WARNING"},
    })


def get_crowd(root: Path, port: int, clients: int, names: list[str]) -> tuple[list[list[str]], list[Path]]:
    """The ``client.py get`` commands of one crowd (fresh folders) and the folders they download into."""
    commands, outputs = [], []
    for index in range(clients):
        folder = root / f"client-{index}"
        outputs.append(folder / "downloads")
        commands.append([sys.executable, CLIENT, "--config", str(client_config(folder, port)), "get", *names,
                         "--output", str(outputs[-1])])
    return commands, outputs


def check_downloads(outputs: list[Path], results: list[subprocess.CompletedProcess],
                    digests: dict[str, str]) -> tuple[int, str]:
    """How many clients failed, and the first one's stderr; a wrong SHA-256 is a ``BenchError``."""
    failed = [result for result in results if result.returncode != 0]
    for output, result in zip(outputs, results):
        if result.returncode != 0:
            continue
        for name, digest in digests.items():
            if sha256_of(output / name) != digest:
                raise BenchError(f"{output / name}: SHA-256 differs from the source")
    return len(failed), (failed[0].stderr.strip().splitlines() or [""])[-1] if failed else ""


def run(args: argparse.Namespace) -> int:
    with temp_folder("mt-crowd-") as root:
        digests = {f"crowd-{i}.bin": write_random_file(root / "src" / f"crowd-{i}.bin", args.size, seed=i)
                   for i in range(args.files)}
        port = free_port()
        server_config = write_config(root / "server" / "config.yaml", {
            "server": {"main": {"host": "127.0.0.1", "port": port, "data_dir": str(root / "server" / "data")},
                       "backup": {"host": "127.0.0.1", "port": 0}},
            "logging": {"log_to_file": False, "level": "WARNING"}})
        server = start_server(server_config, add=[root / "src" / name for name in digests])
        try:
            return measure(args, root, port, digests)
        finally:
            stop_process(server.process)


def measure(args: argparse.Namespace, root: Path, port: int, digests: dict[str, str]) -> int:
    helps, gets, failures = [], [], 0
    print(f"{args.clients} clients, {args.files} files of {args.size} B each, default settings, port {port}")
    for round_number in range(args.rounds):
        commands, outputs = get_crowd(root / f"round-{round_number}", port, args.clients, list(digests))
        crowds = ["help", "get"] if round_number % 2 == 0 else ["get", "help"]
        for crowd in crowds:
            if crowd == "help":
                elapsed, _ = run_crowd([[sys.executable, CLIENT, "--help"]] * args.clients)
                helps.append(elapsed)
                print(f"  round {round_number + 1}: {args.clients} x client.py --help: {elapsed:6.2f} s  ({load()})")
            else:
                elapsed, results = run_crowd(commands)
                failed, why = check_downloads(outputs, results, digests)
                failures += failed
                gets.append(elapsed)
                print(f"  round {round_number + 1}: {args.clients} x client.py get:    {elapsed:6.2f} s, "
                      f"{failed} failed  ({load()}){f'  first failure: {why}' if why else ''}")
    return summarize(helps, gets, failures, args.clients * args.rounds)


def summarize(helps: list[float], gets: list[float], failures: int, runs: int) -> int:
    ratio = statistics.median(gets) / statistics.median(helps)
    print("summary (medians):")
    report_line("client.py --help crowd", f"{statistics.median(helps):.2f} s", 26)
    report_line("client.py get crowd", f"{statistics.median(gets):.2f} s", 26)
    report_line("get / help", f"{ratio:.2f}x   target <= 2.0: {verdict(ratio <= 2.0)}", 26)
    report_line("failed clients", f"{failures} of {runs}   target 0: {verdict(failures == 0)}", 26)
    print(f"  ({load()})")
    return 0


def main() -> int:
    install_interrupts()
    return exit_status(lambda: run(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
