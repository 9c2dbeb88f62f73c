"""Pairing a client with a server through a one-time code, as magic-wormhole pairs two machines.

With ``server.access: paired`` only clients whose identity the server has
accepted may list and download. The operator gets a short one-time code
(``python main_server.py pair``) and tells it to the user, who runs
``python client.py pair CODE``. The two then run SPAKE2, a password-
authenticated key exchange, keyed by the code: each side ends up with a
shared key only if both used the same code, and a machine in the middle
learns nothing it could test guesses against offline. Each side then proves
it holds the key with a MAC over *both identities as it sees them*::

    client -> server   PairStart(SPAKE2 message A)
    server -> client   PairReply(SPAKE2 message B, MAC(key, "server", server id, client id))
    client -> server   PairConfirm(MAC(key, "client", server id, client id))
    server -> client   Ok                       (the client's identity is now accepted)

The identities are those of the TLS connection: the server's certificate
as the client saw it, the client's as it proved it (``Identify``). A machine
in the middle presenting its own certificate makes the two sides' views
differ, so the MACs fail; without the code it cannot make them agree. A code
is good for one attempt only (the server forgets it when a client starts),
so guessing online gets one try per code the operator hands out.

This module does no I/O: the client floor and the server floor carry the
messages.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from spake2 import SPAKE2_A, SPAKE2_B

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: a code is read aloud and typed
CODE_CHARS = 8  # 40 bits; one guess per code, so even far fewer would do
_ID_CLIENT = b"minitorrent-client"
_ID_SERVER = b"minitorrent-server"
MAX_MESSAGE_CHARS = 512  # a SPAKE2 message is 33 bytes


class PairingFailed(Exception):
    """The other side did not prove it used the same code (or sent something malformed)."""


def new_code() -> str:
    """A fresh one-time code, ``XXXX-XXXX``."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_CHARS))
    return f"{raw[:4]}-{raw[4:]}"


def normalize_code(text: str) -> str:
    """``text`` as a code (any case, dashes and spaces optional); ``ValueError`` if it cannot be one."""
    compact = "".join(text.split()).replace("-", "").upper()
    if len(compact) != CODE_CHARS or set(compact) - set(CODE_ALPHABET):
        raise ValueError(f"a pairing code is {CODE_CHARS} letters and digits like ABCD-EF23, got {text!r}")
    return f"{compact[:4]}-{compact[4:]}"


class _Side:
    """One side of the exchange: SPAKE2 keyed by the code, then MACs over both identities."""

    def __init__(self, spake, server_id: str, client_id: str) -> None:
        self._spake = spake
        self._transcript = f"{server_id}\0{client_id}".encode()
        self._key: bytes | None = None

    def start(self) -> str:
        """Our SPAKE2 message (base64), to send first."""
        return base64.b64encode(self._spake.start()).decode()

    def receive(self, message: str) -> None:
        """Take the other side's SPAKE2 message; ``PairingFailed`` if it is malformed."""
        if len(message) > MAX_MESSAGE_CHARS:
            raise PairingFailed("pairing message too long")
        try:
            self._key = self._spake.finish(base64.b64decode(message, validate=True))
        except Exception as error:  # spake2 raises its own errors for a message off the curve
            raise PairingFailed(f"bad pairing message: {error}") from None

    def confirmation(self, who: bytes) -> str:
        """MAC (base64) proving we hold the key, for ``who`` ("server" or "client")."""
        if self._key is None:
            raise PairingFailed("no pairing message received yet")
        mac = hmac.new(self._key, who + b"\0" + self._transcript, hashlib.sha256).digest()
        return base64.b64encode(mac).decode()

    def check(self, who: bytes, confirmation: str) -> None:
        """``PairingFailed`` unless ``confirmation`` proves the other side used the same code and identities."""
        if not hmac.compare_digest(self.confirmation(who), confirmation):
            raise PairingFailed("the code did not match (or a machine in the middle changed the identities)")


class ClientPairing(_Side):
    """The client's side: ``start``, then ``finish(reply)``, which returns the confirmation to send."""

    def __init__(self, code: str, server_id: str, client_id: str) -> None:
        code = normalize_code(code)
        super().__init__(SPAKE2_A(code.encode(), idA=_ID_CLIENT, idB=_ID_SERVER), server_id, client_id)

    def finish(self, message: str, server_confirmation: str) -> str:
        """Check the server's reply; our confirmation to send. ``PairingFailed`` on a wrong code."""
        self.receive(message)
        self.check(b"server", server_confirmation)
        return self.confirmation(b"client")


class ServerPairing(_Side):
    """The server's side: ``reply(start)`` gives (message, confirmation); ``check_client`` the last step."""

    def __init__(self, code: str, server_id: str, client_id: str) -> None:
        super().__init__(SPAKE2_B(normalize_code(code).encode(), idA=_ID_CLIENT, idB=_ID_SERVER),
                         server_id, client_id)

    def reply(self, client_message: str) -> tuple[str, str]:
        """Our SPAKE2 message and our confirmation, answering the client's first message."""
        ours = self.start()
        self.receive(client_message)
        return ours, self.confirmation(b"server")

    def check_client(self, confirmation: str) -> None:
        """``PairingFailed`` unless the client proved the same code and identities."""
        self.check(b"client", confirmation)
