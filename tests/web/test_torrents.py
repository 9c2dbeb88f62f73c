"""Torrents of shared files: bencode, merkle hashes checked against libtorrent, the indexer, /announce,
and a real BitTorrent client (libtorrent) downloading from the web seed and swarming through the tracker."""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import (
    LONG_TIMEOUT,
    SHORT_TIMEOUT,
    client_config_for,
    make_file,
    run_client,
    wait_until,
)
from webfixtures import face_factory, fetch, standby_backup  # noqa: F401 - fixtures used by name

from database import ServerStore
from integrity import manifest_of_file, sha256_file
from minitorrent.web import torrents
from minitorrent.web.bencode import bencode
from minitorrent.web.face import paired_access
from minitorrent.web.indexer import TorrentIndexer
from minitorrent.wire.tls import ServerTls

lt = pytest.importorskip("libtorrent", reason="libtorrent (pip) checks what a real BitTorrent client sees")

CHUNK = 64 * 1024  # small pieces: many of them in a small file
SIZE = 5 * CHUNK + 1234  # six pieces, the last one short


def lt_session(**settings) -> "lt.session":
    """A libtorrent session on 127.0.0.1 only: TCP, no DHT, LSD, UPnP or NAT-PMP (plus ``settings``)."""
    return lt.session({"listen_interfaces": "127.0.0.1:0", "enable_dht": False, "enable_lsd": False,
                       "enable_upnp": False, "enable_natpmp": False, "enable_outgoing_utp": False,
                       "enable_incoming_utp": False, "allow_multiple_connections_per_ip": True,
                       "alert_mask": lt.alert_category.error, **settings})


def lt_add(session, torrent: bytes, save_path: Path, web_seed: bool = True):
    """Add the .torrent ``torrent`` to ``session``, saving under ``save_path``; without ``web_seed`` only peers serve it."""
    metainfo = lt.bdecode(torrent)
    if not web_seed:
        del metainfo[b"url-list"]  # outside the info dictionary: the info hashes stay the same
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(metainfo)
    params.save_path = str(save_path)
    return session.add_torrent(params)


def libtorrent_info(path: Path, piece_length: int) -> dict:
    """libtorrent's own hybrid torrent of ``path`` (``create_torrent``), as a bdecoded dict."""
    creator = lt.create_torrent(lt.list_files(str(path)), piece_length)
    lt.set_piece_hashes(creator, str(path.parent))
    return creator.generate()


@pytest.fixture
def shared(server_factory, face_factory, tmp_path: Path):
    """(engine, face, source, .torrent path) for a main server with 64 KiB chunks, its file indexed."""
    engine = server_factory({"transfer": {"chunk_size": CHUNK}})
    name = "swarm file é.bin"
    source = make_file(tmp_path / "in" / name, SIZE, seed=5)
    record = engine.add_file(source).record
    face = face_factory(engine)
    wait_until(lambda: engine.catalog.db.torrent_pieces(record.sha256), SHORT_TIMEOUT, "the indexer")
    wait_until(lambda: not engine.catalog.db.names_without_torrent(1), SHORT_TIMEOUT, "the info hashes")
    return engine, face, source, f"/files/{record.sha256}/{quote(name)}.torrent"


class TestBencode:
    @pytest.mark.parametrize("value, expected", [
        (42, b"i42e"), (-3, b"i-3e"), (0, b"i0e"), (b"spam", b"4:spam"), ("été", b"5:\xc3\xa9t\xc3\xa9"),
        ([1, b"a"], b"li1e1:ae"), ({"b": 1, "a": [], b"\x00": b""}, b"d1:\x000:1:ale1:bi1ee"),
    ])
    def test_encoding(self, value, expected):
        """Each value has its one bencoding; dict keys sorted by raw bytes."""
        assert expected == bencode(value)

    @pytest.mark.parametrize("value", [1.5, None, True])
    def test_refuses_what_bencode_cannot_say(self, value):
        """A float, None or a bool raises TypeError."""
        with pytest.raises(TypeError):
            bencode(value)


class TestPieceHashes:
    @pytest.mark.parametrize("size", [1, 16384, 16385, CHUNK, CHUNK + 1, 4 * CHUNK, SIZE])
    def test_same_as_libtorrent(self, tmp_path, size):
        """Our info dictionary, pieces root and piece layer are byte for byte libtorrent's own."""
        path = make_file(tmp_path / f"f{size}.bin", size, seed=size)
        ours = torrents.hash_pieces(path, size, CHUNK)
        theirs = libtorrent_info(path, CHUNK)
        root = theirs[b"info"][b"file tree"][path.name.encode()][b""][b"pieces root"]
        expected = (lt.bencode(theirs[b"info"]), root, theirs.get(b"piece layers", {}).get(root, b""))
        assert expected == (bencode(torrents.info_dict(path.name, size, ours)), ours.pieces_root, ours.piece_layer)

    @pytest.mark.parametrize("chunk_size, expected", [(1048576, 1048576), (1000000, 524288), (1024, 16384),
                                                      (16384, 16384), (16 * 1048576, 16 * 1048576)])
    def test_piece_length(self, chunk_size, expected):
        """The piece length is the chunk size when it is a power of two of 16 KiB or more, else one below."""
        assert expected == torrents.piece_length_for(chunk_size)


