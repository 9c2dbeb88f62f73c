"""The client's engine: catalog, downloads, seeding and limits. It imports no tkinter; the window and the command line hold one."""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from config_loader import Config
from database import ClientStore
from error_handler import MiniTorrentError
from minitorrent.client.downloader import Downloader, DownloadResult
from minitorrent.client.folders import FolderDownload, FolderResult
from minitorrent.client.progress import Progress
from minitorrent.common.partfile import discard_recorded, finish_interrupted_installs
from minitorrent.net import remote
from minitorrent.net.remote import ServerClient, ServerSession
from minitorrent.net.throttle import TokenBucket
from minitorrent.wire import protocol
from minitorrent.wire.identity import load_or_create, parse_id
from minitorrent.wire.tls import IdentityRefused, Secure, client_tls, server_identity

if TYPE_CHECKING:  # for type hints only: imported when client.seeding is on (see _seeder)
    from minitorrent.client.seeding import Seeder

log = logging.getLogger(__name__)

DISCOVERY_TIMEOUT_S = 1.0  # a member that does not answer this fast is not asked for the member list


class ClientEngine:
    """The client's engine: one server connection pool, the state database, downloads.

    Methods may be called from any thread; downloads run in the caller's thread.
    """

    def __init__(self, config: Config, on_progress: Callable[[Progress], None] | None = None) -> None:
        self.config = config
        transfer = config.transfer
        self.identity = load_or_create(config.client.data_dir)  # what the seeder presents, what `status` shows
        secure = client_tls(config, self.identity)
        self.server = ServerClient(known_servers(config, secure), io_timeout_s=transfer.io_timeout,
                                   pool_size=transfer.pool_size, retry_deadline_s=config.client.retry_deadline,
                                   secure=secure)
        self.store = ClientStore(config.client.data_dir / "client.db")
        finish_interrupted_installs(self.store)  # else a download killed while installing is listed unfinished for good
        self.download_limit = TokenBucket(transfer.download_limit)
        self.seeder = _seeder(config, self.server, self.store) if config.client.seeding else None
        self._seeding = False
        self.seed_address: tuple[str, int] | None = None  # where peers reach our seeder, once started
        self.on_progress = on_progress  # may be replaced before downloads start (a window sets its own)
        self.downloader = Downloader(self.server, self.store, pipeline_depth=transfer.pipeline_depth,
                                     on_progress=self._progress, seeder=self.seeder,
                                     download_limit=self.download_limit)

    def _progress(self, progress: Progress) -> None:
        if self.on_progress:
            self.on_progress(progress)

    def start_seeding(self) -> tuple[str, int] | None:
        """Serve what this client holds to peers (if ``client.seeding``); the seed address."""
        if self.seeder is None or self._seeding:
            return self.seeder.server.address if self._seeding else None
        self._seeding = True
        self.seed_address = self.seeder.start()
        return self.seed_address

    def set_limits(self, upload_bps: int, download_bps: int) -> None:
        """Change the seeder's upload and the downloads' rate limits (bytes/s, 0: unlimited) now."""
        self.download_limit.set_rate(download_bps)
        if self.seeder:
            self.seeder.upload_limit.set_rate(upload_bps)

    def interrupt(self) -> None:
        """Make every call that waits on a server give up now (before ``close``, so download threads end)."""
        self.server.stop.set()

    def close(self) -> None:
        """Stop seeding, close connections and the state database (waits on no unreachable server)."""
        self.interrupt()
        if self._seeding:
            self.seeder.stop()
        self.server.close()
        self.store.close()

    def use_server(self, host: str, port: int, identity: str) -> None:
        """Talk to ``host:port`` too (a server found on the LAN that the user chose), pinning ``identity``.

        The identity is pinned as trust on first use pins a configured
        server's (the same store), so the server must present it from the very
        first connection. Raises ``IdentityRefused`` if ``identity`` is not
        a well-formed identity or another is pinned for that address already. Blocks only on a small file write.
        """
        try:
            identity = parse_id(identity)  # the form the pin store compares, and a check of a stranger's text
        except ValueError as error:
            raise IdentityRefused(f"{host}:{port} announced {identity!r}, which is not an identity: {error}") from None
        if self.server.secure is not None:
            self.server.secure.pins.check(f"{host}:{port}", identity)
        self.server.add_server(host, port)

    def pair(self, code: str) -> str:
        """Pair with the active server using the operator's one-time code; the server's identity.

        Raises ``MiniTorrentError`` with a one-line reason (a wrong or spent
        code, no TLS, no server).
        """
        # imported here, not at the top: SPAKE2's tables cost every command's start-up ~35 ms, and only pairing needs them
        from minitorrent.wire.pairing import normalize_code
        try:
            code = normalize_code(code)
        except ValueError as error:
            raise MiniTorrentError(str(error)) from None
        return self.server.call(lambda session: _pair_on(session, code, self.identity.id))

    def web_token(self) -> str:
        """This client's token for the web face of a ``server.access: paired`` server (a secret).

        Asked over the TLS session on which this client proved its identity;
        ``MiniTorrentError`` (NOT_PAIRED) if the server does not accept it.
        """
        return self.server.call(lambda session: session.call(protocol.GetWebToken(), protocol.WebToken).message.token)

    def list_files(self, search: str = "") -> list[dict]:
        """Catalog entries matching ``search``."""
        return self.server.list_files(search)

    def status(self) -> dict:
        """The active server's status snapshot, with its address, role and epoch."""
        return self.server.status()

    def probe_status(self) -> dict:
        """One try, no retries: the active server's status with its address (a window's indicator).

        Raises ``ConnectionFailed`` when no server answers now (``NotActive``
        when they answer but none is active), ``MiniTorrentError`` otherwise.
        """
        return self.server.status(once=True)

    def seeding_status(self) -> dict | None:
        """What the seeder does now (any thread); None when ``client.seeding`` is off.

        Keys: running, address, files (whole files held, as catalog entries),
        partial (files held in part), bytes_sent, connections_total,
        active_connections, upload_bps, upload_limit_bps, download_limit_bps.
        """
        if self.seeder is None:
            return None
        files, _ = self.seeder.source.list_files()
        holdings = self.seeder.source.holdings()
        metrics = self.seeder.metrics.snapshot(top_files=0)
        return {
            "running": self.seed_address is not None,
            "address": "{}:{}".format(*self.seed_address) if self.seed_address else "",
            "files": files,
            "partial": sum(1 for bitmap in holdings.values() if bitmap is not None),
            "bytes_sent": metrics["bytes_sent"],
            "connections_total": metrics["connections_total"],
            "active_connections": metrics["active_connections"],
            "upload_bps": metrics["upload_bps"],
            "upload_limit_bps": self.seeder.upload_limit.rate_bps,
            "download_limit_bps": self.download_limit.rate_bps,
        }

    def unfinished_downloads(self) -> list[tuple[str, Path, int, int]]:
        """Downloads an earlier run left unfinished: (name, folder, size, verified bytes), oldest first."""
        unfinished = []
        for state in self.store.in_progress():
            verified = sum(state.manifest.chunk_span(index)[1] for index in state.verified)
            unfinished.append((state.name, Path(state.dest_path).parent, state.manifest.size, verified))
        return unfinished

    def download(self, name: str, output_dir: Path | None = None,
                 cancel: threading.Event | None = None) -> DownloadResult:
        """Download one file (see ``Downloader.download``); several threads may each run one."""
        return self.downloader.download(name, output_dir or self.config.client.download_dir, cancel)

    def download_folder(self, folder: str, output_dir: Path | None = None,
                        cancel: threading.Event | None = None) -> FolderResult:
        """Download every file under ``folder`` (``photos/``), structure kept (see client/folders.py)."""
        download = FolderDownload(self.downloader, folder, Path(output_dir or self.config.client.download_dir),
                                  cancel or threading.Event(), self._progress)
        return download.run()

    def discard_partial(self, name: str, output_dir: Path | None = None) -> None:
        """Forget a stopped download: its part file (if ours) and its verified chunks (a cancel, not a pause)."""
        discard_recorded(self.store, Path(output_dir or self.config.client.download_dir) / name)


