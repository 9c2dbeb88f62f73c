"""A client's seeder: serving what it holds to other clients, and telling the tracker.

The seeder runs the same request-serving core as the servers, over a
``SeedSource`` that knows only what this client holds: files it downloaded
and verified, and the verified chunks of files it is still downloading (so a
crowd fetching one file feeds itself, as in BitTorrent). Requests name a
content by its SHA-256; the seeder never opens a path a request names.

``Announcer`` tells the active server (the tracker) what the seeder holds:
when it starts, when it gains a file or a batch of chunks, and every
``announce_interval``. Announcements go through the failover-aware
``ServerClient``, so after a failover they reach the backup.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from config_loader import Config
from database import ClientStore, fold
from error_handler import MiniTorrentError
from integrity import Manifest
from metrics import Metrics
from minitorrent.client.chunkboard import ChunkSet
from minitorrent.common.fs import ChunkLocation
from minitorrent.net.remote import ServerClient
from minitorrent.net.serving import ListingPage, RequestServer
from minitorrent.net.throttle import TokenBucket
from minitorrent.wire import protocol
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.protocol import ErrorCode, RequestFailed
from minitorrent.wire.tls import ServerTls

log = logging.getLogger(__name__)

ANNOUNCER_STOP_TIMEOUT_S = 2.0  # an announcement stuck on a dead server is not waited for
ANNOUNCE_MIN_GAP_S = 0.25  # between announcements: fresh enough for peers, not one round trip per verified batch

@dataclass(frozen=True)
class Holding:
    """Something this client can serve: a whole file, or some verified chunks of one."""

    name: str
    path: Path
    manifest: Manifest
    verified: ChunkSet | None  # None: the whole file; else a live view the download keeps adding to


class SeedSource:
    """What a seeder serves: this client's holdings, by SHA-256. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_sha: dict[str, Holding] = {}

    def load_completed(self, store: ClientStore) -> int:
        """Hold every completed download still on disk at its size; returns how many."""
        count = 0
        for done in store.completed_files():
            path = Path(done.path)
            if path.is_file() and path.stat().st_size == done.size:
                self.add_complete(path, done.name, done.manifest)
                count += 1
        return count

    def add_complete(self, path: Path, name: str, manifest: Manifest) -> None:
        """Hold the whole of ``manifest``'s content at ``path``."""
        with self._lock:
            self._by_sha[manifest.sha256] = Holding(name, Path(path), manifest, None)

    def update_partial(self, part: Path, name: str, manifest: Manifest, verified: Iterable[int]) -> None:
        """Hold the ``verified`` chunks of a download in progress (unless the whole file is held).

        A ``ChunkSet`` is held as it is, a live view (the download only ever
        adds verified chunks to it): no copy per call, whatever the file's size.
        """
        if not isinstance(verified, ChunkSet):
            verified = ChunkSet(manifest.chunk_count, verified)
        with self._lock:
            held = self._by_sha.get(manifest.sha256)
            if held is None or held.verified is not None:
                self._by_sha[manifest.sha256] = Holding(name, Path(part), manifest, verified)

    def drop(self, sha256: str) -> None:
        """Stop holding a content (its download failed or was discarded)."""
        with self._lock:
            self._by_sha.pop(sha256, None)

    def holdings(self) -> dict[str, bytes | None]:
        """Per SHA-256: a bitmap of the chunks held, or None for a whole file (for announcements)."""
        with self._lock:
            held = list(self._by_sha.values())
        return {h.manifest.sha256: None if h.verified is None else h.verified.bitmap() for h in held}

    # FileSource ------------------------------------------------------------------

    def list_files(self, search: str = "", offset: int = 0, limit: int | None = None) -> tuple[list[dict], int]:
        """The whole files held, by name."""
        with self._lock:
            whole = sorted((h for h in self._by_sha.values() if h.verified is None), key=lambda h: h.name)
        matches = [h for h in whole if fold(search) in fold(h.name)]
        end = None if limit is None else offset + limit
        entries = [{"name": h.name, "size": h.manifest.size, "chunks": h.manifest.chunk_count,
                    "sha256": h.manifest.sha256, "root": h.manifest.root, "downloads": 0, "added_at": 0.0}
                   for h in matches[offset:end]]
        return entries, len(matches)

    def list_page(self, search: str, after: str, limit: int, matches: int, under: str = "",
                  layout: str = "", counts: bool = True) -> ListingPage:
        """The whole files held whose names sort after ``after``: at most ``limit``, for a cursor page."""
        entries, _ = self.list_files(search)
        following = [entry for entry in entries if entry["name"] > after and entry["name"].startswith(under)]
        page = following[:limit]
        last, more = page[-1]["name"] if page else "", len(following) > limit
        if layout == protocol.LIST_LAYOUT_PACKED:
            return ListingPage(protocol.pack_list_page(page), len(page), last, more, layout)
        return ListingPage(json.dumps(page, ensure_ascii=False).encode(), len(page), last, more)

    def count_matching(self, search: str, under: str = "") -> int:
        """How many whole files held have names containing ``search`` (and starting with ``under``)."""
        entries, count = self.list_files(search)
        return sum(entry["name"].startswith(under) for entry in entries) if under else count

    def count_files(self) -> tuple[int, int]:
        """(whole files held, their bytes)."""
        entries, count = self.list_files()
        return count, sum(entry["size"] for entry in entries)

    def manifest(self, name: str) -> tuple[dict, bytes]:
        """The manifest of a held file of that name."""
        with self._lock:
            held = next((h for h in self._by_sha.values() if h.name == name), None)
        if held is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"this peer holds no file named {name!r}")
        return held.manifest.to_header(), held.manifest.chunk_digests

    def locate_chunk(self, name: str, sha256: str, index: int) -> ChunkLocation:
        """Where a held chunk is; ``RequestFailed`` (NOT_FOUND) for one not held."""
        with self._lock:
            held = self._by_sha.get(sha256)
        if held is None:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"this peer holds nothing of {name}")
        if not 0 <= index < held.manifest.chunk_count:
            raise RequestFailed(ErrorCode.OUT_OF_RANGE, f"{name} has no chunk {index}")
        if held.verified is not None and index not in held.verified:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"this peer does not hold chunk {index} of {name}")
        offset, length = held.manifest.chunk_span(index)
        return ChunkLocation(str(held.path), offset, length)

    def locate_files(self, names: list[str], sha256s: list[str]) -> list[ChunkLocation | RequestFailed]:
        """``locate_chunk(name, sha256, 0)`` for each file of a ``get_files`` batch, or why it is not served."""
        located: list[ChunkLocation | RequestFailed] = []
        for name, sha256 in zip(names, sha256s):
            try:
                located.append(self.locate_chunk(name, sha256, 0))
            except RequestFailed as error:
                located.append(error)
        return located

    def shared_versions(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Downloads are counted by the servers, not by peers: nothing here is a version to count."""
        return []

    def record_downloads(self, pairs: list[tuple[str, str]]) -> list[str]:
        """Downloads are counted by the servers, not by peers: none counted."""
        return []


class Announcer:
    """Tells the tracker what the seeder holds: on demand and every ``interval_s``."""

    def __init__(self, server: ServerClient, source: SeedSource, port: int, interval_s: float,
                 stop: threading.Event) -> None:
        self.server = server
        self.source = source
        self.port = port
        self.interval_s = interval_s
        self.stop = stop
        self._wanted = threading.Event()
        self.thread = threading.Thread(target=self._run, name="announce", daemon=True)

    def start(self) -> None:
        """Announce now and then periodically, in a background thread."""
        self.thread.start()

    def announce_soon(self) -> None:
        """Something changed: announce without waiting for the interval."""
        self._wanted.set()

    def _run(self) -> None:
        while not self.stop.is_set():
            self._announce_once()
            self._wanted.wait(self.interval_s)
            self._wanted.clear()
            self.stop.wait(ANNOUNCE_MIN_GAP_S)  # a download changes holdings every few chunks: one announce covers them

    def _announce_once(self) -> None:
        payload = protocol.encode_holdings(self.source.holdings())
        try:
            self.server.call(lambda s: s.call(protocol.Announce(self.port), protocol.Ok, payload))
        except MiniTorrentError as error:  # the tracker is best effort: try again next time
            log.info("could not announce to the tracker: %s", error)


class Seeder:
    """Serves this client's holdings to peers and announces them. ``start``/``stop`` from one thread."""

    def __init__(self, config: Config, server: ServerClient, store: ClientStore) -> None:
        self.source = SeedSource()
        self.metrics = Metrics()
        self.upload_limit = TokenBucket(config.transfer.upload_limit)
        self.stop_event = threading.Event()
        self._config = config
        self._server = server
        self._store = store
        self.announcer: Announcer | None = None
        tls = ServerTls(load_or_create(config.client.data_dir)) if config.transfer.encrypt else None
        self.server = RequestServer(
            self.source,
            host=local_address_towards(config.server.main.host, config.server.main.port),
            port=config.client.seed_port,
            name="seeder",
            max_connections=config.transfer.max_connections,
            idle_timeout_s=config.transfer.idle_timeout,
            io_timeout_s=config.transfer.io_timeout,
            metrics=self.metrics,
            upload_limit=self.upload_limit,
            tls=tls,
        )

    def start(self) -> tuple[str, int]:
        """Load completed files, listen, and start announcing; returns the bound address."""
        held = self.source.load_completed(self._store)
        host, port = self.server.start()
        self.announcer = Announcer(self._server, self.source, port, self._config.transfer.announce_interval,
                                   self.stop_event)
        self.announcer.start()
        log.info("seeding %d files on %s:%d", held, host, port)
        return host, port

    def stop(self) -> None:
        """Stop announcing and serving."""
        self.stop_event.set()
        if self.announcer:
            self.announcer.announce_soon()
            self.announcer.thread.join(ANNOUNCER_STOP_TIMEOUT_S)
        self.server.stop()

    @property
    def port(self) -> int:
        """The port peers reach this seeder on; 0 until it is started."""
        return self.announcer.port if self.announcer else 0

    def changed(self) -> None:
        """Holdings changed: tell the tracker soon."""
        if self.announcer:
            self.announcer.announce_soon()


def local_address_towards(host: str, port: int) -> str:
    """The local address this machine uses to reach ``host`` (where peers can reach us too).

    A UDP ``connect`` only asks the routing table; no packet is sent.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port or 1))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
