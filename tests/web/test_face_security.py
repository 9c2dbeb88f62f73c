"""The web face's HTTPS (the server's own certificate, handshakes off the accept loop, plain HTTP on loopback
only) and its tokens under ``server.access: paired``, over real sockets, real TLS and real programs."""
from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import LONG_TIMEOUT, ROOT, SHORT_TIMEOUT, make_config, make_file, run_client, wait_until, write_config
from webfixtures import face_factory, fetch, standby_backup  # noqa: F401 - fixtures used by name

from config_loader import load_config
from error_handler import ConfigError
from minitorrent.common.launcher import free_port
from minitorrent.web.face import WebFace, paired_access, web_face_for
from minitorrent.wire.identity import format_id, load_or_create
from minitorrent.wire.tls import ServerTls, client_context

PAIRED = {"server": {"access": "paired"}}
SIZE = 300_000
NAME = "paired file é.bin"


def certificate_of(address: tuple[str, int]) -> bytes:
    """The DER certificate the server at ``address`` presents in a TLS handshake."""
    with socket.create_connection(address, timeout=SHORT_TIMEOUT) as raw:
        with client_context().wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)


@pytest.fixture
def https_face(server_factory, face_factory):
    """(engine, face) for an open main server whose web face serves HTTPS with its identity."""
    engine = server_factory()
    return engine, face_factory(engine, tls=ServerTls(engine.identity))


@pytest.fixture
def paired(server_factory, face_factory, tmp_path: Path):
    """(engine, face, source, download path) for a paired-mode main server over HTTPS sharing one file."""
    engine = server_factory(PAIRED)
    source = make_file(tmp_path / "in" / NAME, SIZE, seed=4)
    record = engine.add_file(source).record
    face = face_factory(engine, tls=ServerTls(engine.identity), authorize=paired_access(engine.tokens))
    return engine, face, source, f"/files/{record.sha256}/{quote(NAME)}"


def paired_client_token(engine, tmp_path: Path, name: str = "cli") -> str:
    """A client identity paired with ``engine``, and its token as the server gives it."""
    identity = load_or_create(tmp_path / name).id
    engine.access.pair(identity)
    return engine.tokens.token_for(identity)


class TestHttps:
    def test_certificate_is_the_servers_identity(self, https_face):
        """The handshake presents the server's certificate: its SHA-256 is the identity in the banner."""
        engine, face = https_face
        der = certificate_of(face.address)
        assert engine.identity.id == format_id(hashlib.sha256(der).digest())

    def test_page_and_api_answer_over_https(self, https_face):
        """Over HTTPS the page and the API answer as over HTTP; the page's address says https."""
        _, face = https_face
        page, status = fetch(face.address, "/", secure=True), fetch(face.address, "/api/v1/status", secure=True)
        assert (True, 200, "active") == (face.url.startswith("https://127.0.0.1:"), page.status,
                                         status.json()["role"])

    def test_download_over_https_is_byte_exact(self, https_face, tmp_path):
        """A Range download over TLS (no sendfile there) gives exactly the bytes asked."""
        engine, face = https_face
        source = make_file(tmp_path / "in" / "big.bin", 3 * 1024 * 1024 + 5, seed=8)
        record = engine.add_file(source).record
        answer = fetch(face.address, f"/files/{record.sha256}/big.bin", {"Range": "bytes=1000-"}, secure=True)
        assert (206, source.read_bytes()[1000:]) == (answer.status, answer.body)

    def test_a_silent_client_does_not_block_others(self, https_face):
        """A stranger who connects and sends nothing (no handshake) does not delay another client's request."""
        _, face = https_face
        with socket.create_connection(face.address, timeout=SHORT_TIMEOUT) as silent:
            answer = fetch(face.address, "/api/v1/status", secure=True)
            silent.setblocking(False)
            with pytest.raises(BlockingIOError):  # still connected, still waiting: the other was served meanwhile
                silent.recv(1)
        assert 200 == answer.status

    def test_a_stalled_handshake_does_not_block_others(self, https_face):
        """A client that sends half a ClientHello and stalls does not delay another client's request."""
        _, face = https_face
        with socket.create_connection(face.address, timeout=SHORT_TIMEOUT) as stalled:
            stalled.sendall(b"\x16\x03\x01\x02\x00\x01")  # a handshake record's head, then nothing
            answer = fetch(face.address, "/api/v1/status", secure=True)
        assert 200 == answer.status

    def test_plain_http_to_the_https_port_is_told_to_use_https(self, https_face):
        """A plain-HTTP request on the HTTPS port gets a 400 JSON error naming the https address."""
        _, face = https_face
        answer = fetch(face.address, "/api/v1/status")
        assert (400, True) == (answer.status, f"https://127.0.0.1:{face.address[1]}/" in answer.json()["error"]["message"])

    def test_plain_http_is_refused_on_a_non_loopback_address(self, server_factory):
        """WebFace without TLS on 0.0.0.0 refuses to start, naming the key; nothing is bound."""
        engine = server_factory()
        face = WebFace(engine, "0.0.0.0", 0, io_timeout_s=SHORT_TIMEOUT)
        with pytest.raises(ConfigError) as refused:
            face.start()
        assert (True, 1) == ("server.main.http_tls" in str(refused.value), len(str(refused.value).splitlines()))

    def test_plain_http_on_localhost_is_allowed(self, server_factory, face_factory):
        """Plain HTTP may bind a loopback address (the demo's choice)."""
        face = face_factory(server_factory())
        assert (True, 200) == (face.url.startswith("http://127.0.0.1:"), fetch(face.address, "/").status)

    def test_main_with_plain_http_on_the_lan_exits_with_one_line(self, tmp_path):
        """main_server.py with http_tls: false on 0.0.0.0 exits 1 with one line naming the key."""
        config = write_config(tmp_path, {"server": {"main": {
            "host": "0.0.0.0", "port": free_port(), "http_port": free_port(), "http_tls": False, "data_dir": "srv"}}})
        result = subprocess.run([sys.executable, str(ROOT / "main_server.py"), "--config", str(config), "--headless"],
                                capture_output=True, text=True, timeout=LONG_TIMEOUT)
        assert (1, 1, True) == (result.returncode, len(result.stderr.strip().splitlines()),
                                "server.main.http_tls" in result.stderr)

    def test_config_serves_https_unless_turned_off(self, server_factory, tmp_path):
        """web_face_for: HTTPS by default, plain HTTP with http_tls: false."""
        engine = server_factory()
        default = make_config(tmp_path / "a", {"server": {"main": {"http_port": 0}}})
        plain = make_config(tmp_path / "b", {"server": {"main": {"http_port": 0, "http_tls": False}}})
        assert (True, False) == (web_face_for(engine, default).tls is not None,
                                 web_face_for(engine, plain).tls is not None)

    def test_standby_redirects_to_the_https_face(self, standby_backup, tmp_path):
        """A standby redirects to the main's face with https, keeping the path and its token."""
        config = make_config(tmp_path / "cfg", {"server": {"main": {"http_port": 5999}, "backup": {"http_port": 0}}})
        face = web_face_for(standby_backup, config)
        face.start()
        try:
            path = "/files/" + "a" * 64 + "/x.bin?token=abc"
            answer = fetch(face.address, path, secure=True)
        finally:
            face.stop()
        assert (307, f"https://127.0.0.1:5999{path}") == (answer.status, answer.headers["Location"])