def _seeder(config: Config, server: ServerClient, store: ClientStore) -> Seeder:
    """The seeder, its module imported only when seeding is on: it brings the request server (serving.py)."""
    from minitorrent.client.seeding import Seeder
    return Seeder(config, server, store)


def _pair_on(session: ServerSession, code: str, client_id: str) -> str:
    """The client's side of pairing (wire/pairing.py) on one session; the server's identity."""
    from minitorrent.wire.pairing import ClientPairing, PairingFailed  # only pairing needs SPAKE2 (see pair)
    server_id = server_identity(session.connection.sock)
    if not server_id:
        raise MiniTorrentError("pairing needs TLS: set transfer.encrypt: true")
    side = ClientPairing(code, server_id, client_id)
    reply = session.call(protocol.PairStart(side.start()), protocol.PairReply).message
    try:
        confirmation = side.finish(reply.message, reply.confirm)
    except PairingFailed as error:
        session.reusable = False  # the server still waits for our confirmation
        raise MiniTorrentError(f"pairing failed: {error}; ask the server's operator for a new code") from None
    session.call(protocol.PairConfirm(confirmation), protocol.Ok)
    return server_id


def server_addresses(config: Config) -> list[tuple[str, int]]:
    """The servers a client may talk to: the main, then the backup (port 0: not configured); in etcd mode, every member."""
    if config.cluster.mode == "etcd":
        return [(member.host, member.port) for member in config.cluster.servers]
    servers = (config.server.main, config.server.backup)
    return [(server.host, server.port) for server in servers if server.port != 0]


def known_servers(config: Config, secure: Secure | None = None) -> list[tuple[str, int]]:
    """``server_addresses``; in etcd mode also every member that the first answering member lists.

    So a client configured with one member still finds the others (and
    through them the leader) after that member dies.
    """
    configured = server_addresses(config)
    if config.cluster.mode != "etcd":
        return configured
    for address in configured:
        status = remote.status_of(address, DISCOVERY_TIMEOUT_S, secure)
        if status and status.get("cluster", {}).get("members"):
            listed = [_address(member["address"]) for member in status["cluster"]["members"]]
            return configured + [a for a in listed if a is not None and a not in configured]
    return configured


def _address(text: str) -> tuple[str, int] | None:
    host, _, port = str(text).rpartition(":")
    return (host, int(port)) if host and port.isdigit() and 0 < int(port) < 65536 else None
