"""The client window's logic that needs no widget: filtering, texts, limits, the connection line, its events.

Tests call everything here without a Tk root. The panels (client_panels.py)
and the window (client_window.py) only show what these functions return.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from database import fold  # the server's search rule, so both filter alike
from minitorrent.client.folders import summarize_folders
from minitorrent.common.units import human_size
from minitorrent.gui.base import entry_row
from minitorrent.gui.transfers import TransferState
from minitorrent.net.discovery import FoundServer, parse_found

CONNECTED_POLL_S = 1.0  # status of the server in use, once a second: the indicator follows a failover quickly
RECONNECT_DELAYS_S = (1, 2, 3, 5)  # then every 5 s: no server answers, ask again with backoff
CATALOG_REFRESH_S = 3.0  # while connected, the catalog is fetched again this often: new files show by themselves
KIB = 1024
MAX_LIMIT_KIB = 10 * 1024 * 1024  # 10 GiB/s: anything above is a typo, not a limit
NAME_CHARS = 90  # a longer file name is shown shortened in the middle
CATALOG_COLUMNS = [("name", "Path", 360, "w"), ("size", "Size", 100, "e"), ("chunks", "Chunks", 80, "e"),
                   ("downloads", "Downloads", 100, "e"), ("sha256", "SHA-256", 140, "w")]
CATALOG_KEYS = [key for key, *_ in CATALOG_COLUMNS]
SEEDED_COLUMNS = [("name", "Seeded file", 200, "w"), ("size", "Size", 80, "e"), ("sha256", "SHA-256", 120, "w")]


# The catalog ---------------------------------------------------------------------------------------------------


def filter_entries(entries: list[dict], search: str) -> list[dict]:
    """The catalog entries whose name contains ``search`` (any case, any accent form); all if empty."""
    wanted = fold(search.strip())
    return [entry for entry in entries if wanted in fold(entry["name"])] if wanted else list(entries)


ALL_FOLDERS = "All folders"  # the folder filter's first choice: no filter


def folder_choices(entries: list[dict]) -> list[str]:
    """The folder filter's choices: everything, then each folder (``photos/``, ``photos/2024/``) by path."""
    return [ALL_FOLDERS, *(folder.path for folder in summarize_folders(entries))]


def in_folder(entries: list[dict], folder: str) -> list[dict]:
    """The entries under ``folder`` at any depth; all of them for ``ALL_FOLDERS`` or an empty choice."""
    if not folder or folder == ALL_FOLDERS:
        return list(entries)
    return [entry for entry in entries if entry["name"].startswith(folder)]


def saved_limits(settings: dict) -> tuple[int, int] | None:
    """The (upload, download) limits the window saved last time, in bytes/s; None if none or malformed."""
    limits = settings.get("limits")
    if (isinstance(limits, list) and len(limits) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in limits)):
        return limits[0], limits[1]
    return None


def saved_server(settings: dict) -> FoundServer | None:
    """The server found on the LAN that the user chose last time; None if none or malformed.

    The settings file is ours but may be edited by hand: it passes the same
    strict checks as an announcement heard on the LAN.
    """
    chosen = settings.get("server")
    if not isinstance(chosen, dict) or not all(isinstance(chosen.get(k), str) for k in ("name", "host")):
        return None
    port = chosen.get("port")
    properties = {key: str(chosen.get(key, "")).encode() for key in ("identity", "role", "epoch")}
    return parse_found(chosen["name"], [chosen["host"]], port if isinstance(port, int) else None,
                       {b"id": properties["identity"], b"role": properties["role"], b"epoch": properties["epoch"]})


def found_server_row(server: FoundServer) -> tuple[str, str, str, str, str]:
    """A found server as the chooser's row: name, address, role, epoch, identity."""
    return server.name, server.address, server.role, str(server.epoch), server.identity


def discovery_wanted(discovery: bool | None, connected: bool, listened: bool) -> bool:
    """True when the window should listen for servers on the LAN by itself now.

    Unless the config says ``discovery: false`` (unset listens too: a client
    with no server configured finds those that announce themselves), only
    while no server answers, and once per outage (``listened``: since the
    last time a server answered); the chooser's button listens again.
    """
    return discovery is not False and not connected and not listened


def catalog_row(entry: dict) -> tuple[tuple, dict]:
    """A catalog entry as table values (human units) and sort keys (raw numbers)."""
    return entry_row(entry, CATALOG_KEYS)


def count_text(shown: int, total: int) -> str:
    """``"3 of 12 files"``, or ``"12 files"`` when nothing is filtered out."""
    noun = "file" if total == 1 else "files"
    return f"{total} {noun}" if shown == total else f"{shown} of {total} {noun}"


