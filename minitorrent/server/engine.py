"""What the main server's and the backup's engines share.

Each owns a catalog in a data folder that only it may write (a folder lock),
a role and epoch (``NodeState``), its metrics, a tracker for seeding clients,
an upload limit, and the request server that puts them on the network. The
subclasses add what differs: the main replicates and sends heartbeats, the
backup receives replication and watches the heartbeats.
"""
from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from config_loader import BackupServerConfig, Config, MainServerConfig
from error_handler import CatalogError, ConfigError, MiniTorrentError
from metrics import Metrics
from minitorrent.common.fs import FolderLock
from minitorrent.net.discovery import Announcer
from minitorrent.net.serving import RequestServer
from minitorrent.net.throttle import TokenBucket
from minitorrent.net.tracker import PEER_TTL_INTERVALS, Tracker
from minitorrent.server.access import AccessList, AccessPolicy
from minitorrent.server.catalog import AddResult, Catalog
from minitorrent.server.roles import NodeState, Role
from minitorrent.server.tokens import WebTokens, token_key, web_token_handler
from minitorrent.wire import protocol
from minitorrent.wire.identity import Identity, cluster_key, load_or_create, parse_id
from minitorrent.wire.tls import ClientTls, Secure, ServerTls

log = logging.getLogger(__name__)


class ServerEngine:
    """A server's catalog, role, metrics and request server. See the subclasses."""

    def __init__(self, config: Config, name: str, settings: MainServerConfig | BackupServerConfig,
                 **server_options: Any) -> None:
        if config.server.access == "paired" and not config.transfer.encrypt:
            raise ConfigError("server.access: paired needs transfer.encrypt: true (clients prove who they are over TLS)")
        self.config = config
        self.name = name
        self.identity = load_or_create(settings.data_dir)  # first: a bad key file stops us before anything opens
        self.secret, self.secret_hint = peer_secret(config, name)
        self.catalog = Catalog(settings.data_dir, config.transfer.chunk_size)
        self.node = NodeState(self.catalog.db, name, Role.STANDBY)
        self.metrics = Metrics()
        self.metrics.set_downloads(self.catalog.download_counts())
        self.lock = FolderLock(settings.data_dir)
        self.stop_event = threading.Event()
        transfer = config.transfer
        self.access = AccessList(settings.data_dir)
        self.server = RequestServer(
            self.catalog,
            host=settings.host,
            port=settings.port,
            name=name,
            max_connections=transfer.max_connections,
            idle_timeout_s=transfer.idle_timeout,
            io_timeout_s=transfer.io_timeout,
            metrics=self.metrics,
            node=self.node,
            status_extra=self._status_extra,
            tracker=Tracker(ttl_s=PEER_TTL_INTERVALS * transfer.announce_interval),
            upload_limit=TokenBucket(transfer.upload_limit),
            epoch_secret=config.server.secret,
            tls=ServerTls(self.identity) if transfer.encrypt else None,
            access=AccessPolicy(self.access, config.server.access) if transfer.encrypt else None,
            secret_hint=self.secret_hint,
            peer_identity=pinned_peer(config, name),
            **server_options,
        )
        self.tokens = WebTokens(token_key(self.secret, self.access), self.access)  # the web face's, when paired
        self.server.client_handlers[protocol.GetWebToken] = web_token_handler(self.tokens)
        self.announcer: Announcer | None = None
        self._announcements: queue.Queue[tuple[str, int] | None] = queue.Queue()  # (role, epoch); None: stop

    def add_file(self, path: str | Path, on_progress: Callable[[int], None] | None = None) -> AddResult:
        """Import one file into the catalog (replicated while this server leads); ``CatalogError`` on bad input."""
        result = self.catalog.add_file(path, on_progress)
        self._changed()
        return result

    def add_files(self, paths: Iterable[str | Path]) -> Iterator[tuple[str | Path, AddResult | CatalogError]]:
        """Import many files in durable batches (``Catalog.add_files``): ``(path, outcome)`` each, in order."""
        for path, outcome in self.catalog.add_files(paths):
            yield path, outcome
            self._changed()  # cheap: it wakes the replicator, which compares catalog versions

    def remove_file(self, name: str) -> bool:
        """Stop sharing ``name``; True if it was shared."""
        removed = self.catalog.remove_file(name)
        self._changed()
        return removed

    def operator_token(self) -> str:
        """The token that opens this server's web face to its operator (``server.access: paired``). A secret."""
        return self.tokens.operator_token()

    def _changed(self) -> None:
        """The catalog changed (a subclass tells its replicas)."""

    def set_upload_limit(self, rate_bps: int) -> None:
        """Change the upload limit for clients' chunks now (bytes/s, 0: unlimited)."""
        self.server.upload_limit.set_rate(rate_bps)

    def _listen(self) -> tuple[str, int]:
        """Take the data folder and start serving; ``MiniTorrentError`` if either is taken."""
        if not self.lock.acquire():
            raise MiniTorrentError(f"another {self.name} server is running on {self.catalog.data_dir}")
        try:
            address = self.server.start()
        except MiniTorrentError:
            self.lock.release()
            raise
        if self.config.discovery is True:  # unset (None) or false: a server stays silent
            self._announce(*address)
        return address

    def _announce(self, host: str, port: int) -> None:
        """Announce this server on the LAN, and again whenever its role or epoch changes.

        All the mDNS I/O runs on the announcer's own thread: the probe takes
        about 1.5 s and each update half a second, and either may fail. A
        role change (made inside ``start`` by a main alone, or by the decision
        loop) only leaves its news for that thread, which announces the latest.
        """
        # The TLS identity, the one clients pin (node.server_id only names this node in replication).
        self.announcer = Announcer(f"{self.name}-{self.node.server_id}", host, port, self.identity.id)
        announcer, news = self.announcer, self._announcements

        def run() -> None:
            try:
                announcer.start(self.node.role.value, self.node.epoch)
            except OSError as error:
                log.warning("cannot announce on the LAN (discovery: true): %s", error)
                return
            while (latest := _latest(news)) is not None:
                try:
                    announcer.update(*latest)
                except Exception as error:  # zeroconf's own errors too: the next change announces again
                    log.warning("cannot announce the new role on the LAN: %s", error)

        self.node.listeners.append(lambda event: news.put((event.role.value, event.epoch)))
        threading.Thread(target=run, name=f"{self.name}-announce", daemon=True).start()

    def stop(self) -> None:
        """Stop serving and the background work, close the catalog, let go of the folder."""
        self.stop_event.set()
        if self.announcer is not None:
            self._announcements.put(None)  # the announcer's thread ends
            self.announcer.close()
        self.server.stop()
        self._stop_workers()
        self.catalog.close()
        self.access.close()
        self.lock.release()

    def _stop_workers(self) -> None:
        """Wait for a subclass's own threads (after ``stop_event`` is set)."""

    # Folders, removal, renaming (the main and cluster members; their _changed replicates) --------------------

    def add_folder(self, path: str | Path,
                   on_progress: Callable[[int], None] | None = None) -> tuple[list[AddResult], list[str]]:
        """Import a whole folder tree (see ``Catalog.add_folder``): (results, warnings)."""
        try:
            return self.catalog.add_folder(path, on_progress)
        finally:
            self._changed()

    def remove_path(self, path: str) -> int:
        """Stop sharing a file or a whole folder; how many files went (replicated by the subclass's ``_changed``)."""
        removed = self.catalog.remove_path(path)
        self._changed()
        return removed

    def rename_path(self, old: str, new: str) -> int:
        """Rename a file or a folder; how many names changed (replicated by the subclass's ``_changed``)."""
        renamed = self.catalog.rename_path(old, new)
        self._changed()
        return renamed

    def _status_extra(self) -> dict:
        """Entries a subclass adds to status replies."""
        return {}


