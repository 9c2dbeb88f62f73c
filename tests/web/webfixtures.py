"""Fixtures and helpers of the web face's tests (imported by name: a second conftest would clash with tests/conftest.py)."""
from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import SHORT_TIMEOUT, make_config

from minitorrent.server.backup import BackupServer
from minitorrent.server.engine import ServerEngine
from minitorrent.web.face import WebFace
from minitorrent.wire.tls import client_context


@dataclass
class Answer:
    """One HTTP response, read whole."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def fetch(address: tuple[str, int], path: str, headers: dict | None = None, method: str = "GET",
          secure: bool = False) -> Answer:
    """One request on a fresh connection to ``address`` (HTTPS if ``secure``, any certificate: tests check it apart)."""
    if secure:
        connection = http.client.HTTPSConnection(*address, timeout=SHORT_TIMEOUT, context=client_context())
    else:
        connection = http.client.HTTPConnection(*address, timeout=SHORT_TIMEOUT)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


@pytest.fixture
def face_factory() -> Iterator[Callable[..., WebFace]]:
    """Start web faces on 127.0.0.1 port 0 for engines; all are stopped (before their engines) after the test."""
    started: list[WebFace] = []

    def start(engine: ServerEngine, **options) -> WebFace:
        face = WebFace(engine, "127.0.0.1", 0, io_timeout_s=SHORT_TIMEOUT, **options)
        face.start()
        started.append(face)
        return face

    yield start
    for face in started:
        face.stop()


@pytest.fixture
def standby_backup(tmp_path: Path) -> Iterator[BackupServer]:
    """A started backup server that hears no main and stays on standby for a minute."""
    config = make_config(tmp_path / "backup", {"server": {"secret": "s", "backup": {
        "port": 0, "data_dir": "backup", "heartbeat_interval": 1.0, "heartbeat_timeout": 60.0}}})
    engine = BackupServer(config)
    engine.start()
    yield engine
    engine.stop()
