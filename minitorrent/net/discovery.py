"""Finding servers without typing an address: DNS-SD over multicast DNS (``_minitorrent._tcp``).

A server announces one service whose TXT record carries what a client needs
to choose: the server's identity, its role and its epoch. A client browses for
a bounded time and gets back a list of ``FoundServer`` values.

Nothing here is trusted. Anyone on the LAN can announce anything, so every
field of a TXT record is bounded and parsed strictly, a record that does not
parse is dropped, and what is found is only a *hint* of where to connect: the
client still greets the server and checks its identity and epoch as for any
configured server. Configured addresses always win and keep working where
multicast does not reach (other subnets, VLANs).

The zeroconf library (LGPL-2.1-or-later, used unmodified as a library) speaks
mDNS; it is imported only when something announces or listens.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for type hints: the import costs 0.1 s and is not needed when discovery is off
    from zeroconf import Zeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_minitorrent._tcp.local."
MAX_TXT_VALUE_BYTES = 128  # an identity in its long form is 63 characters; nothing longer is ours
MAX_EPOCH = 2**63 - 1  # the wire limit (protocol.MAX_EPOCH); larger is a lie
MAX_FOUND = 64  # a LAN flooding us with announcements does not grow our memory
ROLES = ("active", "standby")
LISTEN_S = 3.0  # how long a client listens by default: answers arrive within about a second on a quiet LAN
INFO_TIMEOUT_MS = 1500  # how long to wait for one service's details once it is seen


@dataclass(frozen=True)
class FoundServer:
    """A server seen on the LAN: where it says it is and what it says of itself (unverified)."""

    name: str
    host: str
    port: int
    identity: str
    role: str
    epoch: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def txt_record(identity: str, role: str, epoch: int) -> dict[str, str]:
    """The TXT properties a server announces."""
    return {"id": identity, "role": role, "epoch": str(epoch)}


def parse_found(name: str, addresses: list[str], port: int | None, properties: dict) -> FoundServer | None:
    """A ``FoundServer`` from a raw mDNS answer, or None if any part of it is out of bounds.

    ``properties`` maps bytes to bytes (or None) as zeroconf hands them over.
    """
    fields = {}
    for key in ("id", "role", "epoch"):
        raw = properties.get(key.encode())
        if not isinstance(raw, bytes) or not raw or len(raw) > MAX_TXT_VALUE_BYTES:
            return None
        try:
            fields[key] = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not fields["epoch"].isdigit() or int(fields["epoch"]) > MAX_EPOCH or fields["role"] not in ROLES:
        return None
    if not fields["id"].replace("-", "").isalnum() or port is None or not 0 < port <= 65535:
        return None
    host = next((a for a in addresses if _is_ipv4(a)), None)
    if host is None:
        return None
    return FoundServer(name.removesuffix("." + SERVICE_TYPE)[:MAX_TXT_VALUE_BYTES], host, port,
                       fields["id"], fields["role"], int(fields["epoch"]))


def _is_ipv4(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv4Address)
    except ValueError:
        return False


def _interfaces_for(host: str) -> list[str] | None:
    """The interfaces to speak mDNS on for a server bound to ``host`` (None: all of them)."""
    return None if host in ("0.0.0.0", "", "::") else [host]


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses for a server bound to every interface: the LAN ones,
    or loopback alone when there is no other (a machine with no network)."""
    import ifaddr  # zeroconf's own dependency

    found = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
             if isinstance(ip.ip, str) and _is_ipv4(ip.ip)]
    lan = [address for address in found if not ipaddress.ip_address(address).is_loopback]
    return lan or [address for address in found if ipaddress.ip_address(address).is_loopback]


def _open_zeroconf(interfaces: list[str] | None) -> Zeroconf:
    """mDNS sockets on ``interfaces`` (all IPv4 ones by default); ``OSError`` when they cannot be opened.

    zeroconf reports "no interface to listen on" as a RuntimeError and its own
    failures as ``zeroconf.Error``: both become the OSError that callers
    already expect from a machine without multicast.
    """
    from zeroconf import Error, InterfaceChoice, IPVersion, Zeroconf

    try:
        return Zeroconf(interfaces=interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only)
    except (RuntimeError, Error) as error:
        raise OSError(f"mDNS unavailable: {error}") from error


