"""One HTTP listener per server: the page, /api/v1, /metrics, /files and (see torrents.py) BitTorrent.

Stdlib ``http.server`` with a thread per connection is enough here: the
requests are few and small except file bodies, which go out by sendfile
without passing through Python. Connections are capped (a busy server
answers 503) and every socket has a timeout.

Two seams are left for what comes next. ``wrap_socket`` turns an accepted
socket into the one the handler talks on (TLS will wrap it there, in the
connection's own thread, so a slow handshake never stalls accepting).
``authorize(path, headers)`` may refuse a request with an ``HttpError``; it
lets everything through until ``server.access: paired`` exists.
"""
from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable
from urllib.parse import parse_qs, quote, unquote, urlsplit

from config_loader import HTTP_OFF, Config
from error_handler import MiniTorrentError
from metrics import Metrics
from minitorrent.server.engine import ServerEngine
from minitorrent.web import announce, downloads, prometheus, torrents, views
from minitorrent.web.errors import HttpError
from minitorrent.web.indexer import TorrentIndexer
from minitorrent.web.logtail import RecentLines
from minitorrent.wire.protocol import ErrorCode

log = logging.getLogger(__name__)

MAX_HTTP_CONNECTIONS = 64  # browsers open ~6 each; a scrape, a few curls and wgets fit beside them
MAX_QUERY_BYTES = 4096  # a search box's text, a page number: nothing legitimate is longer
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}
_FILE_PATH = re.compile(r"/files/([0-9a-f]{64})/([^/]+)")

Authorize = Callable[[str, dict], None]


def open_access(path: str, headers: dict) -> None:
    """Every request may pass (``server.access: open``, today's only mode)."""


class WebFace:
    """The HTTP listener of one server engine. ``start``/``stop`` from one controlling thread."""

    def __init__(self, engine: ServerEngine, host: str, port: int, *, io_timeout_s: float,
                 redirect_to: tuple[str, int] | None = None,
                 wrap_socket: Callable[[socket.socket], socket.socket] = lambda sock: sock,
                 authorize: Authorize = open_access, max_connections: int = MAX_HTTP_CONNECTIONS) -> None:
        self.engine = engine
        self.io_timeout_s = io_timeout_s
        self.redirect_to = redirect_to  # the other server's web face, where a standby sends downloads
        self.wrap_socket = wrap_socket
        self.authorize = authorize
        self.metrics = Metrics()  # the HTTP channel's own counters, beside the protocol's
        self.recent = RecentLines()
        self._requests_by_kind: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._requested = (host, port)
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self.bittorrent = announce.bittorrent_tracker()  # BitTorrent peers: a swarm apart from MiniTorrent's
        self.indexer = TorrentIndexer(engine.catalog)
        self.collector = prometheus.EngineCollector(engine, self.metrics.snapshot, self.requests_by_kind,
                                                    self.bittorrent.peer_count)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) bound; the real port even if 0 was asked."""
        if self._httpd is None:
            raise RuntimeError("web face not started")
        return self._httpd.server_address[:2]

    @property
    def url(self) -> str:
        """The page's address, ``http://host:port/``."""
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread; ``MiniTorrentError`` if the port is taken."""
        try:
            self._httpd = _HttpServer(self._requested, self)
        except OSError as error:
            host, port = self._requested
            raise MiniTorrentError(f"cannot serve the web face on {host}:{port}: {error.strerror or error}") from error
        logging.getLogger().addHandler(self.recent)
        self.indexer.start()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"{self.engine.name}-http",
                                        daemon=True)
        self._thread.start()
        log.info("%s web face on %s", self.engine.name, self.url)
        return self.address

    def stop(self) -> None:
        """Stop accepting and close the listener (requests in flight end on their own timeouts)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self.indexer.stop()
        logging.getLogger().removeHandler(self.recent)
        if self._thread:
            self._thread.join()

    def count_request(self, kind: str) -> None:
        """Count one HTTP request of ``kind`` (page, api, metrics, file, torrent, announce, error)."""
        with self._count_lock:
            self._requests_by_kind[kind] = self._requests_by_kind.get(kind, 0) + 1

    def requests_by_kind(self) -> dict[str, int]:
        """HTTP requests answered so far, by kind."""
        with self._count_lock:
            return dict(self._requests_by_kind)

    def take_slot(self) -> bool:
        """Take a connection slot; False when ``max_connections`` are being served."""
        return self._slots.acquire(blocking=False)

    def release_slot(self) -> None:
        self._slots.release()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], face: WebFace) -> None:
        self.face = face
        if ":" in address[0]:  # an IPv6 host such as "::1"
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self.face.take_slot():
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.face.release_slot()

    def finish_request(self, request: socket.socket, client_address) -> None:
        self.RequestHandlerClass(self.face.wrap_socket(request), client_address, self)


