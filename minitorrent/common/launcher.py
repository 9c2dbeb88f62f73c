"""Starting the suite's programs as real processes: for the demo, the benchmarks and the tests.

A headless server prints ``... listening on HOST:PORT ...`` on stdout once it
serves; ``ServerProcess`` waits for that line, so callers may ask for port 0
and still learn the real port.
"""
from __future__ import annotations

import copy
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the programs
START_TIMEOUT_S = 60.0  # a cold Python start on a loaded CI machine
STOP_TIMEOUT_S = 10.0
_LISTENING = re.compile(r"listening on ([\w.:-]+):(\d+)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for configs that must name each other's ports)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(path: Path, settings: dict) -> Path:
    """Write ``settings`` as a YAML config file at ``path`` (folders created).

    A server given no ``http_port`` gets -1 (no web face): a test, a bench or
    the demo never binds the default 5080/5081 by accident; and ``discovery``
    is false unless given, so none of them sends multicast by accident.
    """
    settings = copy.deepcopy(settings)
    settings.setdefault("discovery", False)
    servers = settings.setdefault("server", {})
    for role in ("main", "backup"):
        servers.setdefault(role, {}).setdefault("http_port", -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


class ServerProcess:
    """A real ``main_server.py --headless`` process.

    stdout is read by a thread (so the pipe never fills); stderr goes to a
    file beside the config, ``server.stderr``, for post-mortems.
    """

    def __init__(self, config_path: Path, add: Sequence[Path] = (), script: str = "main_server.py",
                 prefix: Sequence[str] = ()) -> None:
        command = [*prefix, sys.executable, str(ROOT / script), "--config", str(config_path), "--headless"]
        if add:
            command += ["--add", *map(str, add)]
        self.stderr_path = Path(config_path).parent / "server.stderr"
        self.stdout_lines: list[str] = []
        self._address_known = threading.Event()
        self.address: tuple[str, int] | None = None
        with open(self.stderr_path, "w", encoding="utf-8") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                            encoding="utf-8")
        threading.Thread(target=self._read_stdout, daemon=True).start()
        try:
            started = self._address_known.wait(START_TIMEOUT_S) and self.address is not None
        except BaseException:  # interrupted while it starts (Ctrl+C, a demo's SIGTERM): no orphan left running
            self.kill()
            raise
        if not started:
            self.kill()
            raise RuntimeError(f"server did not start: {self.stderr_path.read_text(encoding='utf-8').strip()}")

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and self.address is None:
                self.address = (match.group(1), int(match.group(2)))
                self._address_known.set()
        self._address_known.set()  # the process ended: stop waiting either way

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM: a clean stop) and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
