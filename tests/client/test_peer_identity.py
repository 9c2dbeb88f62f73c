"""A downloader pins each seeder to the identity the tracker gave: an impostor serves it nothing."""
from __future__ import annotations

import pytest
from conftest import LONG_TIMEOUT, SHORT_TIMEOUT, make_config, make_file

from integrity import Manifest, sha256_file
from minitorrent.client.engine import ClientEngine
from minitorrent.client.seeding import SeedSource
from minitorrent.net.remote import ServerSession
from minitorrent.net.serving import RequestServer
from minitorrent.wire import protocol
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.tls import ClientTls, ServerTls

MIB = 1024 * 1024


class TestPeerPinning:
    @pytest.mark.parametrize("same_identity", [True, False], ids=["announced-identity", "impostor"])
    @pytest.mark.timeout(LONG_TIMEOUT)
    def test_only_the_announced_identity_serves_chunks(self, tmp_path, server_factory, same_identity):
        """A seeder with the identity it announced helps; one presenting another identity is dropped unread."""
        server = server_factory({"transfer": {"upload_limit": 2_000_000, "chunk_size": 128 * 1024}})
        source = make_file(tmp_path / "src" / "movie.bin", 4 * MIB, seed=4)
        server.add_file(source)
        manifest = Manifest.from_header(*server.catalog.manifest("movie.bin"))
        announcer = load_or_create(tmp_path / "announcer")
        presented = announcer if same_identity else load_or_create(tmp_path / "impostor")
        seed_source = SeedSource()
        seed_source.add_complete(source, "movie.bin", manifest)
        seeder = RequestServer(seed_source, host="127.0.0.1", port=0, name="seeder", max_connections=4,
                               idle_timeout_s=SHORT_TIMEOUT, io_timeout_s=SHORT_TIMEOUT, tls=ServerTls(presented))
        seed_port = seeder.start()[1]
        session = ServerSession.open(*server.server.address, io_timeout_s=SHORT_TIMEOUT,
                                     secure=ClientTls(identity=announcer))
        session.call(protocol.Announce(seed_port), protocol.Ok, protocol.encode_holdings({manifest.sha256: None}))
        session.close()
        host, port = server.server.address
        engine = ClientEngine(make_config(tmp_path / "cli", {"server": {"main": {"host": host, "port": port}},
                                                            "client": {"seeding": False}}))
        try:
            result = engine.download("movie.bin", tmp_path / "out")
        finally:
            engine.close()
            seeder.stop()
        assert sha256_file(source) == sha256_file(result.path)
        assert same_identity == (seeder.metrics.snapshot()["bytes_sent"] > 0)