def _latest(news: queue.Queue) -> tuple[str, int] | None:
    """Wait for news, then take all there is: the last (role, epoch), or None once told to stop."""
    latest = news.get()
    while latest is not None:
        try:
            latest = news.get_nowait()
        except queue.Empty:
            break
    return latest


def peer_secret(config: Config, name: str) -> tuple[str, str]:
    """``cluster_secret`` for a server that has a peer; ("", "") for a main with none (no key file to make)."""
    has_peer = name == "backup" or config.server.backup.port != 0 or config.cluster.mode == "etcd"
    return cluster_secret(config, name) if has_peer else ("", "")


def operator_token(config: Config, name: str, access: AccessList) -> str:
    """The operator's web token of server ``name``, as its engine computes it (for commands run beside it)."""
    return WebTokens(token_key(peer_secret(config, name)[0], access), access).operator_token()


def cluster_secret(config: Config, name: str) -> tuple[str, str]:
    """The secret the main and the backup prove to each other, and what to do when theirs differ.

    ``server.secret`` when set; otherwise the cluster key file beside the
    config (``server.cluster_key_file``), made by whichever server starts
    first, so a pair on one machine needs no setup. The hint says, from
    server ``name``'s side, which file to copy where. Raises ``ConfigError``.
    """
    if config.server.secret:
        return config.server.secret, "the main and the backup must set the same server.secret"
    path = config.server.cluster_key_file
    where = (f"copy {path} from this machine over the backup's cluster key file (its server.cluster_key_file, "
             f"by default cluster.key beside its config)" if name == "main"
             else f"copy the main's cluster key file over {path} on this machine")
    return cluster_key(path), (f"the main and the backup hold different cluster keys: {where}, or set "
                               f"server.secret to the same value on both")


def peer_tls(config: Config, identity: Identity | None = None) -> Secure | None:
    """How a server dials its peer: TLS; the peer is recognised by its proof of the cluster key over it,
    and also by its identity when ``server.backup.id`` is set. With our ``identity`` the link proves ours
    in turn (what the backup checks against ``server.main.id``). Raises ``ConfigError``."""
    if not config.transfer.encrypt:
        return None
    tls = ClientTls(identity=identity)
    return tls.expecting(_configured_id(config, "backup")) if config.server.backup.id else tls


def pinned_peer(config: Config, name: str) -> str:
    """The identity the server dialling server ``name`` must prove: ``server.main.id`` for the backup
    ("": any server that knows the cluster key). Raises ``ConfigError``."""
    return _configured_id(config, "main") if name == "backup" and config.server.main.id else ""


def _configured_id(config: Config, name: str) -> str:
    try:
        return parse_id(getattr(config.server, name).id)
    except ValueError as error:
        raise ConfigError(f"{config.source or 'config'}: server.{name}.id: {error}") from None
