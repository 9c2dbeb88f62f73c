"""Shared test helpers: configs in tmp_path, in-process and subprocess servers, polling.

Timeouts are named here, once, and generous: CI machines are shared and slow.
"""
from __future__ import annotations

import atexit
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from config_loader import Config, load_config
from error_handler import ConnectionFailed
from minitorrent.common import launcher
from minitorrent.common.launcher import ServerProcess
from minitorrent.server.main import MainServer
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.protocol import ProtocolError
from minitorrent.wire.tls import ClientTls, ServerTls

ROOT = Path(__file__).resolve().parent.parent
SHORT_TIMEOUT = 10.0  # something that should happen at once
LONG_TIMEOUT = 60.0  # a large transfer or a process start on a loaded machine
POLL_INTERVAL = 0.02
# TLS as a test client speaks it to a server it does not need to pin (pinning has its own tests),
# proving one identity made for this run.
_IDENTITY_DIR = Path(tempfile.mkdtemp(prefix="minitorrent-test-identity-"))
atexit.register(shutil.rmtree, _IDENTITY_DIR, True)
TLS = ClientTls(identity=load_or_create(_IDENTITY_DIR))


def wait_until(condition: Callable[[], Any], timeout: float = SHORT_TIMEOUT, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


class MulticastOutsideANamespace(AssertionError):
    """A test process tried to open mDNS sockets on the host's network."""


@pytest.fixture(autouse=True)
def no_multicast_on_the_host(monkeypatch) -> Iterator[list[str]]:
    """Fail any test that would speak mDNS from the test process itself (the host's network).

    Discovery is tested only in subprocesses run inside a network namespace
    the test creates (tests/net/test_discovery.py, tests/gui/test_client_discovery.py);
    test configs pin ``discovery: false`` (launcher.write_config) so nothing
    else announces or listens. An attempt raises where it happens (so nothing
    is sent) and fails the test at its end (a worker thread may have caught
    the error); the list it yields holds the attempts.
    """
    from minitorrent.net import discovery

    attempts: list[str] = []

    def refuse(*_args, **_kwargs):
        attempts.append(threading.current_thread().name)
        raise MulticastOutsideANamespace("a test tried to send multicast DNS on the host's network")

    monkeypatch.setattr(discovery, "_open_zeroconf", refuse)
    yield attempts
    assert [] == attempts, "multicast DNS attempted from the test process (threads named here)"


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated with ``extra``, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def write_config(folder: Path, overrides: dict | None = None, name: str = "config.yaml") -> Path:
    """Write a config for tests (port 0, no log file, short timeouts) and return its path."""
    base = {
        "server": {"main": {"port": 0, "data_dir": "server"}, "backup": {"port": 0}},  # backup port 0: none
        "client": {"download_dir": "downloads", "data_dir": "client", "retry_deadline": 5.0},
        "transfer": {"idle_timeout": 10.0, "io_timeout": 5.0},
        "logging": {"log_to_file": False, "level": "INFO"},
    }
    return launcher.write_config(folder / name, deep_merge(base, overrides or {}))


def make_config(folder: Path, overrides: dict | None = None) -> Config:
    """A loaded test config whose files live under ``folder``."""
    return load_config(write_config(folder, overrides))


def client_config_for(folder: Path, address: tuple[str, int], overrides: dict | None = None) -> Path:
    """Write a client config pointing at a running server; returns its path."""
    host, port = address
    return write_config(folder, deep_merge({"server": {"main": {"host": host, "port": port}}}, overrides or {}))


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., MainServer]]:
    """Start in-process main servers on port 0; all are stopped after the test."""
    started: list[MainServer] = []

    def start(overrides: dict | None = None, folder: Path | None = None) -> MainServer:
        engine = MainServer(make_config(folder or tmp_path / "srv", overrides))
        engine.start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    """Write ``size`` pseudo-random bytes (reproducible from ``seed``) without holding them all."""
    import random

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            block = min(remaining, 1 << 20)
            out.write(rng.randbytes(block))
            remaining -= block
    return path


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    """Start real server subprocesses; any still running are killed after the test."""
    started: list[ServerProcess] = []

    def start(config_path: Path, add: list[Path] | None = None) -> ServerProcess:
        proc = ServerProcess(config_path, add)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def run_client(config_path: Path, *args: str, timeout: float = LONG_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``client.py`` as a user would; returns the completed process (text output)."""
    return subprocess.run([sys.executable, str(ROOT / "client.py"), "--config", str(config_path), *args],
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


class TlsServer:
    """Accepts connections with ``tls``; each connection gets ``serve(sock)`` after the handshake, then is closed."""

    def __init__(self, tls: ServerTls, serve=lambda sock: sock.recv(1), port: int = 0) -> None:
        self.tls = tls
        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", port))
        self.address = self.listener.getsockname()[:2]
        self.port = self.address[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        sock = self.tls.wrap(raw)
        try:
            self.tls.handshake(sock, SHORT_TIMEOUT)
            self.serve(sock)
        except (OSError, ConnectionFailed, ProtocolError):
            pass
        finally:
            sock.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() so the port is free at once
        except OSError:
            pass
        self.listener.close()


class TlsRelay(TlsServer):
    """A machine in the middle: terminates TLS with its own certificate and relays to ``target`` over TLS."""

    def __init__(self, tls: ServerTls, target: tuple[str, int]) -> None:
        self.target = target
        self.connections = 0
        super().__init__(tls, self._pipe)

    def _pipe(self, sock) -> None:
        upstream = ClientTls().handshake(socket.create_connection(self.target, timeout=SHORT_TIMEOUT), *self.target)
        self.connections += 1
        self._relay(sock, upstream)

    @staticmethod
    def _relay(a, b) -> None:
        """Copy both ways in this one thread: a TLS socket must not be read and written by two at once."""
        for sock in (a, b):
            sock.settimeout(0)
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], LONG_TIMEOUT)
                if not readable or not all(TlsRelay._move(s, b if s is a else a) for s in readable):
                    return
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    @staticmethod
    def _move(source, sink) -> bool:
        """Pass on everything ``source`` can decrypt now; False once it has closed."""
        while True:
            try:
                data = source.recv(65536)
            except ssl.SSLWantReadError:  # half a record, or one with no data (a session ticket)
                return True
            if not data:
                return False
            sink.settimeout(SHORT_TIMEOUT)
            sink.sendall(data)
            sink.settimeout(0)


class SlowProxy:
    """A TCP proxy that paces one direction at ``rate_bps``: a slow link on loopback.

    ``pace="to_client"`` slows what the server sends (a download);
    ``"to_server"`` slows what the client sends (the main pushing replication
    to the backup). It lets a test catch a transfer in the middle without
    slowing the code under test. ``target`` may be a callable, asked at each
    connection, for a target that moves to new ports when restarted; when it
    does not answer, the accepted connection is closed at once (like a refused
    one) and the proxy keeps accepting. Pacing uses short sleeps; it waits on
    nothing. ``hold_requests`` makes the connections open now swallow what
    their clients send from then on: requests lost on the way, while the
    connection itself stays up.
    """

    BLOCK = 16 * 1024

    def __init__(self, target: tuple[str, int] | Callable[[], tuple[str, int]], rate_bps: int,
                 pace: str = "to_client") -> None:
        import socket
        import threading

        self.target = target if callable(target) else (lambda: target)
        self.rate_bps = rate_bps
        self.pace = pace
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self._sockets: list = []
        self._holds: list[threading.Event] = []  # one a connection: set, what its client sends is swallowed
        self._on_held: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target(), timeout=SHORT_TIMEOUT)
                upstream.settimeout(None)
            except OSError:  # the target is down: this client is refused, later ones may not be
                client.close()
                continue
            hold = threading.Event()
            with self._lock:
                self._sockets += [client, upstream]
                self._holds.append(hold)
            to_server, to_client = (self.rate_bps, None) if self.pace == "to_server" else (None, self.rate_bps)
            threading.Thread(target=self._pump, args=(client, upstream, to_server, hold), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, to_client), daemon=True).start()

    def hold_requests(self, on_held: Callable[[], None]) -> None:
        """From now on, the connections open now drop what their clients send; ``on_held`` is called at each drop.

        Connections accepted later forward as before.
        """
        with self._lock:
            self._on_held = on_held
            for hold in self._holds:
                hold.set()

    def _pump(self, source, sink, rate_bps: int | None, hold: threading.Event | None = None) -> None:
        try:
            while True:
                data = source.recv(self.BLOCK)
                if not data:
                    break
                if hold is not None and hold.is_set():
                    self._on_held()
                    continue
                sink.sendall(data)
                if rate_bps:
                    time.sleep(len(data) / rate_bps)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting and cut every forwarded connection."""
        import socket

        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # close() alone leaves a pump's blocked recv() holding it open
            except OSError:
                pass
            sock.close()


# Private networks (multicast that never leaves the test) ------------------------------------------------

NETNS_TIMEOUT_S = 60  # one script run inside a namespace: servers start, mDNS probes (1.5 s each), browses


def run_in_private_network(script: str, timeout_s: float = NETNS_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``script`` with python in a new network namespace whose loopback carries multicast."""
    setup = ("ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo && "
             f"exec {sys.executable} -")
    return subprocess.run(["unshare", "-n", "bash", "-c", setup], input=script, text=True,
                          capture_output=True, cwd=ROOT, timeout=timeout_s, check=False)


def private_network_available() -> str | None:
    """None when a network namespace can be made here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, check=False)
    return None if probe.returncode == 0 else f"cannot create a network namespace: {probe.stderr.strip()}"


# Windows under a virtual screen ---------------------------------------------------------------------------

def _start_xvfb() -> subprocess.Popen | None:
    """Start Xvfb on a display number it picks itself and point DISPLAY at it; None if not installed."""
    import shutil

    if shutil.which("Xvfb") is None:
        return None
    read_end, write_end = os.pipe()
    process = subprocess.Popen(["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1600x1000x24",
                                "-nolisten", "tcp"], pass_fds=(write_end,),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write_end)
    with os.fdopen(read_end) as announced:  # Xvfb writes the number once it accepts clients
        number = announced.readline().strip()
    if not number or process.poll() is not None:
        process.kill()
        return None
    os.environ["DISPLAY"] = f":{number}"
    return process


@pytest.fixture(scope="session")
def display() -> Iterator[str]:
    """A display for real Tk windows: the existing one, or an Xvfb started here.

    Skips (with the reason) when neither exists, unless REQUIRE_GUI=1, as CI
    sets after installing Xvfb: then it fails.
    """
    xvfb = None if os.environ.get("DISPLAY") else _start_xvfb()
    if not os.environ.get("DISPLAY"):
        reason = "no display and no Xvfb: install xvfb to run the window tests"
        if os.environ.get("REQUIRE_GUI") == "1":
            pytest.fail(reason + " (REQUIRE_GUI=1)")
        pytest.skip(reason)
    yield os.environ["DISPLAY"]
    if xvfb is not None:
        xvfb.terminate()  # a clean exit removes its lock files; SIGKILL would leave them behind
        xvfb.wait(SHORT_TIMEOUT)


class TkThreadGuard:
    """Wraps a root's Tcl interpreter so any call from a thread other than the Tk thread is recorded.

    Widgets created after ``install`` talk to Tcl through the wrapper; a test
    asserts ``guard.violations == []`` at the end.
    """

    def __init__(self, root) -> None:
        import threading

        self.tk_thread = threading.get_ident()
        self.violations: list[str] = []
        self._real = root.tk
        guard = self

        class _Checked:
            def __getattr__(self, name):
                attribute = getattr(guard._real, name)
                if callable(attribute) and threading.get_ident() != guard.tk_thread:
                    guard.violations.append(f"{name} from {threading.current_thread().name}")
                return attribute

        root.tk = _Checked()


def pump_until(root, condition: Callable[[], Any], timeout: float = LONG_TIMEOUT, what: str = "condition") -> Any:
    """Run the Tk event loop until ``condition()`` is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        root.update()
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_INTERVAL)


# etcd ----------------------------------------------------------------------------------------------------------


class EtcdServer:
    """A real etcd (Debian's ``etcd-server``) on free 127.0.0.1 ports, its data under ``folder``.

    ``stop`` kills it (SIGKILL); ``start`` brings it back on the same ports and data.
    """

    def __init__(self, binary: str, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.client_port, self.peer_port = launcher.free_port(), launcher.free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start etcd and wait until it answers a read."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "etcd.log", "a", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [self.binary, "--name", "t", "--data-dir", str(self.folder / "data"),
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"t={peer}"], stdout=log, stderr=log)
        wait_until(self.answers, LONG_TIMEOUT, f"etcd to answer on {self.endpoint}")

    def answers(self) -> bool:
        """True if etcd answers a range request now."""
        import urllib.request

        request = urllib.request.Request(self.endpoint + "/v3/kv/range", data=b'{"key": "AA=="}', method="POST")
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL etcd and reap it."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(SHORT_TIMEOUT)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A running etcd for one test. Skips (saying why) when etcd is not installed, fails instead with REQUIRE_ETCD=1."""
    import shutil

    binary = shutil.which("etcd")
    if binary is None:
        reason = "etcd is not installed (Debian package etcd-server): the etcd cluster tests need it"
        if os.environ.get("REQUIRE_ETCD") == "1":
            pytest.fail(reason + " (REQUIRE_ETCD=1)")
        pytest.skip(reason)
    server = EtcdServer(binary, tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


def swap_for_a_fifo_when_opened(path: Path) -> Callable[..., int]:
    """``os.open``, which first swaps ``path`` for a FIFO: another process's move just before the file is opened to
    be hashed (opened by name after a check by name, it would then block for ever on the FIFO)."""
    real_open = os.open

    def opened(target, *args, **kwargs):
        if os.fspath(target) == os.fspath(path) and not os.path.lexists(f"{path}.swapped"):
            os.rename(path, f"{path}.swapped")
            os.mkfifo(path)
        return real_open(target, *args, **kwargs)
    return opened