def _refuse_busy(request: socket.socket) -> None:
    body = HttpError(ErrorCode.BUSY, "too many connections; retry later").body()
    try:
        request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    """One connection: parse, route, answer; every answer counted in the face's metrics."""

    protocol_version = "HTTP/1.1"
    server_version = "MiniTorrent"
    server: _HttpServer

    def setup(self) -> None:
        self.face: WebFace = self.server.face
        self.timeout = self.face.io_timeout_s
        super().setup()
        self.face.metrics.connection_opened()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.face.metrics.connection_closed()

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _refuse_method(self) -> None:
        self._head_sent = False
        self.close_connection = True  # a body we will not read may follow
        self._send_error(HttpError(ErrorCode.UNKNOWN_REQUEST, f"{self.command} is not served here; use GET"), False)
        self.face.count_request("error")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method

    def _answer(self, head: bool) -> None:
        # http.server decodes the request line as Latin-1; a client sending raw UTF-8 meant UTF-8.
        url = urlsplit(self.path.encode("latin-1").decode("utf-8", "replace"))
        kind = "error"
        self._head_sent = False
        try:
            if len(url.query) > MAX_QUERY_BYTES:
                raise HttpError(ErrorCode.BAD_REQUEST, f"query longer than {MAX_QUERY_BYTES} bytes")
            self.face.authorize(url.path, dict(self.headers))
            kind = self._route(url.path, parse_qs(url.query), head)
        except HttpError as error:
            kind = "redirect" if error.status < 400 else kind
            self._send_error(error, head)
        except MiniTorrentError as error:  # RequestFailed and kin carry a wire code
            self._send_error(HttpError(getattr(error, "code", ErrorCode.INTERNAL), str(error)), head)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away (or stalled) mid-answer
        except Exception:  # a bug: say so in the log and to the client, keep serving others
            log.exception("web face: %s %s failed", self.command, url.path)
            self.close_connection = True
            self._send_error(HttpError(ErrorCode.INTERNAL, "internal error; see the server's log"), head)
        self.face.count_request(kind)
        self.face.metrics.request_done(ok=kind != "error")

    def _route(self, path: str, query: dict, head: bool) -> str:
        """Answer ``path``; the kind of request it was (for the counters)."""
        if path in PAGE_FILES:
            self._send_page_file(*PAGE_FILES[path], head)
            return "page"
        if path.startswith("/api/v1/"):
            self._send_json(self._api(path[len("/api/v1/"):], query), head)
            return "api"
        if path == "/metrics":
            self._send_bytes(200, prometheus.render(self.face.collector), prometheus.CONTENT_TYPE, head)
            return "metrics"
        if path == "/announce":
            body = announce.announce(self.face.engine.catalog, self.face.bittorrent, urlsplit(self.path).query,
                                     self.client_address[0])
            self._send_bytes(200, body, "text/plain", head)
            return "announce"
        match = _FILE_PATH.fullmatch(path)
        if match:
            return self._send_file_or_torrent(match.group(1), unquote(match.group(2)), head)
        raise HttpError(ErrorCode.NOT_FOUND, f"nothing at {path}")

    def _api(self, what: str, query: dict) -> dict:
        engine = self.face.engine
        if what == "files":
            limit = min(_int_arg(query, "limit", views.DEFAULT_PAGE), views.MAX_PAGE)
            return views.files_page(engine, _str_arg(query, "search"), _int_arg(query, "offset", 0), limit)
        if what.startswith("files/"):
            limit = min(_int_arg(query, "chunk_limit", views.MAX_MANIFEST_CHUNKS), views.MAX_MANIFEST_CHUNKS)
            return views.one_file(engine, unquote(what[len("files/"):]), _int_arg(query, "chunk_offset", 0), limit)
        if what == "status":
            http = self.face.metrics.snapshot(top_files=0)
            return {**views.status(engine), "http": {key: http[key] for key in (
                "upload_bps", "bytes_sent", "active_connections", "requests_total")}}
        if what == "peers":
            return views.peers(engine)
        if what == "log":
            return {"lines": self.face.recent.lines(_int_arg(query, "after", 0))}
        raise HttpError(ErrorCode.NOT_FOUND, f"no API resource {what!r}")

    # Files ------------------------------------------------------------------------

    def _send_file_or_torrent(self, sha256: str, name: str, head: bool) -> str:
        """``name`` itself if a file of that name holds ``sha256``, else the torrent of ``name`` less ``.torrent``."""
        engine = self.face.engine
        if not engine.node.is_active():
            self._redirect_or_refuse()
        if name.endswith(".torrent") and name not in engine.catalog.db.names_with_sha256(sha256):
            self._send_torrent(downloads.find_file(engine, sha256, name.removesuffix(".torrent")), head)
            return "torrent"
        self._send_file(downloads.find_file(engine, sha256, name), head)
        return "file"

    def _send_torrent(self, record, head: bool) -> None:
        pieces = self.face.engine.catalog.db.torrent_pieces(record.sha256)
        if record.size == 0:
            raise HttpError(ErrorCode.NOT_FOUND, f"{record.name} is empty: BitTorrent cannot share an empty file")
        if pieces is None:
            raise HttpError(ErrorCode.BUSY, f"the torrent of {record.name} is being prepared; retry shortly",
                            headers={"Retry-After": "2"})
        base = f"http://{self.headers.get('Host') or '%s:%d' % self.face.address}"
        body = torrents.metainfo(record.name, record.size, pieces, base + views.file_url(record.sha256, record.name),
                                 base + "/announce")
        self._send_bytes(200, body, "application/x-bittorrent", head, {
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(record.name + '.torrent', safe='')}"})

    def _send_file(self, record, head: bool) -> None:
        engine = self.face.engine
        reply = downloads.plan_reply(engine, record, self.headers.get("Range"), self.headers.get("If-Range"))
        file = downloads.open_blob(reply)
        with file:
            self._send_head(reply.status, reply.headers)
            if not head and reply.part is not None:
                self._send_blob_part(file, reply)

    def _send_blob_part(self, file, reply: downloads.Reply) -> None:
        engine, metrics = self.face.engine, self.face.metrics
        sent = downloads.send_body(self.connection, file, reply.part, engine.server.upload_limit.consume,
                                   metrics.add_sent)
        if sent < reply.part.length:
            self.close_connection = True
        elif reply.part.end == reply.record.size - 1:  # the last byte went out: a finished download
            engine.catalog.record_download(reply.record.name, reply.record.sha256)
            engine.metrics.download_finished(reply.record.name)

    def _redirect_or_refuse(self) -> None:
        node, target = self.face.engine.node, self.face.redirect_to
        if target is None:
            where = f"the active server is {node.primary}" if node.primary else "no active server is known"
            raise HttpError(ErrorCode.STANDBY, f"this server is on standby; {where}")
        host, port = target
        raise HttpError(ErrorCode.STANDBY, "this server is on standby; the active one serves this file",
                        status=307, headers={"Location": f"http://{host}:{port}{self.path}"})

    # Sending ----------------------------------------------------------------------------

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self._head_sent = True
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _send_bytes(self, status: int, body: bytes, content_type: str, head: bool,
                    headers: dict[str, str] | None = None) -> None:
        self._send_head(status, {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})})
        if not head:
            self.wfile.write(body)  # not counted in the sent bytes: those are files (a page polling itself is no upload)

    def _send_json(self, body: dict, head: bool) -> None:
        self._send_bytes(200, json.dumps(body).encode(), "application/json", head, {"Cache-Control": "no-store"})

    def _send_page_file(self, name: str, content_type: str, head: bool) -> None:
        body = resources.files("minitorrent.web").joinpath("page", name).read_bytes()
        self._send_bytes(200, body, content_type, head, {"Cache-Control": "no-cache"})

    def _send_error(self, error: HttpError, head: bool) -> None:
        if self._head_sent:  # too late for an error reply: cut the body short instead
            self.close_connection = True
            return
        self._send_bytes(error.status, error.body(), "application/json", head, error.headers)


