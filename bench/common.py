"""What the benchmarks in this folder share: one copy of each helper, so they cannot drift apart.

Each benchmark runs as ``python bench/X.py``: Python then puts ``bench/`` first
on ``sys.path`` and finds this module there. Importing it puts the project
root first on the path and takes ``bench/`` off it (see ``_project_first``),
so import it before any project module.

The benchmarks share their promises too (bench/README.md): temporary folders
and processes are cleaned up also on Ctrl-C or SIGTERM; they exit 0 with a
PASS or MISS per target, 1 only if something is broken, 130 if interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent


def _project_first() -> None:
    """Put the project root first on ``sys.path`` and drop ``bench/``.

    Run as ``python bench/catalog.py``, ``bench/`` would come first on the path
    and ``import catalog`` (done by the servers' own modules too) would import
    bench/catalog.py; the project's modules must win. This module is already
    imported by then, so dropping its folder does not lose it.
    """
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]


_project_first()

from minitorrent.common.launcher import ServerProcess  # noqa: E402  (needs the project root on the path)

BLOCK_BYTES = 1024 * 1024  # write and hash in 1 MiB blocks: never a whole file in memory
DEFAULT_SEED = 20261125  # the same bytes every run, unless a benchmark asks for others
STOP_TIMEOUT_S = 10.0  # a clean stop that takes longer than this is given up for SIGKILL
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class BenchError(Exception):
    """Something the benchmark relies on broke; the message says what (and the benchmark exits 1)."""


# Arguments ----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"256M"`` -> 268435456; ``"1G"``, ``"64KiB"``, ``"1000"`` (bytes) also work.

    Binary units, as file sizes are; an ``argparse`` type, so a bad value is
    reported as a usage error rather than a traceback.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M, 1G or a number of bytes)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return size


# Files --------------------------------------------------------------------------------


def write_random_file(path: Path, size: int, seed: int = DEFAULT_SEED) -> str:
    """Write ``size`` random bytes (from ``seed``) in 1 MiB blocks; return their SHA-256.

    The file is fsynced: else its writeback would compete with, and slow,
    whatever the benchmark measures first.
    """
    rng = random.Random(seed)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """The SHA-256 of a file, read in 1 MiB blocks into one reused buffer (to check a download)."""
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as source:
        while n := source.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


@contextlib.contextmanager
def temp_folder(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh temporary folder (in ``parent``, else the system's), removed when the block ends,
    however it ends (error, Ctrl-C, SIGTERM)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Interrupts ---------------------------------------------------------------------------


class Interrupts:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt``, except while a process is being started.

    SIGTERM unwinds like Ctrl-C, so the ``finally`` blocks stop processes and
    remove folders. ``launcher.ServerProcess`` waits for its process to listen
    inside its constructor; interrupted there, the process would be left
    running with nobody holding it. So an interrupt in ``deferred()`` is
    raised at its end.
    """

    def __init__(self) -> None:
        self._deferring = False
        self._pending = False
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            raise KeyboardInterrupt


_INTERRUPTS: Interrupts | None = None


def install_interrupts() -> None:
    """Make Ctrl-C and SIGTERM unwind the benchmark (call once, from ``main``: a program's choice, not a module's)."""
    global _INTERRUPTS
    _INTERRUPTS = Interrupts()


def starting() -> contextlib.AbstractContextManager:
    """Defer Ctrl-C and SIGTERM while a process starts (when run as a program: see ``install_interrupts``)."""
    return _INTERRUPTS.deferred() if _INTERRUPTS else contextlib.nullcontext()


def exit_status(action: Callable[[], int | None]) -> int:
    """Run a benchmark and turn how it ended into the exit status bench/README.md promises.

    ``action``'s own status (None: 0); 1 with ``error: ...`` on stderr if it
    raised ``BenchError``; 130 with ``interrupted`` on Ctrl-C or SIGTERM.
    """
    try:
        status = action()
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0 if status is None else status


# Processes ----------------------------------------------------------------------------


def bytecode_cached_env(pycache: Path) -> dict[str, str]:
    """This environment, with Python's bytecode cached in ``pycache``: a program starts as an installed one does.

    Where PYTHONDONTWRITEBYTECODE is set (as in this project's sandboxes),
    every start would compile the program's modules again (about 0.1 CPU-s
    for the client) that a user's second run never pays.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def start_server(config: Path, add: Sequence[Path] = (), script: str = "main_server.py") -> ServerProcess:
    """Start a real headless server (``launcher.ServerProcess``) and wait until it listens.

    A server that does not start is a ``BenchError`` (exit 1, its stderr in the
    message). Ctrl-C or SIGTERM meanwhile is held until the process is known,
    then stops it and is raised: no server is left running with nobody holding it.
    """
    server: ServerProcess | None = None
    try:
        with starting():
            server = ServerProcess(config, add=add, script=script)
        return server
    except RuntimeError as error:
        raise BenchError(f"{script}: {error}") from None
    except KeyboardInterrupt:
        if server is not None:
            stop_process(server.process)
        raise


def wait_listening(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll until something accepts on 127.0.0.1:``port``; ``BenchError`` if ``process`` dies first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = process.stderr.read().decode(errors="replace")[-300:] if process.stderr else ""
            raise BenchError(f"{process.args[:4]} exited {process.returncode} before it listened {said}".strip())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)  # a poll with a deadline: the process binds when it is ready
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait, SIGKILL if it does not stop in time; always reaped.

    A clean stop first: a server closes its database and Xvfb removes its lock
    files; SIGKILL would leave them behind.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


# Reporting ----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    """A target's outcome as the benchmarks print it."""
    return "PASS" if ok else "MISS"


def report_line(label: str, value: str, width: int) -> None:
    """One figure of a summary: the label padded to ``width`` so a report's values line up."""
    print(f"  {label:{width}} {value}", flush=True)
