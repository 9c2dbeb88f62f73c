"""One HTTP listener per server: the page, /api/v1, /metrics, /files and (see torrents.py) BitTorrent.

Stdlib ``http.server`` with a thread per connection is enough here: the
requests are few and small except file bodies, which go out by sendfile
without passing through Python. Connections are capped, shared fairly per
address, and an idle one is closed after ``io_timeout_s`` however it trickles
bytes (web/slots.py); a connection finding no slot to take is closed (over
plain HTTP it is told 503).

HTTPS with the server's own certificate (``tls``) is the default, so the
fingerprint a browser shows is the server's identity (its SHA-256). The TLS
handshake runs in the connection's own thread under ``io_timeout_s``: a
stranger who connects and says nothing holds one slot, never the accept
loop. Plain HTTP (``server.<role>.http_tls: false``) is served only on a
loopback address.

``authorize(path, token)`` may refuse a request with an ``HttpError``:
``open_access`` lets everything through; ``paired_access`` (``server.access:
paired``) wants a token (server/tokens.py) for everything but the page itself,
from ``Authorization: Bearer`` or a ``token`` query parameter (so plain links,
``curl -C -`` and ``wget -c`` work). Tokens never reach the log.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from config_loader import HTTP_OFF, Config
from error_handler import ConfigError, ConnectionFailed, MiniTorrentError
from metrics import Metrics
from minitorrent.server.engine import ServerEngine
from minitorrent.server.tokens import WebTokens
from minitorrent.web import announce, downloads, prometheus, torrents, views
from minitorrent.web.errors import HttpError
from minitorrent.web.indexer import TorrentIndexer
from minitorrent.web.logtail import RecentLines
from minitorrent.web.slots import HttpSlot, HttpSlots
from minitorrent.wire.protocol import ErrorCode
from minitorrent.wire.tls import ServerTls

log = logging.getLogger(__name__)

MAX_HTTP_CONNECTIONS = 64  # browsers open ~6 each; a scrape, a few curls and wgets fit beside them
MAX_QUERY_BYTES = 4096  # a search box's text, a page number: nothing legitimate is longer
MAX_HEAD_BYTES = 64 * 1024  # a request line and headers together (http.server alone allows 100 lines of 64 KiB each)
MAX_QUERY_INT = 2**63 - 1  # SQLite's largest integer: a larger offset would overflow in the query, not just match nothing
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}
_FILE_PATH = re.compile(r"/files/([0-9a-f]{64})/([^/]+)")
# Every query value: the token's key may come percent-encoded (%74oken=), which parse_qs still reads as "token".
_QUERY_VALUE_IN_TEXT = re.compile(r"([?&][^=&\s]*=)[^&\s]*")
TLS_RECORD_HANDSHAKE = 0x16  # the first byte of every TLS connection: anything else is plain HTTP

Authorize = Callable[[str, str], None]  # (path, the token the request carried or "") -> None, or HttpError


def open_access(path: str, token: str) -> None:
    """Every request may pass (``server.access: open``)."""


def paired_access(tokens: WebTokens) -> Authorize:
    """``server.access: paired``: the page loads for anyone; everything else wants a token still held."""

    def authorize(path: str, token: str) -> None:
        if path not in PAGE_FILES and tokens.holder(token) is None:
            raise HttpError(ErrorCode.NOT_PAIRED, "not paired: ask the server's operator for a token",
                            headers={"WWW-Authenticate": 'Bearer realm="minitorrent"'})

    return authorize


def request_token(query: dict, headers) -> str:
    """The token a request carries: ``Authorization: Bearer`` first, else the ``token`` query parameter."""
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return _str_arg(query, "token")


def redact(text: str) -> str:
    """``text`` with every query value hidden, a token's among them (request lines go to the log)."""
    return _QUERY_VALUE_IN_TEXT.sub(r"\1<hidden>", text)


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