class Announcer:
    """A server's announcement on the LAN, kept up to date as its role and epoch change.

    Thread-safe; ``close`` withdraws the announcement (a goodbye packet).
    """

    def __init__(self, instance: str, host: str, port: int, identity: str) -> None:
        self._instance = instance
        self._host = host
        self._port = port
        self._identity = identity
        self._lock = threading.Lock()
        self._zeroconf: Zeroconf | None = None
        self._info = None
        self._closed = False

    def start(self, role: str, epoch: int) -> None:
        """Announce the service (blocks for the probe, about 1.5 s: call from a worker thread).

        Does nothing if ``close`` came first, so a server stopped while its
        announcement was starting is never announced.
        """
        with self._lock:
            if self._closed:
                return
            self._zeroconf = _open_zeroconf(_interfaces_for(self._host))
            self._info = self._service_info(role, epoch)
            self._zeroconf.register_service(self._info, allow_name_change=True)
        log.info("announcing %s on the LAN as %s", f"{self._host}:{self._port}", self._instance)

    def update(self, role: str, epoch: int) -> None:
        """Re-announce with a new role or epoch (no-op before ``start`` or after ``close``)."""
        with self._lock:
            if self._zeroconf is None:
                return
            self._info = self._service_info(role, epoch, name=self._info.name)
            self._zeroconf.update_service(self._info)

    def close(self) -> None:
        """Withdraw the announcement and close the mDNS sockets (idempotent)."""
        with self._lock:
            self._closed = True
            zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is not None:
            zeroconf.unregister_all_services()
            zeroconf.close()

    def _service_info(self, role: str, epoch: int, name: str | None = None):
        from zeroconf import ServiceInfo

        hosts = local_ipv4_addresses() if _interfaces_for(self._host) is None else [self._host]
        addresses = [socket.inet_aton(host) for host in hosts]
        return ServiceInfo(SERVICE_TYPE, name or f"{self._instance}.{SERVICE_TYPE}", port=self._port,
                           addresses=addresses, properties=txt_record(self._identity, role, epoch),
                           server=f"{socket.gethostname()}.local.")


def browse(duration_s: float, interfaces: list[str] | None = None) -> list[FoundServer]:
    """The servers announced on the LAN within ``duration_s`` seconds, highest epoch first.

    Blocks for ``duration_s``; malformed announcements are dropped; at most
    ``MAX_FOUND`` are kept.
    """
    from zeroconf import ServiceBrowser

    found: dict[str, FoundServer] = {}
    zeroconf = _open_zeroconf(interfaces)
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, _Collector(found))
        time.sleep(duration_s)  # listening for a fixed window is the point: answers come when they come
        browser.cancel()
    finally:
        zeroconf.close()
    return sorted(found.values(), key=lambda s: (-s.epoch, s.role != "active", s.address))


class _Collector:
    """ServiceBrowser listener: resolves each service seen and keeps the well-formed ones."""

    def __init__(self, found: dict[str, FoundServer]) -> None:
        self._found = found
        self._lock = threading.Lock()  # zeroconf calls listeners from its own threads

    def add_service(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        self._resolve(zeroconf, service_type, name)

    def update_service(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        self._resolve(zeroconf, service_type, name)

    def remove_service(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        with self._lock:
            self._found.pop(name, None)

    def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = zeroconf.get_service_info(service_type, name, timeout=INFO_TIMEOUT_MS)
        if info is None:
            return
        server = parse_found(name, info.parsed_addresses(), info.port, info.properties)
        with self._lock:
            if server is None:
                log.debug("ignoring a malformed announcement %r", name)
            elif name in self._found or len(self._found) < MAX_FOUND:
                self._found[name] = server
