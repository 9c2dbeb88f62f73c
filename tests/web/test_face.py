"""The web face over real sockets: JSON API, errors, /metrics, downloads with Range, standby redirects."""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import ROOT, SHORT_TIMEOUT, make_file, wait_until, write_config
from webfixtures import face_factory, fetch, standby_backup  # noqa: F401 - fixtures used by name

from config_loader import load_config
from integrity import sha256_file
from minitorrent.common.launcher import ServerProcess
from minitorrent.web.errors import HttpError
from minitorrent.web.face import WebFace
from minitorrent.wire.protocol import ErrorCode

SIZE = 3 * 1024 * 1024 + 17  # three whole chunks and a short last one
NAME = "holiday photos été.bin"


@pytest.fixture
def shared(server_factory, face_factory, tmp_path: Path):
    """(engine, face, source file, download path) for a main server sharing one file."""
    engine = server_factory()
    source = make_file(tmp_path / "in" / NAME, SIZE, seed=3)
    record = engine.add_file(source).record
    face = face_factory(engine)
    return engine, face, source, f"/files/{record.sha256}/{quote(NAME)}"


class TestApi:
    def test_files_page_lists_matches_with_links(self, shared):
        """/api/v1/files?search= finds the file in any case and gives its download link and total."""
        engine, face, _, path = shared
        body = fetch(face.address, "/api/v1/files?search=" + quote("ÉTÉ")).json()
        assert (1, [NAME], path) == (body["total"], [f["name"] for f in body["files"]],
                                      body["files"][0]["links"]["download"])

    def test_files_page_is_paged(self, shared, tmp_path):
        """offset and limit page the catalog; total counts every match."""
        engine, face, _, _ = shared
        for index in range(3):
            engine.add_file(make_file(tmp_path / "more" / f"page{index}.txt", 10, seed=index))
        body = fetch(face.address, "/api/v1/files?search=page&offset=1&limit=1").json()
        assert (3, ["page1.txt"]) == (body["total"], [f["name"] for f in body["files"]])

    def test_one_file_has_its_manifest(self, shared):
        """/api/v1/files/<name> gives the file's whole SHA-256 and one digest per chunk."""
        engine, face, source, _ = shared
        body = fetch(face.address, "/api/v1/files/" + quote(NAME)).json()
        manifest = engine.catalog.db.get_manifest(NAME)
        expected = [manifest.chunk_digests[i * 32:(i + 1) * 32].hex() for i in range(4)]
        assert (sha256_file(source), expected) == (body["sha256"], body["manifest"]["chunk_sha256"])

    def test_status_names_role_and_epoch(self, shared):
        """/api/v1/status says main, active, its epoch and the file count."""
        engine, face, _, _ = shared
        body = fetch(face.address, "/api/v1/status").json()
        assert ("main", "active", engine.node.epoch, 1) == (body["server"], body["role"], body["epoch"], body["files"])

    def test_peers_lists_the_trackers_peers(self, shared):
        """/api/v1/peers lists a seeding client the tracker heard from."""
        engine, face, _, _ = shared
        engine.server.tracker.announce("127.0.0.1", 6881, {"ab" * 32: None})
        body = fetch(face.address, "/api/v1/peers").json()
        assert [("127.0.0.1", 6881, 1)] == [(p["host"], p["port"], p["files"]) for p in body["peers"]]

    def test_log_gives_recent_lines(self, shared, tmp_path, caplog):
        """/api/v1/log holds the lines logged since the face started (a file added)."""
        engine, face, _, _ = shared
        caplog.set_level(logging.INFO)
        engine.add_file(make_file(tmp_path / "more" / "logged.txt", 10))
        lines = fetch(face.address, "/api/v1/log").json()["lines"]
        assert True == any("added logged.txt" in line["message"] for line in lines)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


class TestIpv6:
    @pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
    def test_face_on_an_ipv6_host(self, server_factory):
        """A face on ::1 binds, gives a bracketed URL, and answers."""
        face = WebFace(server_factory(), "::1", 0, io_timeout_s=SHORT_TIMEOUT)
        face.start()
        try:
            answer = fetch(face.address, "/api/v1/status")
        finally:
            face.stop()
        assert (True, 200) == (face.url.startswith("http://[::1]:"), answer.status)