def catalog_due(last_fetch_at: float | None, now: float, connected: bool) -> bool:
    """True when a connected window should fetch the catalog again by itself (every ``CATALOG_REFRESH_S``)."""
    return connected and (last_fetch_at is None or now - last_fetch_at >= CATALOG_REFRESH_S)


def elide(text: str, limit: int = NAME_CHARS) -> str:
    """``text`` shortened in the middle with an ellipsis to at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def plural(count: int, noun: str) -> str:
    """``"1 file"``, ``"2 files"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


# Limits -------------------------------------------------------------------------------------------------------


def parse_limit_kib(text: str, what: str) -> int:
    """A limit typed in KiB/s as bytes/s; empty or 0 is unlimited.

    Raises ``ValueError`` with a message for the user (naming ``what``) when
    the text is not a number from 0 to ``MAX_LIMIT_KIB``.
    """
    cleaned = text.strip().replace(",", ".")
    if cleaned == "":
        return 0
    hint = f"{what}: enter a number of KiB/s from 0 to {MAX_LIMIT_KIB} (0 = unlimited), not {text.strip()!r}"
    try:
        kib = float(cleaned)
    except ValueError:
        raise ValueError(hint) from None
    if not 0 <= kib <= MAX_LIMIT_KIB:  # also refuses nan and inf
        raise ValueError(hint)
    return round(kib * KIB)


def format_limit_kib(rate_bps: int) -> str:
    """A limit in bytes/s as the KiB/s text its field shows (``"512"``, ``"0.5"``, ``"0"``)."""
    kib = rate_bps / KIB
    return str(int(kib)) if kib == int(kib) else f"{kib:.2f}".rstrip("0").rstrip(".")


def describe_limit(rate_bps: int) -> str:
    """``"512 KiB/s"`` or ``"unlimited"``."""
    return f"{format_limit_kib(rate_bps)} KiB/s" if rate_bps else "unlimited"


def limits_text(upload_bps: int, download_bps: int, seeding: bool) -> str:
    """The message once limits are applied."""
    upload = describe_limit(upload_bps) if seeding else "n/a (not seeding)"
    return f"Limits applied: upload {upload}, download {describe_limit(download_bps)}."


# The connection -------------------------------------------------------------------------------------------------


def reconnect_delay(failures: int) -> float:
    """Seconds before the next try after ``failures`` polls in a row found no server (>= 1)."""
    return float(RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S)) - 1])


_NO_ACTIVE = "no active server: "
_CANNOT_CONNECT = re.compile(r"^(?P<address>[^\s;]+): cannot connect to (?P=address): (?P<why>.*)$")


def why_no_server(reason: str) -> str:
    """A connection error as a short line for people: ``"127.0.0.1:5001 refuses connections"``.

    The engine's text names each server twice and carries the socket's own
    wording ("no active server: h:p: cannot connect to h:p: Connection
    refused"); each server's part is kept, said once, in lower case.
    """
    text = reason[len(_NO_ACTIVE):] if reason.startswith(_NO_ACTIVE) else reason
    parts = []
    for part in text.split("; "):
        match = _CANNOT_CONNECT.match(part)
        if match:
            why = match["why"].lower()
            part = f"{match['address']} refuses connections" if why == "connection refused" else \
                f"{match['address']} does not answer ({why})"
        parts.append(part)
    return elide("; ".join(parts), 110)


@dataclass(frozen=True)
class ConnectionView:
    """What the header says about the connection: the line under the title, the dot's tone."""

    server: str  # "Main server", "Backup server (failover)", "Reconnecting…"
    detail: str
    tone: str  # "ok" (main), "warn" (the backup, after a failover), "error" (no server)
    connected: bool

    @property
    def headline(self) -> str:
        """The one line under the window's title."""
        return f"{self.server} · {self.detail}" if self.detail else self.server


def connection_view(status: dict | None, reason: str = "", next_try_s: float | None = None) -> ConnectionView:
    """The header for a status snapshot (server, role, epoch, address), or for no server at all."""
    if status is None:
        countdown = "trying now…" if next_try_s is None or next_try_s <= 0.05 else \
            f"next try in {max(1, round(next_try_s))} s"
        detail = f"{why_no_server(reason)} · {countdown}" if reason else countdown
        return ConnectionView("Reconnecting…", detail, "error", False)
    server = status.get("server") or "server"
    detail = f"{status.get('address', '')} · role {status.get('role', '?')} · epoch {status.get('epoch', '?')}"
    if server == "backup":
        return ConnectionView("Backup server (failover)", detail, "warn", True)
    return ConnectionView(f"{server.capitalize()} server", detail, "ok", True)


