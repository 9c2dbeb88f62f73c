"""Listing over the wire: cursor pages served by serving.py, followed by remote.Listing.

A real ``RequestServer`` on 127.0.0.1 port 0 serves a real ``Catalog`` (an
SQLite file in tmp_path), sometimes through a wrapper that changes the
catalog between pages or lies on purpose; an inline server speaks protocol 1's
offset paging.
"""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import SHORT_TIMEOUT, SlowProxy

from integrity import Manifest
from minitorrent.net.remote import ServerClient, ServerSession
from minitorrent.net.serving import ListingPage, RequestServer
from minitorrent.server.catalog import Catalog
from minitorrent.wire import protocol
from minitorrent.wire.protocol import FileList, FrameDecoder, ListFiles, RemoteProtocolError, encode_frame

ADDED_AT = 1000.5  # exactly representable: listing entries carry it to 15 significant digits
SHA = "ab" * 32


def manifest(size: int = 10) -> Manifest:
    return Manifest(size, 4, SHA, bytes(32 * -(-size // 4)))


def add_names(catalog: Catalog, names: list[str]) -> None:
    """Catalog ``names`` directly (listing needs no stored bytes)."""
    catalog.db.add_files([(name, manifest(), ADDED_AT) for name in names])


class CountingSource:
    """A catalog as a ``FileSource`` that counts the counts asked of it and may act between pages."""

    def __init__(self, catalog: Catalog, between_pages: Callable[[list[str]], None] = lambda names: None) -> None:
        self.catalog = catalog
        self.between_pages = between_pages
        self.counts = 0

    def list_page(self, search: str, after: str, limit: int, matches: int, under: str = "",
                  layout: str = "", counts: bool = True) -> ListingPage:
        page = self.catalog.list_page(search, after, limit, matches, under, layout, counts)
        if page.count == limit:  # another page follows: change the catalog before it is asked for
            entries = protocol.decode_list_page(page.entries, page.layout, page.count)
            self.between_pages([entry["name"] for entry in entries])
        return page

    def count_matching(self, search: str, under: str = "") -> int:
        self.counts += 1
        return self.catalog.count_matching(search, under)

    def __getattr__(self, name: str):  # everything else as the catalog serves it
        return getattr(self.catalog, name)


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(tmp_path / "server", chunk_size=4)
    yield catalog
    catalog.close()


@pytest.fixture
def serve() -> Iterator[Callable[[object], tuple[str, int]]]:
    """Serve a source on port 0; returns its address. Stopped after the test."""
    servers: list[RequestServer] = []

    def start(source: object) -> tuple[str, int]:
        server = RequestServer(source, host="127.0.0.1", port=0, name="test", max_connections=4,
                               idle_timeout_s=SHORT_TIMEOUT, io_timeout_s=SHORT_TIMEOUT)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def pages_of(monkeypatch) -> Callable[[int], None]:
    """Make cursor pages hold at most ``n`` entries (client and server share the constant)."""
    return lambda n: monkeypatch.setattr(protocol, "MAX_LIST_PAGE_ENTRIES", n)


def list_all(address: tuple[str, int], search: str = "") -> list[dict]:
    client = ServerClient([address], io_timeout_s=SHORT_TIMEOUT, pool_size=2, retry_deadline_s=SHORT_TIMEOUT)
    try:
        return client.list_files(search)
    finally:
        client.close()


def raw_pages(address: tuple[str, int], search: str, limit: int) -> list[FileList]:
    """Every page of a listing, asked for one by one with the cursor of the one before."""
    session = ServerSession.open(*address, io_timeout_s=SHORT_TIMEOUT)
    pages = [session.call(ListFiles(search, limit=limit), FileList).message]
    try:
        while pages[-1].next:
            pages.append(session.call(ListFiles(search, cursor=pages[-1].next, limit=limit), FileList).message)
    finally:
        session.close()
    return pages


NAMES = [f"file {i:03d}.bin" for i in range(0, 40, 2)]


class TestCursorListing:
    def test_listing_of_many_pages_has_every_entry_once(self, catalog, serve, pages_of):
        """A listing in pages of 3 gives the same entries as the catalog's own list, by name."""
        add_names(catalog, NAMES)
        catalog.db.record_download(NAMES[4])
        pages_of(3)
        assert catalog.list_files()[0] == list_all(serve(catalog))

    def test_search_listing(self, catalog, serve, pages_of):
        """A search over the wire finds what the catalog finds, in any case."""
        add_names(catalog, NAMES + ["Other.TXT", "X 0.BIN"])
        pages_of(2)
        expected = ["X 0.BIN", "file 000.bin", "file 010.bin", "file 020.bin", "file 030.bin"]
        assert expected == [entry["name"] for entry in list_all(serve(catalog), "0.bin")]

    def test_search_that_fills_its_last_page_ends_there(self, catalog, serve):
        """A search read through the trigram index, 20 matches in pages of 5: 4 pages, no empty fifth."""
        add_names(catalog, NAMES + ["other.txt"])
        pages = raw_pages(serve(catalog), "file", limit=5)
        assert (4, ["x", "x", "x", ""]) == (len(pages), ["x" if page.next else "" for page in pages])

    def test_empty_catalog(self, catalog, serve):
        """An empty catalog lists as nothing, in one page."""
        assert [] == list_all(serve(catalog))

    def test_pages_neither_skip_nor_repeat_while_files_change(self, catalog, serve, pages_of):
        """Files added and removed between pages, behind and ahead of the cursor: no name twice,
        every name that stayed or was added ahead listed, none removed ahead listed."""
        add_names(catalog, NAMES)
        removed_ahead: list[str] = []
        added_ahead: list[str] = []

        def churn(page: list[str]) -> None:
            number = int(page[-1][5:8])
            behind, ahead = f"file {number - 1:03d}.bin", f"file {number + 1:03d}.bin"
            add_names(catalog, [name for name in (behind, ahead) if catalog.db.get_file(name) is None])
            added_ahead.append(ahead)
            for seen in page[:2]:
                catalog.db.remove_file(seen)
            if catalog.db.remove_file(f"file {number + 4:03d}.bin"):
                removed_ahead.append(f"file {number + 4:03d}.bin")

        pages_of(4)
        listed = [entry["name"] for entry in list_all(serve(CountingSource(catalog, churn)))]
        stayed = [name for name in NAMES if name not in removed_ahead]
        assert (sorted(set(listed)), [], [], True) == (
            listed, [name for name in stayed + added_ahead if name not in listed],
            [name for name in removed_ahead if name in listed], len(removed_ahead) > 2)


class DropsUnder(CountingSource):
    """A server older than ``under``: it lists every name containing the search, whatever the folder."""

    def list_page(self, search: str, after: str, limit: int, matches: int, under: str = "",
                  layout: str = "", counts: bool = True) -> ListingPage:
        return super().list_page(search, after, limit, matches, layout=layout)

    def count_matching(self, search: str, under: str = "") -> int:
        return super().count_matching(search)


FOLDER_NAMES = ["photos (2)/a.jpg", "photos/2024/b.jpg", "photos/a.jpg", "photos0.txt", "x/photos/c.jpg"]


class TestFolderListing:
    def test_under_lists_the_folder_alone_across_pages(self, catalog, serve, pages_of):
        """A listing with under='photos/' gives the names in photos/ only (not x/photos/...), over pages of 1."""
        add_names(catalog, FOLDER_NAMES)
        pages_of(1)
        client = ServerClient([serve(catalog)], io_timeout_s=SHORT_TIMEOUT, pool_size=2, retry_deadline_s=SHORT_TIMEOUT)
        try:
            listed = [entry["name"] for entry in client.list_files("photos/", under="photos/")]
        finally:
            client.close()
        assert ["photos/2024/b.jpg", "photos/a.jpg"] == listed

    def test_under_counts_the_folder(self, catalog, serve):
        """The first page's total counts the folder's names, not every name containing the search."""
        add_names(catalog, FOLDER_NAMES)
        session = ServerSession.open(*serve(catalog), io_timeout_s=SHORT_TIMEOUT)
        try:
            page = session.call(ListFiles("photos/", limit=10, under="photos/"), FileList).message
        finally:
            session.close()
        assert 2 == page.total

    def test_a_server_without_under_lists_every_match(self, catalog, serve):
        """Against a server that ignores under, the listing holds every name containing the search."""
        add_names(catalog, FOLDER_NAMES)
        client = ServerClient([serve(DropsUnder(catalog))], io_timeout_s=SHORT_TIMEOUT, pool_size=2,
                              retry_deadline_s=SHORT_TIMEOUT)
        try:
            listed = [entry["name"] for entry in client.list_files("photos/", under="photos/")]
        finally:
            client.close()
        assert ["photos/2024/b.jpg", "photos/a.jpg", "x/photos/c.jpg"] == listed

    @pytest.mark.parametrize("fields, code", [
        ({"under": "photos/"}, protocol.ErrorCode.BAD_REQUEST),  # no limit: offset pages have no folder
        ({"under": "photos", "limit": 5}, protocol.ErrorCode.BAD_NAME),
        ({"under": "../photos/", "limit": 5}, protocol.ErrorCode.BAD_NAME),
        ({"under": "/", "limit": 5}, protocol.ErrorCode.BAD_NAME),
    ])
    def test_bad_under_is_refused(self, fields, code):
        """under must be a safe folder name ending in '/', in a cursor listing."""
        with pytest.raises(protocol.ProtocolError) as refused:
            ListFiles("", **fields)
        assert code == refused.value.code


class TestFailover:
    def test_listing_goes_on_from_its_cursor_on_the_other_server(self, tmp_path, catalog, serve, pages_of):
        """Cut off while serving page 3, the client goes on at the backup after page 2's last name: every name once."""
        add_names(catalog, NAMES)
        backup_catalog = Catalog(tmp_path / "backup", chunk_size=4)
        add_names(backup_catalog, NAMES)
        asked_of_backup: list[str] = []
        calls = 0

        class Recording(CountingSource):
            def list_page(self, search: str, after: str, limit: int, matches: int, under: str = "",
                          layout: str = "", counts: bool = True) -> ListingPage:
                asked_of_backup.append(after)
                return super().list_page(search, after, limit, matches, under, layout, counts)

        def cut_on_third_page(page: list[str]) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                proxy.close()

        proxy = SlowProxy(serve(CountingSource(catalog, cut_on_third_page)), rate_bps=0)
        backup = serve(Recording(backup_catalog))
        pages_of(3)
        client = ServerClient([proxy.address, backup], io_timeout_s=SHORT_TIMEOUT, pool_size=2,
                              retry_deadline_s=SHORT_TIMEOUT)
        try:
            listed = [entry["name"] for entry in client.list_files()]
        finally:
            client.close()
            backup_catalog.close()
        assert (NAMES, NAMES[5]) == (listed, asked_of_backup[0])


class TestCounting:
    def test_matches_counted_once_per_listing(self, catalog, serve):
        """A listing of 7 pages asks the source for its count once, and every page carries that total."""
        add_names(catalog, NAMES)
        source = CountingSource(catalog)
        pages = raw_pages(serve(source), "", limit=3)
        assert (7, 1, [20] * 7, "") == (len(pages), source.counts, [page.total for page in pages], pages[-1].next)

    def test_one_page_listing_counts_once(self, catalog, serve):
        """A search that fits in its first page is counted once too, and its total is the page's size."""
        add_names(catalog, NAMES)
        source = CountingSource(catalog)
        pages = raw_pages(serve(source), "0.bin", limit=100)
        assert ([4], 1) == ([page.total for page in pages], source.counts)

    def test_offset_paging_still_served(self, catalog, serve):
        """A request without a limit (protocol 1's paging) still gets entries in the header, by offset."""
        add_names(catalog, NAMES)
        session = ServerSession.open(*serve(catalog), io_timeout_s=SHORT_TIMEOUT)
        try:
            frame = session.call(ListFiles("", 18), FileList)
        finally:
            session.close()
        assert (NAMES[18:], 20, b"") == ([e["name"] for e in frame.message.files], frame.message.total, frame.payload)


class TestPageSize:
    @pytest.mark.parametrize("layout", ["", protocol.LIST_LAYOUT_PACKED])
    def test_a_full_page_of_the_longest_names_fits(self, catalog, serve, layout):
        """5,000 entries with the longest paths (1,024 bytes) of escaped quotes and the largest sizes fit a page."""
        folders = "/".join(['"' * 200] * 4) + "/"
        names = [folders + '"' * (protocol.MAX_PATH_BYTES - len(folders) - 5) + f"{i:05d}"
                 for i in range(protocol.MAX_LIST_PAGE_ENTRIES)]
        catalog.db.add_files([(name, Manifest(2**62, 2**62, SHA, bytes(32)), 1.0e300) for name in names])
        session = ServerSession.open(*serve(catalog), io_timeout_s=SHORT_TIMEOUT)
        try:
            frame = session.call(ListFiles(limit=protocol.MAX_LIST_PAGE_ENTRIES, layout=layout), FileList)
        finally:
            session.close()
        entries = protocol.decode_list_page(frame.payload, frame.message.layout, frame.message.entries)
        assert (names, protocol.MAX_PATH_BYTES, True) == (
            [e["name"] for e in entries], len(names[0]), len(frame.payload) <= protocol.MAX_LIST_PAGE_PAYLOAD)


class LyingSource:
    """A source whose pages say more follow; ``names_of(after)`` gives each page's names, in ``layout``."""

    def __init__(self, names_of: Callable[[str], list[str]], layout: str = "") -> None:
        self.names_of = names_of
        self.layout = layout

    def list_page(self, search: str, after: str, limit: int, matches: int, under: str = "",
                  layout: str = "", counts: bool = True) -> ListingPage:
        names = self.names_of(after)
        entries = [{"name": name, "size": 1, "chunks": 1, "sha256": SHA, "root": SHA, "downloads": 0, "added_at": 0}
                   for name in names]
        last = "x" if not names else names[-1]
        if self.layout:
            return ListingPage(protocol.pack_list_page(entries), len(entries), last, True, self.layout)
        return ListingPage(json.dumps(entries).encode(), limit, last, True)

    def count_matching(self, search: str, under: str = "") -> int:
        return 0


class TestListingBounds:
    @pytest.mark.parametrize("names_of, layout", [
        (lambda after: ["a", "b"], ""),  # the same page again and again
        (lambda after: ["b", "a"], ""),  # out of order
        (lambda after: [], ""),  # empty, yet "more follow"
        (lambda after: ["m"] if after == "" else ["c"], ""),  # goes back
        (lambda after: ["a", "b"], protocol.LIST_LAYOUT_PACKED),
        (lambda after: ["b", "a"], protocol.LIST_LAYOUT_PACKED),
        (lambda after: ["m", "n"] if after == "" else ["c", "d"], protocol.LIST_LAYOUT_PACKED),  # full pages
    ], ids=["repeats", "unordered", "empty", "goes-back", "packed-repeats", "packed-unordered", "packed-goes-back"])
    def test_server_that_does_not_move_on_is_refused(self, serve, pages_of, names_of, layout):
        """Pages that repeat, go back or stand still end the listing with a protocol error, not a loop."""
        pages_of(2)
        with pytest.raises(RemoteProtocolError):
            list_all(serve(LyingSource(names_of, layout)))

    def test_endless_listing_stops_at_the_bound(self, serve, pages_of, monkeypatch):
        """A server that always has more names stops being read at MAX_LIST_TOTAL entries."""
        pages_of(10)
        monkeypatch.setattr(protocol, "MAX_LIST_TOTAL", 95)
        endless = LyingSource(lambda after: [f"{after}{i}" for i in range(10)])
        with pytest.raises(RemoteProtocolError, match="over 95 entries"):
            list_all(serve(endless))


class OffsetPagingServer:
    """An inline server of protocol 1: it ignores cursors and limits, pages by offset in the header."""

    def __init__(self, names: list[str], page: int) -> None:
        self.names = names
        self.page = page
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.listener, self.listener.accept()[0] as sock:
            decoder = FrameDecoder()
            while data := sock.recv(65536):
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    sock.sendall(encode_frame(self._answer(frame.message)))

    def _answer(self, request: protocol.Message) -> protocol.Message:
        if isinstance(request, protocol.Hello):
            return protocol.Welcome(protocol.PROTOCOL_VERSION, "active", 1, "old", "main")
        entries = [{"name": name} for name in self.names[request.offset:request.offset + self.page]]
        return FileList(entries, len(self.names), request.offset)


class TestRowsThePackedLayoutCannotCarry:
    def test_a_name_with_a_newline_comes_in_a_json_page(self, catalog, serve, pages_of):
        """A name holding "\n", written behind the catalog's checks, is listed (a JSON page) with the rest."""
        pages_of(4)
        add_names(catalog, NAMES[:10])
        catalog.db.add_file("a\nb", manifest())  # the database's own method: no name checks
        assert ["a\nb"] + NAMES[:10] == [entry["name"] for entry in list_all(serve(catalog))]


class JsonOnlySource(CountingSource):
    """A catalog served as by a server that knows no packed layout: every page in JSON objects."""

    def list_page(self, search: str, after: str, limit: int, matches: int, under: str = "",
                  layout: str = "", counts: bool = True) -> ListingPage:
        return super().list_page(search, after, limit, matches, under)


class TestOlderServer:
    def test_offset_paging_server_is_listed_whole(self):
        """Against a server that pages by offset, the client falls back to offsets and lists everything once."""
        server = OffsetPagingServer(NAMES, page=6)
        assert NAMES == [entry["name"] for entry in list_all(server.address)]

    def test_json_page_server_is_listed_whole(self, catalog, serve, pages_of):
        """A server that knows no packed layout (it ignores the field) answers JSON pages, which the client reads."""
        pages_of(7)
        add_names(catalog, NAMES)

        listed = list_all(serve(JsonOnlySource(catalog)))
        assert (NAMES, SHA, ADDED_AT) == ([e["name"] for e in listed], listed[0]["sha256"], listed[0]["added_at"])

    def test_packed_pages_hold_what_json_pages_hold(self, catalog, serve, pages_of):
        """Listed in packed pages and in JSON pages, a catalog gives the same entries, every key and value."""
        pages_of(7)
        add_names(catalog, NAMES)
        catalog.record_download(NAMES[3], SHA)

        packed, as_json = list_all(serve(CountingSource(catalog))), list_all(serve(JsonOnlySource(catalog)))
        assert (as_json, 1) == (packed, packed[3]["downloads"])