def _int_arg(query: dict, key: str, default: int) -> int:
    values = query.get(key)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise HttpError(ErrorCode.BAD_REQUEST, f"{key} must be an integer, got {values[0]!r}") from None
    if value < 0:
        raise HttpError(ErrorCode.BAD_REQUEST, f"{key} must be >= 0, got {value}")
    return value


def _str_arg(query: dict, key: str) -> str:
    values = query.get(key)
    return values[0] if values else ""


def web_face_for(engine: ServerEngine, config: Config) -> WebFace | None:
    """The web face the config asks for this engine ("main" or "backup"); None if ``http_port`` is -1."""
    servers = config.server
    mine, other = (servers.main, servers.backup) if engine.name == "main" else (servers.backup, servers.main)
    if mine.http_port == HTTP_OFF:
        return None
    redirect_to = (other.host, other.http_port) if other.http_port > 0 else None
    return WebFace(engine, mine.host, mine.http_port, io_timeout_s=config.transfer.io_timeout,
                   redirect_to=redirect_to)


def start_with_face(start_engine: Callable[[], str], face: WebFace | None) -> str:
    """Start ``face`` (if any) then the engine, whose banner ``start_engine`` returns; banner + the page's address.

    The face goes first so that a taken HTTP port stops the program before
    the engine has threads to stop; if the engine then fails, the face is
    stopped again and the ``MiniTorrentError`` goes on.
    """
    if face is None:
        return start_engine()
    face.start()
    try:
        banner = start_engine()
    except BaseException:
        face.stop()
        raise
    return f"{banner}\nweb page: {face.url}"


def stop_with_face(stop_engine: Callable[[], None], face: WebFace | None) -> None:
    """Stop ``face`` (if any), then the engine: no HTTP request finds its catalog closed."""
    if face is not None:
        face.stop()
    stop_engine()
