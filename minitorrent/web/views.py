"""The JSON bodies of /api/v1: plain functions of a server engine, no HTTP in sight."""
from __future__ import annotations

from urllib.parse import quote

from integrity import Manifest
from minitorrent.server.engine import ServerEngine
from minitorrent.wire.protocol import ErrorCode, RequestFailed

DEFAULT_PAGE = 100  # files per page when the caller names no limit
MAX_PAGE = 1000  # a page stays small whatever the catalog's size
MAX_MANIFEST_CHUNKS = 4096  # chunk digests per manifest page (4 GiB of 1 MiB chunks)


def file_url(sha256: str, name: str) -> str:
    """The download path of a file: its content address, then its name (percent-encoded)."""
    return f"/files/{sha256}/{quote(name, safe='')}"


def _links(entry: dict) -> dict:
    download = file_url(entry["sha256"], entry["name"])
    return {"download": download, "torrent": download + ".torrent",
            "self": "/api/v1/files/" + quote(entry["name"], safe="")}


def files_page(engine: ServerEngine, search: str, offset: int, limit: int) -> dict:
    """A page of the catalog (names containing ``search``, by name) with links and the match count."""
    entries, total = engine.catalog.list_files(search, offset, limit)
    return {"files": [{**entry, "links": _links(entry)} for entry in entries],
            "total": total, "offset": offset, "limit": limit, "search": search}


def one_file(engine: ServerEngine, name: str, chunk_offset: int, chunk_limit: int) -> dict:
    """A file's entry and its manifest (a page of its chunk digests); ``RequestFailed`` if unknown."""
    record = engine.catalog.db.get_file(name)
    manifest = engine.catalog.db.get_manifest(name)
    if record is None or manifest is None:
        raise RequestFailed(ErrorCode.NOT_FOUND, f"no file named {name!r}")
    entry = {"name": record.name, "size": record.size, "chunks": record.chunks, "sha256": record.sha256,
             "downloads": record.downloads, "added_at": record.added_at}
    return {**entry, "links": _links(entry), "manifest": _manifest(manifest, chunk_offset, chunk_limit)}


def _manifest(manifest: Manifest, offset: int, limit: int) -> dict:
    count = manifest.chunk_count
    digests = manifest.chunk_digests
    shown = range(min(offset, count), min(offset + limit, count))
    return {"size": manifest.size, "chunk_size": manifest.chunk_size, "sha256": manifest.sha256,
            "chunk_count": count, "chunk_offset": offset,
            "chunk_sha256": [digests[i * 32:(i + 1) * 32].hex() for i in shown]}


def status(engine: ServerEngine) -> dict:
    """Role, epoch, the peer server's link, counters and rates (what the page's header shows)."""
    node, catalog = engine.node, engine.catalog
    files, total_bytes = catalog.count_files()
    body = engine.metrics.snapshot(top_files=10)
    body.update(server=engine.name, role=node.role.value, epoch=node.epoch, server_id=node.server_id,
                primary=node.primary, files=files, total_bytes=total_bytes,
                seeding_peers=engine.server.tracker.peer_count() if engine.server.tracker else 0)
    if engine.server.status_extra:
        body.update(engine.server.status_extra())
    return body


def peers(engine: ServerEngine) -> dict:
    """The seeding clients the tracker knows now."""
    tracker = engine.server.tracker
    known = tracker.peers() if tracker else []
    return {"peers": [{"host": host, "port": port, "files": files, "last_seen_s": round(age, 3)}
                      for host, port, files, age in known]}