class TestIndexer:
    def test_catalog_from_before_gets_its_hashes(self, tmp_path):
        """A schema-1 catalog opens at the current schema, keeps its files, and the indexer fills their hashes."""
        class OldStore(ServerStore):
            MIGRATIONS = ServerStore.MIGRATIONS[:1]

        source = make_file(tmp_path / "old.bin", SIZE, seed=1)
        manifest = manifest_of_file(source, CHUNK)
        with OldStore(tmp_path / "catalog.db"):
            pass  # schema 1, and the row as version 1 wrote it (today's add_file writes today's columns)
        with contextlib.closing(sqlite3.connect(tmp_path / "catalog.db")) as old, old:
            old.execute("INSERT INTO files (name, name_folded, size, chunk_size, sha256, chunk_digests, added_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)", ("old.bin", "old.bin", manifest.size, manifest.chunk_size,
                                                          manifest.sha256, manifest.chunk_digests, 1.0))
        from minitorrent.server.catalog import Catalog

        (tmp_path / "store").mkdir()
        (tmp_path / "store" / manifest.sha256).write_bytes(source.read_bytes())
        catalog = Catalog(tmp_path, CHUNK)
        try:
            TorrentIndexer(catalog).index_once()
            pieces = catalog.db.torrent_pieces(manifest.sha256)
            expected = torrents.hash_pieces(source, SIZE, CHUNK)
            assert (len(ServerStore.MIGRATIONS), ["old.bin"], expected) == (catalog.db.schema_version,
                                                  [r.name for r in catalog.db.list_files()], pieces)
        finally:
            catalog.close()

    def test_removed_names_are_pruned(self, shared):
        """After a file is removed, its torrent rows go and its info hash is unknown to the tracker."""
        engine, face, source, _ = shared
        engine.remove_file(source.name)
        wait_until(lambda: engine.catalog.db.torrent_pieces(sha256_file(source)) is None, SHORT_TIMEOUT, "pruning")
        with sqlite3.connect(engine.catalog.db.path) as connection:
            assert 0 == connection.execute("SELECT COUNT(*) FROM torrent_names").fetchone()[0]


class TestTorrentFile:
    def test_torrent_names_web_seed_and_tracker(self, shared):
        """The .torrent is hybrid, its web seed is the file's URL and its tracker our /announce."""
        engine, face, source, path = shared
        answer = fetch(face.address, path)
        metainfo = lt.bdecode(answer.body)
        hashes = lt.torrent_info(metainfo).info_hashes()
        base = f"http://{face.address[0]}:{face.address[1]}"
        expected = (200, "application/x-bittorrent", [(base + path.removesuffix(".torrent")).encode()],
                    (base + "/announce").encode(), True, True, CHUNK)
        assert expected == (answer.status, answer.headers["Content-Type"], metainfo[b"url-list"],
                            metainfo[b"announce"], hashes.has_v1(), hashes.has_v2(), metainfo[b"info"][b"piece length"])

    def test_a_file_named_torrent_is_served_as_itself(self, shared, tmp_path):
        """A shared file whose own name ends in .torrent is downloaded, not wrapped in another torrent."""
        engine, face, _, _ = shared
        source = make_file(tmp_path / "in" / "linux.iso.torrent", 500, seed=2)
        record = engine.add_file(source).record
        answer = fetch(face.address, f"/files/{record.sha256}/linux.iso.torrent")
        assert source.read_bytes() == answer.body

    def test_standby_redirects_torrents(self, standby_backup, face_factory):
        """On standby a .torrent request is redirected like a download."""
        face = face_factory(standby_backup, redirect_to="http://127.0.0.1:5999")
        answer = fetch(face.address, "/files/" + "b" * 64 + "/x.bin.torrent")
        assert 307 == answer.status


def announce_path(info_hash: bytes, port: int, left: int = 0, event: str = "") -> str:
    query = f"info_hash={quote(info_hash, safe='')}&peer_id={quote(b'-XX0001-' + bytes(12))}&port={port}" \
            f"&uploaded=0&downloaded=0&left={left}&compact=1"
    return "/announce?" + query + (f"&event={event}" if event else "")


