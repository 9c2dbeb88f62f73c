"""Who may download from a server (``server.access``), pairing, and reports counted once per client.

State lives in ``access.db`` in the server's data folder (SQLite, WAL), so
that the running server and the operator's commands in other processes
(``python main_server.py pair``, ``paired``, ``revoke ID``) share it:

* ``paired``: the identities accepted (by pairing, or replicated from the main);
* ``pending``: at most one one-time code, its expiry and what became of it;
* ``reported_files``: which client reported which file (name and version), so each counts once;
* ``token_key``: the web tokens' key of a main with no peer (see tokens.py).

``open`` mode: any client may list and download (over TLS). ``paired``: only
paired identities. Either way a download counts only once per identified
client and file. The main pushes its paired list to the backup whenever it
changes (``AccessSync``), so a failover keeps the same clients.
"""
from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from database import VERSION_NAME, VERSION_SHA256, version_texts
from minitorrent.net.serving import PeerConnection, PeerHandler
from minitorrent.server.replication import (
    PEER_ERRORS,
    PeerLink,
    decode_document,
    encode_document,
)
from minitorrent.wire import protocol
from minitorrent.wire.pairing import PairingFailed, ServerPairing, new_code
from minitorrent.wire.protocol import ErrorCode, Frame, RequestFailed

log = logging.getLogger(__name__)

ACCESS_FILE = "access.db"
CODE_TTL_S = 600.0  # a code not used within ten minutes is gone
SYNC_RETRY_S = 1.0  # how often the main checks that the backup has its paired list
MAX_PAIRED_CLIENTS = 100_000  # a replicated list longer than this is refused

_SCHEMA = """
CREATE TABLE IF NOT EXISTS paired (identity TEXT PRIMARY KEY, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pending (slot INTEGER PRIMARY KEY CHECK (slot = 1), code TEXT NOT NULL,
    expires_at REAL NOT NULL, state TEXT NOT NULL, identity TEXT NOT NULL DEFAULT '');
DROP TABLE IF EXISTS reported;  -- before 2026-12-01: one row per client and content, whatever its name
CREATE TABLE IF NOT EXISTS reported_files (identity TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (identity, name, sha256)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS version (slot INTEGER PRIMARY KEY CHECK (slot = 1), value INTEGER NOT NULL);
INSERT OR IGNORE INTO version VALUES (1, 0);
CREATE TABLE IF NOT EXISTS token_key (slot INTEGER PRIMARY KEY CHECK (slot = 1), key BLOB NOT NULL);
"""


