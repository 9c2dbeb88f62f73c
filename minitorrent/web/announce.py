"""/announce: a BitTorrent tracker (BEP 3, compact peers per BEP 23) for the shared files' torrents.

It is backed by the suite's own ``Tracker`` class, in a separate instance:
BitTorrent peers and MiniTorrent's seeding clients speak different protocols,
so each swarm only ever hears of its own kind. As in the MiniTorrent tracker,
a peer's address is the one its connection came from, never an ``ip``
parameter, and only torrents of files shared here are tracked.
"""
from __future__ import annotations

import socket
from urllib.parse import parse_qs

from minitorrent.net.tracker import PEER_TTL_INTERVALS, Tracker
from minitorrent.server.catalog import Catalog
from minitorrent.web.bencode import bencode

ANNOUNCE_INTERVAL_S = 30  # what BitTorrent clients are told; a LAN swarm stays fresh
NUMWANT_MAX = 50


def bittorrent_tracker() -> Tracker:
    """The tracker of BitTorrent peers, forgetting a peer after missing announcements."""
    return Tracker(ttl_s=PEER_TTL_INTERVALS * ANNOUNCE_INTERVAL_S)


def failure(reason: str) -> bytes:
    """A tracker error as BEP 3 has it: a bencoded ``failure reason``, sent with status 200."""
    return bencode({"failure reason": reason})


def announce(catalog: Catalog, tracker: Tracker, raw_query: str, host: str) -> bytes:
    """Record the announcing peer at ``host`` and answer with other peers of that torrent (bencoded).

    ``raw_query`` is the query string as received: ``info_hash`` and
    ``peer_id`` are raw bytes, percent-encoded, and must not be decoded as text.
    """
    query = {key: values[0] for key, values in parse_qs(raw_query, encoding="latin-1").items()}
    info_hash = query.get("info_hash", "").encode("latin-1")
    try:
        port = int(query.get("port", ""))
        left = int(query.get("left", "0"))
    except ValueError:
        return failure("port and left must be integers")
    if len(info_hash) != 20 or not 0 < port < 65536:
        return failure("info_hash must be 20 bytes and port from 1 to 65535")
    record = catalog.db.file_for_info_hash(info_hash)
    if record is None:
        return failure("unknown torrent: not a file shared by this server")
    if query.get("event") == "stopped":
        tracker.forget(host, port)
        return bencode({"interval": ANNOUNCE_INTERVAL_S, "peers": b""})
    tracker.announce(host, port, {record.sha256: None if left == 0 else b""})
    return bencode({"interval": ANNOUNCE_INTERVAL_S, "peers": _compact(tracker, record.sha256, (host, port))})


def _compact(tracker: Tracker, sha256: str, asker: tuple[str, int]) -> bytes:
    """The other peers as BEP 23 compact entries: 4 bytes of IPv4 address, 2 of port."""
    entries = []
    for peer_host, peer_port, _ in tracker.peers_for(sha256, asker, limit=NUMWANT_MAX):
        try:
            entries.append(socket.inet_aton(peer_host) + peer_port.to_bytes(2, "big"))
        except OSError:
            continue  # an IPv6 peer has no compact IPv4 form
    return b"".join(entries)
