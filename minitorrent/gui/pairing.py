"""Pairing in the windows (``server.access: paired``): the main's paired-clients panel, the client's pair dialog.

The engines do the work (``MainServer.offer_pairing_code``, ``paired_clients``,
``revoke_client``; ``ClientEngine.pair``); the windows' controllers call them
on worker threads and post the events below. What is shown is decided by the
plain functions here, which tests call without Tk.
"""
from __future__ import annotations

import time
import tkinter as tk
from dataclasses import dataclass, field
from tkinter import ttk
from typing import Callable

from error_handler import ConnectionFailed, MiniTorrentError, RemoteError
from minitorrent.gui.base import SortableTable, format_added
from minitorrent.gui.client_logic import why_no_server
from minitorrent.gui.widgets import restyle_tree, set_style, tone_style
from minitorrent.server.access import CODE_TTL_S
from minitorrent.wire.protocol import ErrorCode

PAIRED_COLUMNS = [("identity", "Client identity", 520, "w"), ("paired", "Paired", 140, "w")]
HOW_TO_PAIR = ("not paired with this server: click Pair with server… and type the one-time code its operator "
               "shows (main window: Pair a client…, or python main_server.py pair)")


# Events ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairingCodeOffered:
    """The main offered a one-time code, valid until ``expires_at`` (epoch seconds)."""

    code: str
    expires_at: float


@dataclass(frozen=True)
class PairingEnded:
    """A code was used: ``identity`` paired, or ``error`` says why none did."""

    code: str
    identity: str = ""
    error: str = ""


@dataclass(frozen=True)
class ClientRevoked:
    """A revocation ended: ``revoked`` False when the client was not paired any more."""

    identity: str
    revoked: bool


@dataclass(frozen=True)
class WebTokenReady:
    """The operator's web token, fetched for the clipboard (a secret: never shown, never logged)."""

    token: str = field(repr=False)  # the window logs an event it could not show, by its repr


@dataclass(frozen=True)
class PairingResult:
    """The client's pairing attempt ended: ``server_identity`` on success, else ``error`` for the user."""

    server_identity: str = ""
    error: str = ""


# What is shown -------------------------------------------------------------------------------------------------


def paired_rows(paired: list[tuple[str, float]]) -> list[tuple[str, tuple, dict]]:
    """The paired-clients table's rows: (identity as iid, shown values, sort keys)."""
    return [(identity, (identity, format_added(added_at)), {"paired": added_at}) for identity, added_at in paired]


def code_detail(code: str, expires_at: float) -> str:
    """The line under a shown code: how long it lives, one attempt, what the client does with it."""
    until = time.strftime("%H:%M", time.localtime(expires_at))
    return (f"One attempt, valid {CODE_TTL_S / 60:g} minutes (until {until}). On the client: Pair with server…, "
            f"or python client.py pair {code}")


def pairing_ended_text(event: PairingEnded) -> tuple[str, str]:
    """(text, tone) for the end of a code: who paired, or why nobody did (in the window's words)."""
    if event.identity:
        return f"Paired client {event.identity}", "ok"
    return event.error.replace("run pair again", "click Pair a client… again"), "error"


def access_hint(mode: str) -> str:
    """What ``server.access`` means for this list, beside its caption."""
    if mode == "paired":
        return "server.access: paired · only these clients may list and download"
    return "server.access: open · any client may download"


WEB_TOKEN_COPIED = ("Web token copied: paste it into the server page's token box, or send it as "
                    "Authorization: Bearer. It opens the API and downloads; keep it secret.")


def pairing_failure(error: MiniTorrentError) -> str:
    """A failed ``ClientEngine.pair`` as one line for the user: a wrong or spent code, or no server."""
    if isinstance(error, ConnectionFailed):
        return f"No server answers ({why_no_server(str(error))}): check that it runs, then try again."
    if isinstance(error, RemoteError) and error.code == ErrorCode.PAIRING_FAILED:
        return (f"The server has no code waiting: none was shown, it expired ({CODE_TTL_S / 60:g} minutes) or "
                "it was already tried. Ask its operator for a new one.")
    text = str(error)  # a wrong code: "pairing failed: the code did not match ...; ask ... for a new code"
    return text[:1].upper() + text[1:]


def is_not_paired(error: BaseException) -> bool:
    """True when a server refused a request because this client is not paired."""
    return isinstance(error, RemoteError) and error.code == ErrorCode.NOT_PAIRED


# The main window's panel ----------------------------------------------------------------------------------------