def server_changed(previous: dict | None, current: dict | None) -> bool:
    """True when a server answers now and it is not the one (or the epoch) of the previous snapshot."""
    if current is None:
        return False
    return previous is None or (previous.get("server"), previous.get("epoch")) != (current.get("server"),
                                                                                   current.get("epoch"))


def connection_news(previous: dict | None, current: dict | None, first: bool, reason: str) -> tuple[str, str] | None:
    """What the status line says when the connection changes: (text, tone), or None for no news.

    The status line and the header must never disagree: a window that
    starts with no server says so there too, not "Ready.".
    """
    if server_changed(previous, current):
        return (f"connected to the {current.get('server', '')} server at {current.get('address', '')} "
                f"(epoch {current.get('epoch', '?')})", "ok")
    if current is None and previous is not None:
        return "lost the server; downloads wait and resume when a server answers", "warn"
    if current is None and first:
        return f"no server answers yet ({why_no_server(reason)}); the window keeps trying", "warn"
    return None


# Seeding and transfers -----------------------------------------------------------------------------------------


def seeding_tiles(seeding: dict | None, enabled: bool, error: str = "") -> dict[str, tuple[str, str, str]]:
    """The seeding strip's tiles, (value, detail, tone) per key, from ``ClientEngine.seeding_status``.

    ``error`` is why the seeder could not start, if it could not.
    """
    if not enabled or seeding is None:
        off = ("off", "client.seeding is false", "idle") if not enabled else ("…", "", "idle")
        return {"status": off, "files": ("—", "", "idle"), "uploaded": ("—", "", "idle"),
                "peers": ("—", "", "idle")}
    if seeding["running"]:
        status = ("on", f"peers reach us at {seeding['address']}", "ok")
    else:
        status = ("failed", elide(error, 60), "error") if error else ("starting…", "", "info")
    whole = len(seeding["files"])
    partial = f"+ {seeding['partial']} in part" if seeding["partial"] else "whole files"
    speed = f"{human_size(seeding['upload_bps'])}/s now"
    limit = seeding["upload_limit_bps"]
    if limit:
        speed += f" · limit {describe_limit(limit)}"
    now = seeding["active_connections"]
    return {
        "status": status,
        "files": (str(whole), partial, ""),
        "uploaded": (human_size(seeding["bytes_sent"]), speed, ""),
        "peers": (str(seeding["connections_total"]), f"{now} connected now", ""),
    }


def transfers_summary(counts: dict[TransferState, int]) -> str:
    """``"2 downloading · 1 queued · 3 done"`` (states with none left out), or ``"no transfers"``."""
    order = [TransferState.DOWNLOADING, TransferState.QUEUED, TransferState.PAUSED, TransferState.FAILED,
             TransferState.DONE, TransferState.CANCELLED]
    parts = [f"{counts[state]} {state.value}" for state in order if counts.get(state)]
    return " · ".join(parts) if parts else "no transfers"


def download_folder(remembered: str | None, default: Path, home: Path) -> Path:
    """Where the folder picker opens: the folder last downloaded into, else the download folder, else home.

    Tk's picker shows its own working folder for a folder that does not
    exist, which is never what the user wants.
    """
    for candidate in (Path(remembered) if remembered else None, default):
        if candidate is not None and candidate.is_dir():
            return candidate
    return home


# Events the window's workers post --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSnapshot:
    """Event: the poller's look at the server in use and the seeder."""

    status: dict | None  # None: no server answered
    reason: str  # why not, when status is None
    seeding: dict | None
    next_poll_s: float
    taken_at: float


@dataclass(frozen=True)
class CatalogFetched:
    """Event: a catalog refresh ended, with the entries or a one-line error; ``announce``: the user asked for it."""

    entries: list[dict] | None
    error: str = ""
    announce: bool = False
    not_paired: bool = False  # the server refused: this client is not paired (server.access: paired)


@dataclass(frozen=True)
class Notice:
    """Event: something for the user to read in the status line (``tone``: ok, info, warn, error)."""

    text: str
    tone: str = "info"


@dataclass(frozen=True)
class SeedingFailed:
    """Event: the seeder could not start (downloads still work; peers cannot fetch from us)."""

    reason: str


@dataclass(frozen=True)
class UnfinishedFound:
    """Event: downloads an earlier run left unfinished (name, folder, size, verified bytes)."""

    downloads: list[tuple[str, Path, int, int]]


@dataclass(frozen=True)
class ServersFound:
    """Event: a listen for servers on the LAN ended, with what was heard (highest epoch first) or why it failed."""

    servers: list[FoundServer]
    error: str = ""


@dataclass(frozen=True)
class ServerChosen:
    """Event: the server the user chose is pinned and asked from now on (``error``: it could not be)."""

    server: FoundServer
    error: str = ""