class TestPairedAccess:
    def test_no_token_gets_401_as_json(self, paired):
        """Without a token the API, downloads, torrents and /metrics answer 401 NOT_PAIRED in the wire's words."""
        _, face, _, path = paired
        answers = [fetch(face.address, p, secure=True) for p in ("/api/v1/status", path, path + ".torrent", "/metrics")]
        expected = [(401, "NOT_PAIRED", "not paired: ask the server's operator for a token")] * 4
        assert expected == [(a.status, a.json()["error"]["code"], a.json()["error"]["message"]) for a in answers]

    def test_the_page_itself_loads_without_a_token(self, paired):
        """/, app.js and style.css load without a token (the page asks for one)."""
        _, face, _, _ = paired
        assert [200, 200, 200] == [fetch(face.address, p, secure=True).status for p in ("/", "/app.js", "/style.css")]

    def test_a_paired_clients_token_opens_the_api(self, paired, tmp_path):
        """A paired client's token as a Bearer header gets 200."""
        engine, face, _, _ = paired
        token = paired_client_token(engine, tmp_path)
        answer = fetch(face.address, "/api/v1/files", {"Authorization": f"Bearer {token}"}, secure=True)
        assert (200, [NAME]) == (answer.status, [f["name"] for f in answer.json()["files"]])

    def test_a_revoked_clients_token_stops_at_once(self, paired, tmp_path):
        """Right after revocation the same token gets 401."""
        engine, face, _, _ = paired
        token = paired_client_token(engine, tmp_path)
        before = fetch(face.address, "/api/v1/status?token=" + token, secure=True).status
        engine.revoke_client(load_or_create(tmp_path / "cli").id)
        after = fetch(face.address, "/api/v1/status?token=" + token, secure=True).status
        assert (200, 401) == (before, after)

    def test_a_forged_token_is_refused(self, paired, tmp_path):
        """A token with one character changed, or a token made with another key, gets 401."""
        engine, face, _, _ = paired
        token = paired_client_token(engine, tmp_path)
        forged = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
        assert [401, 401] == [fetch(face.address, "/api/v1/status?token=" + t, secure=True).status
                              for t in (forged, "x" * 64)]

    def test_range_download_with_the_token_in_the_query(self, paired, tmp_path):
        """?token= on a file link gets the Range asked (so plain links and curl -C - work)."""
        engine, face, source, path = paired
        token = paired_client_token(engine, tmp_path)
        answer = fetch(face.address, f"{path}?token={token}", {"Range": "bytes=100-199"}, secure=True)
        assert (206, source.read_bytes()[100:200]) == (answer.status, answer.body)

    def test_metrics_with_a_bearer_token(self, paired):
        """/metrics answers a scraper holding the operator's token as a Bearer header."""
        engine, face, _, _ = paired
        answer = fetch(face.address, "/metrics", {"Authorization": f"Bearer {engine.operator_token()}"}, secure=True)
        assert (200, True) == (answer.status, b"minitorrent_epoch" in answer.body)

    @pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
    def test_promtool_accepts_the_exposition_over_https(self, paired):
        """promtool check metrics accepts /metrics scraped over HTTPS with a Bearer token after a download."""
        engine, face, _, path = paired
        bearer = {"Authorization": f"Bearer {engine.operator_token()}"}
        fetch(face.address, path, bearer, secure=True)
        text = fetch(face.address, "/metrics", bearer, secure=True).body
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                                timeout=SHORT_TIMEOUT)
        assert (0, b"") == (result.returncode, result.stdout + result.stderr)

    def test_torrent_urls_carry_the_token(self, paired, tmp_path):
        """A token holder's .torrent names a web seed and a tracker that carry the same token."""
        lt = pytest.importorskip("libtorrent", reason="libtorrent (pip) reads the torrent as a BitTorrent client")
        engine, face, _, path = paired
        token = paired_client_token(engine, tmp_path)
        wait_until(lambda: engine.catalog.db.torrent_pieces(engine.catalog.db.get_file(NAME).sha256),
                   SHORT_TIMEOUT, "the indexer")
        metainfo = lt.bdecode(fetch(face.address, f"{path}.torrent?token={token}", secure=True).body)
        base = f"https://127.0.0.1:{face.address[1]}"
        assert ([f"{base}{path}?token={token}".encode()], f"{base}/announce?token={token}".encode()) == (
            metainfo[b"url-list"], metainfo[b"announce"])

    @pytest.mark.parametrize("key", ["token", "%74oken", "x=1&token"])
    def test_tokens_never_reach_the_log(self, paired, tmp_path, caplog, key):
        """A request with ?token= (however its key is spelled) logs its line with the token hidden."""
        engine, face, _, _ = paired
        token = paired_client_token(engine, tmp_path)
        caplog.set_level(logging.DEBUG)
        status = fetch(face.address, f"/api/v1/status?{key}={token}", secure=True).status
        wait_until(lambda: "/api/v1/status" in caplog.text, SHORT_TIMEOUT, "the request line in the log")
        assert (200, False) == (status, token in caplog.text)

    def test_open_mode_needs_no_token(self, https_face):
        """server.access: open: the API, downloads and /metrics answer without a token, as before."""
        _, face = https_face
        assert [200, 200] == [fetch(face.address, p, secure=True).status for p in ("/api/v1/status", "/metrics")]