class TestErrors:
    @pytest.mark.parametrize("path, status, code", [
        ("/api/v1/files/nothing-here", 404, "NOT_FOUND"),
        ("/api/v1/nonsense", 404, "NOT_FOUND"),
        ("/api/v1/files?limit=many", 400, "BAD_REQUEST"),
        ("/api/v1/files?offset=-1", 400, "BAD_REQUEST"),
        ("/nowhere", 404, "NOT_FOUND"),
        ("/files/" + "0" * 64 + "/x.bin", 404, "NOT_FOUND"),
    ])
    def test_errors_are_json_with_wire_codes(self, shared, path, status, code):
        """A bad request gets its HTTP status and a JSON body with the wire protocol's code."""
        _, face, _, _ = shared
        answer = fetch(face.address, path)
        assert (status, "application/json", code) == (answer.status, answer.headers["Content-Type"],
                                                       answer.json()["error"]["code"])

    def test_authorize_seam_can_refuse(self, server_factory, face_factory):
        """An ``authorize`` that raises refuses the request with its code."""
        def paired_only(path: str, token: str) -> None:
            if not token:
                raise HttpError(ErrorCode.AUTH_FAILED, "pair this device first")

        face = face_factory(server_factory(), authorize=paired_only)
        answer = fetch(face.address, "/api/v1/status")
        assert (401, "AUTH_FAILED") == (answer.status, answer.json()["error"]["code"])

    def test_other_methods_get_405(self, shared):
        """A POST gets 405 UNKNOWN_REQUEST as JSON."""
        _, face, _, _ = shared
        answer = fetch(face.address, "/api/v1/status", method="POST")
        assert (405, "UNKNOWN_REQUEST") == (answer.status, answer.json()["error"]["code"])

    def test_replaced_content_is_gone(self, shared, tmp_path):
        """After the name is removed and re-added with other bytes, the old address answers 410 STALE_VERSION."""
        engine, face, _, path = shared
        engine.remove_file(NAME)
        engine.add_file(make_file(tmp_path / "new" / NAME, 100, seed=9))
        answer = fetch(face.address, path)
        assert (410, "STALE_VERSION") == (answer.status, answer.json()["error"]["code"])

    def test_busy_face_refuses_with_503(self, server_factory, face_factory):
        """With every connection slot taken, a new connection gets 503 BUSY."""
        face = face_factory(server_factory(), max_connections=1)
        with socket.create_connection(face.address, timeout=SHORT_TIMEOUT) as holder:
            holder.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
            holder.recv(1)  # answered: the slot is held while the connection stays open
            answer = fetch(face.address, "/api/v1/status")
        assert (503, "BUSY") == (answer.status, answer.json()["error"]["code"])


class TestDownloads:
    def test_whole_file_is_byte_exact(self, shared):
        """A plain GET gets 200 and the file's exact bytes, with its SHA-256 as a strong ETag."""
        _, face, source, path = shared
        answer = fetch(face.address, path)
        assert (200, source.read_bytes(), f'"{sha256_file(source)}"') == (answer.status, answer.body,
                                                                          answer.headers["ETag"])

    @pytest.mark.parametrize("header, first, last", [
        ("bytes=0-99", 0, 99),
        ("bytes=1000-", 1000, SIZE - 1),  # open-ended
        (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),  # the last byte
        ("bytes=-10", SIZE - 10, SIZE - 1),  # a suffix
        (f"bytes=5-{SIZE + 1000}", 5, SIZE - 1),  # an end past the file is clipped
    ])
    def test_range_gets_206_with_those_bytes(self, shared, header, first, last):
        """A satisfiable Range gets 206, its Content-Range and exactly those bytes."""
        _, face, source, path = shared
        answer = fetch(face.address, path, {"Range": header})
        expected = (206, f"bytes {first}-{last}/{SIZE}", source.read_bytes()[first:last + 1])
        assert expected == (answer.status, answer.headers["Content-Range"], answer.body)

    @pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 9}", "bytes=-0"])
    def test_range_beyond_the_end_gets_416(self, shared, header):
        """A range holding no byte of the file gets 416 with Content-Range bytes */size."""
        _, face, _, path = shared
        answer = fetch(face.address, path, {"Range": header})
        assert (416, f"bytes */{SIZE}", "OUT_OF_RANGE") == (answer.status, answer.headers["Content-Range"],
                                                            answer.json()["error"]["code"])

    def test_if_range_with_stale_etag_gets_the_whole_file(self, shared):
        """If-Range naming another ETag: the range is ignored and the whole file comes with 200."""
        _, face, source, path = shared
        answer = fetch(face.address, path, {"Range": "bytes=10-", "If-Range": '"' + "0" * 64 + '"'})
        assert (200, source.read_bytes()) == (answer.status, answer.body)

    def test_if_range_with_current_etag_gets_the_range(self, shared):
        """If-Range naming our ETag: the range is honoured."""
        _, face, source, path = shared
        etag = f'"{sha256_file(source)}"'
        answer = fetch(face.address, path, {"Range": "bytes=10-", "If-Range": etag})
        assert (206, source.read_bytes()[10:]) == (answer.status, answer.body)

    def test_head_sends_headers_only(self, shared):
        """HEAD gets the length and no body."""
        _, face, _, path = shared
        answer = fetch(face.address, path, method="HEAD")
        assert (200, str(SIZE), b"") == (answer.status, answer.headers["Content-Length"], answer.body)

    @pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
    def test_curl_resumes_a_cut_download(self, shared, tmp_path):
        """curl -C - completes a partial file into a byte-exact copy."""
        _, face, source, path = shared
        partial = tmp_path / "partial.bin"
        partial.write_bytes(source.read_bytes()[:12345])
        url = f"http://{face.address[0]}:{face.address[1]}{path}"
        subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", str(partial), url], check=True, timeout=SHORT_TIMEOUT)
        assert sha256_file(source) == sha256_file(partial)


