"""The torrent indexer: computes each shared content's BitTorrent hashes once, off the request path.

A thread wakes every ``POLL_S``; when the catalog changed (an add, a
replica, a removal; ``catalog_version`` tells cheaply, even for another
process's change) it prunes the rows of what is no longer shared, hashes
each new content once (one read, in this thread), and derives the info
hashes of each new name from the stored hashes (no read). Until a file is
indexed its .torrent answers 503 with Retry-After.
"""
from __future__ import annotations

import logging
import threading

from database import FileRecord
from error_handler import MiniTorrentError
from minitorrent.server.catalog import Catalog
from minitorrent.web import torrents

log = logging.getLogger(__name__)

POLL_S = 1.0  # how soon after an add its .torrent is ready (plus the hashing itself)
BATCH = 64  # names indexed per database round trip


class TorrentIndexer:
    """Keeps ``torrent_pieces`` and ``torrent_names`` in step with the catalog. ``start``/``stop`` from one thread."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torrent-indexer", daemon=True)
        self._indexed_version = -1

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the file being hashed, if any."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.index_once()
            except (MiniTorrentError, OSError) as error:  # a closed catalog at shutdown, an unreadable blob
                log.warning("torrent indexing paused: %s", error)
            self._stop.wait(POLL_S)

    def index_once(self) -> None:
        """Bring the torrent rows up to date with the catalog, if it changed since the last pass."""
        db = self.catalog.db
        version = db.catalog_version()
        if version == self._indexed_version:
            return
        db.prune_torrents()
        while not self._stop.is_set():
            batch = db.names_without_torrent(BATCH)
            if not batch:
                break
            for record in batch:
                self._index(record)
        self._indexed_version = version

    def _index(self, record: FileRecord) -> None:
        db = self.catalog.db
        pieces = db.torrent_pieces(record.sha256)
        if pieces is None:
            piece_length = torrents.piece_length_for(record.chunk_size)
            pieces = torrents.hash_pieces(self.catalog.blob_path(record.sha256), record.size, piece_length)
            db.put_torrent_pieces(record.sha256, pieces)
            log.info("computed the BitTorrent hashes of %s", record.name)
        hashes = torrents.info_hashes(record.name, record.size, pieces)
        db.put_torrent_name(record.name, record.sha256, hashes.v1, hashes.v2_short)