class TestAnnounce:
    def test_second_peer_gets_the_first_compactly(self, shared):
        """A peer announcing after another gets its 6-byte compact entry, and not itself."""
        engine, face, source, _ = shared
        info_hash = lt.torrent_info(lt.bdecode(fetch(face.address, shared[3]).body)).info_hashes().v1.to_bytes()
        fetch(face.address, announce_path(info_hash, 6881))
        reply = lt.bdecode(fetch(face.address, announce_path(info_hash, 6882, left=SIZE)).body)
        assert bytes([127, 0, 0, 1]) + (6881).to_bytes(2, "big") == reply[b"peers"]

    def test_v2_hash_announces_reach_the_same_swarm(self, shared):
        """An announce with the truncated v2 info hash finds the peer that announced with the v1 hash."""
        engine, face, source, path = shared
        hashes = lt.torrent_info(lt.bdecode(fetch(face.address, path).body)).info_hashes()
        fetch(face.address, announce_path(hashes.v1.to_bytes(), 6881))
        reply = lt.bdecode(fetch(face.address, announce_path(hashes.v2.to_bytes()[:20], 6882)).body)
        assert 6 == len(reply[b"peers"])

    def test_unknown_torrent_fails(self, shared):
        """An info hash of no shared file gets a bencoded failure reason."""
        _, face, _, _ = shared
        reply = lt.bdecode(fetch(face.address, announce_path(bytes(20), 6881)).body)
        assert True == reply[b"failure reason"].startswith(b"unknown torrent")

    def test_stopped_peer_is_forgotten(self, shared):
        """event=stopped removes the peer from the swarm."""
        engine, face, _, path = shared
        info_hash = lt.torrent_info(lt.bdecode(fetch(face.address, path).body)).info_hashes().v1.to_bytes()
        fetch(face.address, announce_path(info_hash, 6881))
        fetch(face.address, announce_path(info_hash, 6881, event="stopped"))
        assert 0 == face.bittorrent.peer_count()


class TestLibtorrent:
    def test_downloads_from_the_web_seed_and_announces(self, shared, tmp_path):
        """libtorrent downloads a byte-exact copy from the web seed alone, announcing to our tracker."""
        engine, face, source, path = shared
        session = lt_session()
        handle = lt_add(session, fetch(face.address, path).body, tmp_path / "lt")
        wait_until(lambda: handle.status().is_seeding, LONG_TIMEOUT, "libtorrent to finish")
        wait_until(lambda: face.bittorrent.peer_count() == 1, SHORT_TIMEOUT, "libtorrent's announce")
        assert sha256_file(source) == sha256_file(tmp_path / "lt" / source.name)

    def test_token_holder_downloads_over_https_in_paired_mode(self, server_factory, face_factory, tmp_path):
        """Paired mode over HTTPS: the torrent fetched with a token lets libtorrent (told to accept the
        self-signed certificate) download from the web seed and announce, both carrying that token."""
        engine = server_factory({"server": {"access": "paired"}, "transfer": {"chunk_size": CHUNK}})
        source = make_file(tmp_path / "in" / "paired.bin", SIZE, seed=6)
        record = engine.add_file(source).record
        face = face_factory(engine, tls=ServerTls(engine.identity), authorize=paired_access(engine.tokens))
        wait_until(lambda: engine.catalog.db.torrent_pieces(record.sha256), SHORT_TIMEOUT, "the indexer")
        wait_until(lambda: not engine.catalog.db.names_without_torrent(1), SHORT_TIMEOUT, "the info hashes")
        body = fetch(face.address, f"/files/{record.sha256}/paired.bin.torrent?token={engine.operator_token()}",
                     secure=True).body
        # libtorrent refuses a web seed on *localhost* whose URL has a query (its SSRF guard); on a LAN address it
        # does not apply, so only this test on 127.0.0.1 turns the guard off.
        session = lt_session(validate_https_trackers=False, ssrf_mitigation=False)
        handle = lt_add(session, body, tmp_path / "lt")
        wait_until(lambda: handle.status().is_seeding, LONG_TIMEOUT, "libtorrent to finish")
        wait_until(lambda: face.bittorrent.peer_count() == 1, SHORT_TIMEOUT, "libtorrent's announce")
        assert sha256_file(source) == sha256_file(tmp_path / "lt" / "paired.bin")

    def test_swarm_beside_a_minitorrent_client(self, shared, tmp_path):
        """A libtorrent leecher gets the file from a libtorrent seeder found through /announce (no web seed),
        while a MiniTorrent client downloads it too; neither tracker hears of the other's peers."""
        engine, face, source, path = shared
        body = fetch(face.address, path).body
        seed_dir = tmp_path / "seeder"
        seed_dir.mkdir()
        (seed_dir / source.name).write_bytes(source.read_bytes())
        seeder_session, leecher_session = lt_session(), lt_session()
        seeder = lt_add(seeder_session, body, seed_dir, web_seed=False)
        wait_until(lambda: seeder.status().is_seeding and face.bittorrent.peer_count() == 1, LONG_TIMEOUT,
                   "the seeder to check its copy and announce")
        leecher = lt_add(leecher_session, body, tmp_path / "leecher", web_seed=False)
        client = run_client(client_config_for(tmp_path / "client", engine.server.address), "get", source.name)
        wait_until(lambda: leecher.status().is_seeding, LONG_TIMEOUT, "the leecher to finish from the seeder")
        digest = sha256_file(source)
        bittorrent_ports = {port for _, port, _, _ in face.bittorrent.peers()}
        minitorrent_ports = {port for _, port, _, _ in engine.server.tracker.peers()}
        assert (0, digest, digest, {seeder_session.listen_port(), leecher_session.listen_port()}, set()) == (
            client.returncode, sha256_file(tmp_path / "leecher" / source.name),
            sha256_file(tmp_path / "client" / "downloads" / source.name), bittorrent_ports,
            bittorrent_ports & minitorrent_ports)