class ClientsPanel(ttk.Frame):
    """Paired clients: Pair a client… (shows a one-time code), the list, Revoke for the selected one.

    Copy web token puts the operator's token for the web face on the clipboard.
    """

    def __init__(self, master: tk.Misc, on_pair: Callable[[], None], on_revoke: Callable[[], None],
                 on_copy_token: Callable[[], None]) -> None:
        super().__init__(master)
        self.columnconfigure(1, weight=1)
        ttk.Label(self, text="PAIRED CLIENTS", style="Caption.TLabel").grid(row=0, column=0, sticky="w",
                                                                            pady=(8, 4))
        self.hint = ttk.Label(self, text="", style="Caption.TLabel")
        self.hint.grid(row=0, column=1, sticky="w", padx=(10, 0), pady=(8, 4))
        self.token_button = ttk.Button(self, text="Copy web token", command=on_copy_token)
        self.token_button.grid(row=0, column=2, padx=(0, 6), pady=(8, 4))
        self.pair_button = ttk.Button(self, text="Pair a client…", command=on_pair)
        self.pair_button.grid(row=0, column=3, padx=(0, 6), pady=(8, 4))
        self.revoke_button = ttk.Button(self, text="Revoke", command=on_revoke, state="disabled")
        self.revoke_button.grid(row=0, column=4, pady=(8, 4))
        self.code_frame = ttk.Frame(self)
        self.code = ttk.Label(self.code_frame, text="", style="Title.TLabel", font="MTBadge")  # read out across a room
        self.code.grid(row=0, column=0, sticky="w", padx=(0, 12))
        self.code_line = ttk.Label(self.code_frame, text="", style="Subtitle.TLabel")
        self.code_line.grid(row=0, column=1, sticky="w")
        self.table = SortableTable(self, PAIRED_COLUMNS, height=3)
        self.table.grid(row=2, column=0, columnspan=5, sticky="nsew")
        self.rowconfigure(2, weight=1)
        self.table.tree.bind("<<TreeviewSelect>>", lambda _event: self._update_revoke())
        self._paired: list | None = None

    def show(self, paired: list[tuple[str, float]], mode: str) -> None:
        """The paired clients and the access mode (only redrawn when they changed)."""
        if self.hint.cget("text") != access_hint(mode):
            self.hint.configure(text=access_hint(mode))
        if paired != self._paired:
            self._paired = paired
            self.table.set_rows(paired_rows(paired))
            self._update_revoke()

    def show_code(self, code: str, expires_at: float) -> None:
        """A code for the operator to read out, with how long it lives."""
        self.code.configure(text=code)
        set_style(self.code_line, "Subtitle.TLabel")
        self.code_line.configure(text=code_detail(code, expires_at))
        self.code_frame.grid(row=1, column=0, columnspan=5, sticky="ew", pady=(0, 6))

    def show_outcome(self, text: str, tone: str) -> None:
        """What became of the code, in place of it."""
        self.code.configure(text="")
        set_style(self.code_line, tone_style(tone))
        self.code_line.configure(text=text)
        self.code_frame.grid(row=1, column=0, columnspan=5, sticky="ew", pady=(0, 6))

    def selected(self) -> str:
        """The selected client's identity, or ``""``."""
        chosen = self.table.selected()
        return chosen[0] if chosen else ""

    def _update_revoke(self) -> None:
        self.revoke_button.configure(state="normal" if self.table.selected() else "disabled")


# The client window's dialog --------------------------------------------------------------------------------------


class PairDialog(tk.Toplevel):
    """Pair with server…: the user types the operator's code; ``on_pair(code)`` runs it off the Tk thread.

    The window hands the outcome back with ``show_result``. Tk thread only.
    """

    def __init__(self, master: tk.Misc, on_pair: Callable[[str], None]) -> None:
        super().__init__(master)
        self.title("Pair with server")
        self.transient(master.winfo_toplevel())
        self.resizable(False, False)
        self.on_pair = on_pair
        body = ttk.Frame(self, padding=16)
        body.grid(row=0, column=0, sticky="nsew")
        ttk.Label(body, text="Pair with server", style="Title.TLabel").grid(row=0, column=0, columnspan=2,
                                                                            sticky="w")
        ttk.Label(body, style="Subtitle.TLabel", wraplength=600, justify="left",
                  text="Ask the server's operator for a one-time code (main window: Pair a client…, or "
                       "python main_server.py pair) and type it here. It works once.").grid(
            row=1, column=0, columnspan=2, sticky="w", pady=(4, 10))
        row = ttk.Frame(body)
        row.grid(row=2, column=0, columnspan=2, sticky="w")
        self.code = tk.StringVar(self)
        self.entry = ttk.Entry(row, textvariable=self.code, width=14, font="TkFixedFont")
        self.entry.pack(side="left")
        self.pair_button = ttk.Button(row, text="Pair", style="Accent.TButton", command=self.submit)
        self.pair_button.pack(side="left", padx=(8, 0))
        self.result = ttk.Label(body, text="", wraplength=600, justify="left", style="Subtitle.TLabel")
        self.result.grid(row=3, column=0, columnspan=2, sticky="w", pady=(10, 0))
        self.close_button = ttk.Button(body, text="Close", command=self.destroy)
        self.close_button.grid(row=4, column=1, sticky="e", pady=(12, 0))
        body.columnconfigure(0, minsize=360)
        self.entry.bind("<Return>", lambda _event: self.submit())
        self.bind("<Escape>", lambda _event: self.destroy())
        restyle_tree(self)
        parent = master.winfo_toplevel()  # over the window it belongs to, wherever that is on the screen
        self.geometry(f"+{parent.winfo_rootx() + 80}+{parent.winfo_rooty() + 60}")
        self.entry.focus_set()

    def submit(self) -> None:
        """Start pairing with the typed code; the button waits until ``show_result``."""
        code = self.code.get().strip()
        if not code:
            self._say("Type the code first.", "error")
            return
        self.pair_button.configure(state="disabled")
        self._say("Pairing…", "info")
        self.on_pair(code)

    def show_result(self, result: PairingResult) -> None:
        """Success (with the server's identity) or why not; the user may try another code."""
        self.pair_button.configure(state="normal")
        if result.error:
            self._say(result.error, "error")
        else:
            self._say(f"Paired with the server\n{result.server_identity}\nThis client may now list and download.",
                      "ok")

    def _say(self, text: str, tone: str) -> None:
        set_style(self.result, tone_style(tone))
        self.result.configure(text=text)