class AccessList:
    """The ``access.db`` of one server. Thread-safe; other processes may use the same file."""

    def __init__(self, data_dir: Path) -> None:
        path = Path(data_dir) / ACCESS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = (), bump: bool = False) -> int:
        """Run one change in a transaction (bumping the list's version if asked); rows changed."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                changed = self._db.execute(sql, args).rowcount
                if bump and changed:
                    self._db.execute("UPDATE version SET value = value + 1")
                return changed

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # Paired clients -------------------------------------------------------------------

    def is_paired(self, identity: str) -> bool:
        """True if ``identity`` is accepted."""
        return bool(identity) and bool(self._read("SELECT 1 FROM paired WHERE identity = ?", (identity,)))

    def pair(self, identity: str) -> None:
        """Accept ``identity``."""
        self._write("INSERT OR IGNORE INTO paired VALUES (?, ?)", (identity, time.time()), bump=True)

    def revoke(self, identity: str) -> bool:
        """Stop accepting ``identity``; True if it was paired."""
        return self._write("DELETE FROM paired WHERE identity = ?", (identity,), bump=True) > 0

    def paired(self) -> list[tuple[str, float]]:
        """(identity, paired at) for every accepted client, oldest first."""
        return self._read("SELECT identity, added_at FROM paired ORDER BY added_at, identity")

    def version(self) -> int:
        """A number that grows whenever the paired list changes."""
        return self._read("SELECT value FROM version")[0][0]

    def replace_all(self, identities: list[str]) -> None:
        """Make the paired list exactly ``identities`` (the backup, from the main)."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM paired")
                now = time.time()
                self._db.executemany("INSERT OR IGNORE INTO paired VALUES (?, ?)", [(i, now) for i in identities])
                self._db.execute("UPDATE version SET value = value + 1")

    def local_key(self) -> bytes:
        """This server's own random key for web tokens, made on first use (the same for every process)."""
        self._write("INSERT OR IGNORE INTO token_key VALUES (1, ?)", (secrets.token_bytes(32),))
        return self._read("SELECT key FROM token_key")[0][0]

    # The one-time code -----------------------------------------------------------------

    def offer_code(self, ttl_s: float = CODE_TTL_S) -> str:
        """A new one-time code, replacing any earlier one."""
        code = new_code()
        self._write("INSERT OR REPLACE INTO pending VALUES (1, ?, ?, 'waiting', '')", (code, time.time() + ttl_s))
        return code

    def take_code(self) -> str | None:
        """The waiting code, now spent (one attempt per code); None if none waits or it expired."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT code FROM pending WHERE state = 'waiting' AND expires_at > ?",
                                       (time.time(),)).fetchone()
                if row:
                    self._db.execute("UPDATE pending SET state = 'tried'")
                return row[0] if row else None

    def code_paired(self, code: str, identity: str) -> None:
        """The client that used ``code`` proved it: accept it, and tell the operator's command."""
        self.pair(identity)
        self._write("UPDATE pending SET state = 'paired', identity = ? WHERE code = ?", (identity, code))

    def take_code_expired(self, code: str) -> bool:
        """True if ``code`` is still waiting but past its expiry."""
        return bool(self._read("SELECT 1 FROM pending WHERE code = ? AND state = 'waiting' AND expires_at <= ?",
                               (code, time.time())))

    def code_state(self, code: str) -> tuple[str, str]:
        """(state, identity) of ``code``: waiting, tried (a client used it, unproven), paired; or gone."""
        rows = self._read("SELECT state, identity FROM pending WHERE code = ?", (code,))
        return rows[0] if rows else ("gone", "")

    # Reports ---------------------------------------------------------------------------

    def first_reports(self, identity: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (name, sha256) pairs ``identity`` reports for the first time (a pair listed twice: once), noted as
        reported in one transaction; none for no identity. A file is a name and a version: a second name of
        one content, or a new version of a name, is another file."""
        pairs, versions = version_texts(pairs)
        if not identity or not pairs:
            return []
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                return self._db.execute(  # OR IGNORE: a pair reported before is no row, so not returned
                    f"INSERT OR IGNORE INTO reported_files (identity, name, sha256) SELECT ?, {VERSION_NAME},"
                    f" {VERSION_SHA256} FROM json_each(?) AS j RETURNING name, sha256", (identity, versions)).fetchall()


def wait_for_pairing(access: AccessList, code: str, stop: threading.Event, proof_wait_s: float = 10.0) -> str:
    """Wait until a client pairs with ``code``; its identity. ``LookupError`` saying why if none will.

    A client that started with the code but did not prove it within
    ``proof_wait_s`` used a wrong code (or was a machine in the middle).
    """
    tried_at = None
    while not stop.wait(0.2):
        state, identity = access.code_state(code)
        if state == "paired":
            return identity
        if state == "gone":
            raise LookupError("another pairing code replaced this one")
        if state == "tried":
            tried_at = tried_at or time.monotonic()
            if time.monotonic() - tried_at > proof_wait_s:
                raise LookupError("a client tried this code but could not prove it (a wrong code?); "
                                  "run pair again for a new one")
        elif access.take_code_expired(code):
            raise LookupError(f"nobody used the code within {CODE_TTL_S / 60:g} minutes; run pair again")
    raise LookupError("stopped")


class AccessPolicy:
    """``server.access`` applied to an ``AccessList`` (the serving core's ``ClientAccess``)."""

    def __init__(self, access: AccessList, mode: str) -> None:
        self.access = access
        self.mode = mode

    def allows(self, identity: str) -> bool:
        """Open: anyone; paired: only accepted identities."""
        return self.mode == "open" or self.access.is_paired(identity)

    def first_reports(self, identity: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Only identified clients' reports count, once per file."""
        return self.access.first_reports(identity, pairs)


class Pairing:
    """The server's side of pairing (see wire/pairing.py), as client request handlers."""

    def __init__(self, access: AccessList) -> None:
        self.access = access

    def handlers(self) -> dict[type[protocol.Message], PeerHandler]:
        """Handlers for ``RequestServer(client_handlers=...)``."""
        return {protocol.PairStart: self._start, protocol.PairConfirm: self._confirm}

    def _start(self, handler, frame: Frame) -> None:
        if not handler.client_identity:
            raise RequestFailed(ErrorCode.PAIRING_FAILED, "pairing needs a client that proved its identity (TLS)")
        code = self.access.take_code()
        if code is None:
            raise RequestFailed(ErrorCode.PAIRING_FAILED, "no pairing code is waiting (or it expired): "
                                                          "ask the operator to run: python main_server.py pair")
        pairing = ServerPairing(code, handler.server.tls.id, handler.client_identity)
        try:
            message, confirm = pairing.reply(frame.message.message)
        except PairingFailed as error:
            raise RequestFailed(ErrorCode.PAIRING_FAILED, str(error)) from None
        handler.kept["pairing"] = (code, pairing)
        handler.connection.send(protocol.PairReply(message, confirm))

    def _confirm(self, handler, frame: Frame) -> None:
        code, pairing = handler.kept.pop("pairing", (None, None))
        if pairing is None:
            raise RequestFailed(ErrorCode.PAIRING_FAILED, "send pair first")
        try:
            pairing.check_client(frame.message.confirm)
        except PairingFailed as error:
            log.warning("pairing refused for %s: %s", handler.connection.peer, error)
            raise RequestFailed(ErrorCode.PAIRING_FAILED, str(error)) from None
        self.access.code_paired(code, handler.client_identity)
        log.info("paired client %s (%s)", handler.client_identity, handler.connection.peer)
        handler.connection.send(protocol.Ok())


class AccessSync:
    """The main's thread that keeps the backup's paired list equal to its own."""

    def __init__(self, access: AccessList, link: PeerLink, stop: threading.Event) -> None:
        self.access = access
        self.link = link
        self.stop = stop
        self.thread = threading.Thread(target=self._run, name="access-sync", daemon=True)

    def start(self) -> None:
        """Start in a background thread."""
        self.thread.start()

    def _run(self) -> None:
        pushed: int | None = None  # the version the backup acknowledged (None: not yet, since we started)
        delay_s = 0.0
        while not self.stop.wait(delay_s):
            delay_s = SYNC_RETRY_S
            version = self.access.version()
            if version == pushed:
                continue
            document = {"clients": [identity for identity, _ in self.access.paired()]}
            try:
                self.link.get().call(protocol.PairedClients(version), protocol.Ok, encode_document(document))
                pushed = version
            except PEER_ERRORS as error:  # the backup is away: the next round tries again
                self.link.drop()
                log.debug("paired list not sent to the backup yet: %s", error)
        self.link.drop()


def receive_paired_list(access: AccessList) -> PeerHandler:
    """The backup's handler for the main's ``PairedClients``."""

    def handle(peer: PeerConnection, frame: Frame) -> None:
        clients = decode_document(frame.payload).get("clients")
        if not isinstance(clients, list) or len(clients) > MAX_PAIRED_CLIENTS \
                or not all(isinstance(c, str) and len(c) < 100 for c in clients):
            raise RequestFailed(ErrorCode.BAD_REQUEST, "paired_clients: clients must be a list of identities")
        access.replace_all(clients)
        log.info("paired clients from the main: %d", len(clients))
        peer.send(protocol.Ok())

    return handle