class TestTokenCommands:
    @pytest.mark.timeout(LONG_TIMEOUT * 2)
    def test_client_and_operator_tokens_from_the_command_line(self, tmp_path, server_process):
        """client.py pair then client.py token prints a token the running server's face accepts; so does
        main_server.py token; after revoke, the client's token gets 401 and client.py token fails in one line."""
        settings = {"server": {"access": "paired", "main": {"port": free_port(), "http_port": free_port()},
                               "backup": {"port": 0}},
                    "client": {"retry_deadline": 2}, "logging": {"log_to_file": False}}
        config = write_config(tmp_path, settings)
        server = server_process(config)
        loaded = load_config(config)
        address = ("127.0.0.1", loaded.server.main.http_port)
        access = wait_until(lambda: fetch(address, "/", secure=True), LONG_TIMEOUT, "the web face")
        main_server = [sys.executable, str(ROOT / "main_server.py"), "--config", str(config)]
        pair = subprocess.Popen(main_server + ["pair"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            run_client(config, "pair", pair.stdout.readline().split()[2])
            pair.communicate(timeout=LONG_TIMEOUT)
        finally:
            pair.kill()
            pair.wait()
        token = run_client(config, "token").stdout.strip()
        operator = subprocess.run(main_server + ["token"], capture_output=True, text=True, timeout=LONG_TIMEOUT)
        with_token = fetch(address, "/api/v1/status?token=" + token, secure=True).status
        with_operator = fetch(address, "/api/v1/status?token=" + operator.stdout.strip(), secure=True).status
        identity = load_or_create(loaded.client.data_dir).id
        subprocess.run(main_server + ["revoke", identity], capture_output=True, timeout=LONG_TIMEOUT, check=True)
        revoked = fetch(address, "/api/v1/status?token=" + token, secure=True).status
        refused = run_client(config, "token")
        banner = list(server.stdout_lines)
        server.stop()
        assert (200, 200, 200, 401) == (access.status, with_token, with_operator, revoked)
        assert (1, 1, True) == (refused.returncode, len(refused.stderr.strip().splitlines()),
                                "not paired" in refused.stderr)
        assert (True, False) == ("web token (server.access: paired): python main_server.py token" in banner,
                                 any(operator.stdout.strip() in line for line in banner))