class TestStandby:
    def test_standby_redirects_downloads_to_the_other_face(self, standby_backup, face_factory):
        """On standby, /files/... answers 307 with the same path on the other server's web face."""
        face = face_factory(standby_backup, redirect_to="http://127.0.0.1:5999")
        path = "/files/" + "a" * 64 + "/x.bin"
        answer = fetch(face.address, path)
        assert (307, f"http://127.0.0.1:5999{path}") == (answer.status, answer.headers["Location"])

    def test_standby_without_a_known_face_refuses(self, standby_backup, face_factory):
        """On standby with no other web face to send to, /files/... answers 503 STANDBY."""
        face = face_factory(standby_backup)
        answer = fetch(face.address, "/files/" + "a" * 64 + "/x.bin")
        assert (503, "STANDBY") == (answer.status, answer.json()["error"]["code"])

    def test_status_follows_a_promotion(self, standby_backup, face_factory):
        """/api/v1/status flips from standby to active, with a higher epoch, when the backup takes over."""
        face = face_factory(standby_backup)
        before = fetch(face.address, "/api/v1/status").json()
        standby_backup.promote_now()
        after = fetch(face.address, "/api/v1/status").json()
        assert (("standby", "active"), True) == ((before["role"], after["role"]), after["epoch"] > before["epoch"])


class TestMetrics:
    def test_counters_rise_after_a_download(self, shared):
        """After a whole download, /metrics counts it for that file and the HTTP bytes include it."""
        _, face, _, path = shared
        fetch(face.address, path)
        counted = f'minitorrent_file_downloads_total{{file="{NAME}"}} 1.0'

        def metrics_once_counted() -> str | None:
            text = fetch(face.address, "/metrics").body.decode()
            return text if counted in text else None

        # The server counts once sendfile returns, which may be just after the client has every byte.
        text = wait_until(metrics_once_counted, SHORT_TIMEOUT, "the download to be counted")
        sent = next(line for line in text.splitlines() if line.startswith('minitorrent_sent_bytes_total{channel="http"}'))
        assert True == (float(sent.split()[-1]) >= SIZE)

    def test_role_and_epoch_are_exported(self, shared):
        """/metrics says which role the server holds and its epoch."""
        engine, face, _, _ = shared
        text = fetch(face.address, "/metrics").body.decode()
        assert (True, True) == ('minitorrent_role{role="active"} 1.0' in text,
                                f"minitorrent_epoch {float(engine.node.epoch)}" in text)

    @pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
    def test_promtool_accepts_the_exposition(self, shared):
        """promtool check metrics finds no problem in /metrics after some traffic."""
        _, face, _, path = shared
        fetch(face.address, path, {"Range": "bytes=0-9"})
        fetch(face.address, path)
        text = fetch(face.address, "/metrics").body
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                                timeout=SHORT_TIMEOUT)
        assert (0, b"") == (result.returncode, result.stdout + result.stderr)


class TestPrograms:
    def test_written_configs_have_no_web_face_unless_asked(self, tmp_path):
        """launcher.write_config turns the web face off (-1) where a config names no http_port."""
        config = load_config(write_config(tmp_path, {"server": {"backup": {"http_port": 0}}}))
        assert (-1, 0) == (config.server.main.http_port, config.server.backup.http_port)

    def test_headless_main_prints_the_page_address(self, tmp_path):
        """main_server.py --headless with http_port 0 prints the page's https address, and the page answers there."""
        config = write_config(tmp_path, {"server": {"main": {"port": 0, "http_port": 0, "data_dir": "srv"}}})
        process = ServerProcess(config)
        try:
            line = wait_until(lambda: next((l for l in process.stdout_lines if l.startswith("web page: ")), None),
                              what="the web page line")
            url = line.split()[-1]
            host, port = url.removeprefix("https://").rstrip("/").split(":")
            answer = fetch((host, int(port)), "/", secure=True)
        finally:
            process.stop()
        assert (True, 200, True) == (url.startswith("https://"), answer.status, b"<html" in answer.body)

    def test_taken_http_port_is_a_one_line_error(self, tmp_path):
        """A web face port already in use stops the server with exit 1 and one line naming it."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = write_config(tmp_path, {"server": {"main": {"port": 0, "http_port": port, "data_dir": "srv"}}})
            result = subprocess.run(["python3", str(ROOT / "main_server.py"), "--config", str(config), "--headless"],
                                    capture_output=True, text=True, timeout=60)
        assert (1, 1, True) == (result.returncode, len(result.stderr.strip().splitlines()),
                                f"127.0.0.1:{port}" in result.stderr)