class WebFace:
    """The HTTP listener of one server engine. ``start``/``stop`` from one controlling thread."""

    def __init__(self, engine: ServerEngine, host: str, port: int, *, io_timeout_s: float,
                 redirect_to: str | None = None, tls: ServerTls | None = None,
                 authorize: Authorize = open_access, max_connections: int = MAX_HTTP_CONNECTIONS) -> None:
        self.engine = engine
        self.io_timeout_s = io_timeout_s
        self.redirect_to = redirect_to  # the other server's web face ("https://host:port"), where a standby sends downloads
        self.tls = tls  # None: plain HTTP (loopback only)
        self.authorize = authorize
        self.metrics = Metrics()  # the HTTP channel's own counters, beside the protocol's
        self.recent = RecentLines()
        self._requests_by_kind: dict[str, int] = {}
        self._count_lock = threading.Lock()
        self.slots = HttpSlots(max_connections, io_timeout_s)
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
    def scheme(self) -> str:
        """``https``, or ``http`` without TLS."""
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """The page's address, ``https://host:port/`` (``http://`` without TLS)."""
        host, port = self.address
        return f"{self.scheme}://[{host}]:{port}/" if ":" in host else f"{self.scheme}://{host}:{port}/"

    def start(self) -> tuple[str, int]:
        """Bind and serve in a background thread.

        ``MiniTorrentError`` if the port is taken; ``ConfigError`` if plain
        HTTP is asked on an address that is not a loopback one.
        """
        host = self._requested[0]
        if self.tls is None and not is_loopback(host):
            raise ConfigError(f"server.{self.engine.name}.http_tls is false: plain HTTP is served on a loopback "
                              f"address only, not {host}; serve HTTPS (http_tls: true) or set host: 127.0.0.1")
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

    def secure(self, request: socket.socket, slot: HttpSlot) -> socket.socket | None:
        """The socket to talk HTTP on: TLS after a handshake done here, under ``io_timeout_s`` (the
        connection's own thread, never the accept loop's); None if the handshake failed or the
        client spoke plain HTTP to the HTTPS port (it is told to use https)."""
        if self.tls is None:
            return request
        peer = _peer(request)
        request.settimeout(self.io_timeout_s)
        try:
            first = request.recv(1, socket.MSG_PEEK)
        except OSError as error:
            log.debug("web face: %s sent nothing: %s", peer, error)
            return None
        if first and first[0] != TLS_RECORD_HANDSHAKE:
            _refuse_plain(request, f"this port speaks HTTPS: use https://{_host_port(*self.address)}/")
            return None
        tls_sock = self.tls.wrap(request)
        if not self.slots.rebind(slot, tls_sock):  # shed while wrapping: its close missed this socket
            tls_sock.close()
            return None
        try:
            self.tls.handshake(tls_sock, self.io_timeout_s)
        except ConnectionFailed as error:
            log.debug("web face: no TLS with %s: %s", peer, error)
            tls_sock.close()
            return None
        return tls_sock


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], face: WebFace) -> None:
        self.face = face
        if ":" in address[0]:  # an IPv6 host such as "::1"
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address) -> None:
        """Serve the connection in a thread of its own once it has a slot (ThreadingMixIn's, plus the slot)."""
        slot = self.face.slots.take(request, client_address[0])
        if slot is None:
            if self.face.tls is None:  # over TLS a plain 503 would be noise: the handshake is not ours to do here
                _refuse_plain(request, "too many connections; retry later", 503, ErrorCode.BUSY)
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve, args=(request, client_address, slot), daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no more threads: give the slot back and close
            self.face.slots.release(slot)
            self.shutdown_request(request)

    def _serve(self, request: socket.socket, client_address, slot: HttpSlot) -> None:
        try:
            self._secure_and_handle(request, client_address, slot)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.face.slots.release(slot)

    def service_actions(self) -> None:
        """Between accepts (every half second at most): close the connections idle too long."""
        self.face.slots.close_overdue()

    def _secure_and_handle(self, request: socket.socket, client_address, slot: HttpSlot) -> None:
        secured = self.face.secure(request, slot)  # in this connection's thread: see WebFace.secure
        if secured is None:
            return
        try:
            _Handler(secured, client_address, self, slot)
        finally:
            if secured is not request:
                self.shutdown_request(secured)  # the TLS socket owns the descriptor now, not ``request``

    def handle_error(self, request, client_address) -> None:
        """A connection that broke (reset, bad TLS record) is the client's business: a debug line, no traceback
        on stderr. Anything else is a bug: logged as one."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("web face: connection from %s ended: %s", client_address[0], error)
        else:
            log.exception("web face: connection from %s failed", client_address[0])


_REASONS = {400: "Bad Request", 503: "Service Unavailable"}


def _refuse_plain(request: socket.socket, message: str, status: int = 400, code: str = ErrorCode.BAD_REQUEST) -> None:
    """Answer a plain-HTTP client with one JSON error and nothing more (before any request is read)."""
    body = HttpError(code, message).body()
    retry = b"Retry-After: 1\r\n" if status == 503 else b""
    try:
        request.sendall(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n%sConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (status, _REASONS[status].encode(), retry, len(body), body))
    except OSError:
        pass


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer(sock: socket.socket) -> str:
    try:
        return _host_port(*sock.getpeername()[:2])
    except OSError:
        return "a client that left"


class _Handler(BaseHTTPRequestHandler):
    """One connection: parse, route, answer; every answer counted in the face's metrics."""

    protocol_version = "HTTP/1.1"
    server_version = "MiniTorrent"
    server: _HttpServer

    def __init__(self, request: socket.socket, client_address, server: _HttpServer, slot: HttpSlot) -> None:
        self.slot = slot  # set first: the base class serves the whole connection from its __init__
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        self.face: WebFace = self.server.face
        self.timeout = self.face.io_timeout_s
        super().setup()
        self.rfile = _HeadBudget(self.rfile)
        self.face.metrics.connection_opened()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.face.metrics.connection_closed()

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), redact(format % args))  # a request line may hold ?token=

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def handle_one_request(self) -> None:
        """One request; the connection stays busy (its slot never shed) from its head read to its answer sent."""
        self.rfile.renew()
        try:
            super().handle_one_request()
        finally:
            HttpSlots.answered(self.slot)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed:
            HttpSlots.answering(self.slot)
        return parsed

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
        self._token = ""
        try:
            if len(url.query) > MAX_QUERY_BYTES:
                raise HttpError(ErrorCode.BAD_REQUEST, f"query longer than {MAX_QUERY_BYTES} bytes")
            query = parse_qs(url.query)
            self._token = request_token(query, self.headers)
            self.face.authorize(url.path, self._token)
            kind = self._route(url.path, query, head)
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
        base = f"{self.face.scheme}://{self.headers.get('Host') or _host_port(*self.face.address)}"
        # The holder's token rides in both URLs, so a BitTorrent client needs nothing else (BEP 19/3 keep queries).
        token = "?" + urlencode({"token": self._token}) if self._token else ""
        body = torrents.metainfo(record.name, record.size, pieces,
                                 base + views.file_url(record.sha256, record.name) + token, base + "/announce" + token)
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
        raise HttpError(ErrorCode.STANDBY, "this server is on standby; the active one serves this file",
                        status=307, headers={"Location": target + self.path})  # the path keeps any ?token=

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


class _HeadBudget:
    """The connection's reader, allowing ``MAX_HEAD_BYTES`` of request head per request (GETs have no body).

    http.server caps a line at 64 KiB and a head at 100 lines: 6.5 MB a
    connection, which 64 connections make most of a small server's memory.
    Past the budget a read raises ``LineTooLong``, which http.server answers
    with 431.
    """

    def __init__(self, reader) -> None:
        self._reader = reader
        self._left = MAX_HEAD_BYTES

    def renew(self) -> None:
        """A new request begins: its head gets the whole budget."""
        self._left = MAX_HEAD_BYTES

    def readline(self, limit: int = -1) -> bytes:
        if self._left <= 0:
            raise http.client.LineTooLong(f"request head over {MAX_HEAD_BYTES} bytes")
        line = self._reader.readline(self._left if limit < 0 else min(limit, self._left))
        self._left -= len(line)
        return line

    def __getattr__(self, name: str):
        return getattr(self._reader, name)  # close() and the rest, as the wrapped reader has them


def _int_arg(query: dict, key: str, default: int) -> int:
    values = query.get(key)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise HttpError(ErrorCode.BAD_REQUEST, f"{key} must be an integer, got {values[0]!r}") from None
    if not 0 <= value <= MAX_QUERY_INT:
        raise HttpError(ErrorCode.BAD_REQUEST, f"{key} must be from 0 to {MAX_QUERY_INT}, got {value}")
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
    other_scheme = "https" if other.http_tls else "http"
    redirect_to = f"{other_scheme}://{_host_port(other.host, other.http_port)}" if other.http_port > 0 else None
    authorize = paired_access(engine.tokens) if config.server.access == "paired" else open_access
    return WebFace(engine, mine.host, mine.http_port, io_timeout_s=config.transfer.io_timeout,
                   redirect_to=redirect_to, tls=ServerTls(engine.identity) if mine.http_tls else None,
                   authorize=authorize)


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
    program = "backup_server.py" if face.engine.name == "backup" else "main_server.py"
    note = (f"\nweb token (server.access: paired): python {program} token"
            if face.authorize is not open_access else "")  # never the token itself: stdout often ends in a journal
    return f"{banner}\nweb page: {face.url}{note}"


def stop_with_face(stop_engine: Callable[[], None], face: WebFace | None) -> None:
    """Stop ``face`` (if any), then the engine: no HTTP request finds its catalog closed."""
    if face is not None:
        face.stop()
    stop_engine()
