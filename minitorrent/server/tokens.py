"""Tokens for the web face under ``server.access: paired``: what a browser, curl or wget shows instead of a certificate.

A token is 64 URL-safe characters: the 32 bytes of the holder's identity
(a paired client's, or a fixed digest standing for the server's operator) followed by
16 bytes of HMAC-SHA256 over them, keyed by ``token_key``::

    base64url( identity digest (32 B) | HMAC(key, "minitorrent-web-token\\0" | digest)[:16] )

Nothing is stored per token: the server recomputes the MAC and compares it
in constant time, then asks ``access.db`` whether that identity is still
paired, so revoking a client (``main_server.py revoke ID``) stops its token
at the next request. The main, the backup and every cluster member derive
the same key from the secret they already share (``server.secret`` or the
cluster key file), so a token keeps working after a failover; a main with no
peer keeps a random key in its ``access.db`` instead. Changing that secret
(or deleting the key) changes every token, the operator's included.

Tokens are secrets: they are never logged.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from minitorrent.net.serving import PeerHandler
from minitorrent.server.access import AccessList
from minitorrent.wire import protocol
from minitorrent.wire.identity import format_id, parse_id
from minitorrent.wire.protocol import ErrorCode, Frame, RequestFailed

TOKEN_MAC_BYTES = 16  # 128 bits: forging one takes 2^128 tries online
OPERATOR = "operator"  # who holds the operator's token (not an identity: no certificate behind it)
_OPERATOR_DIGEST = hashlib.sha256(b"minitorrent-web-operator").digest()  # no certificate has this SHA-256
_LABEL = b"minitorrent-web-token\0"
MAX_TOKEN_CHARS = 128  # anything longer is not a token: refused before decoding


def token_key(shared_secret: str, access: AccessList) -> bytes:
    """The key tokens are made with: from ``shared_secret`` when there is one, else ``access``'s own random key."""
    if shared_secret:
        return hmac.new(shared_secret.encode(), b"minitorrent-web-token-key", hashlib.sha256).digest()
    return access.local_key()


class WebTokens:
    """Makes and checks tokens for one server. Thread-safe (``AccessList`` is)."""

    def __init__(self, key: bytes, access: AccessList) -> None:
        self._key = key
        self.access = access

    def token_for(self, identity: str) -> str:
        """The token of the client ``identity`` (a well-formed ID; ``ValueError`` otherwise)."""
        return self._token(_digest_of(parse_id(identity)))

    def operator_token(self) -> str:
        """The token of this server's operator (works as long as the shared secret stays the same)."""
        return self._token(_OPERATOR_DIGEST)

    def holder(self, token: str) -> str | None:
        """Whose ``token`` this is (an identity still paired, or ``OPERATOR``); None if it is nobody's."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(token.strip() + "=" * (-len(token.strip()) % 4))
        except (binascii.Error, ValueError):
            return None
        digest, mac = raw[:32], raw[32:]
        if len(raw) != 32 + TOKEN_MAC_BYTES or not hmac.compare_digest(self._mac(digest), mac):
            return None
        if digest == _OPERATOR_DIGEST:
            return OPERATOR
        identity = format_id(digest)
        return identity if self.access.is_paired(identity) else None

    def _token(self, digest: bytes) -> str:
        return base64.urlsafe_b64encode(digest + self._mac(digest)).decode().rstrip("=")

    def _mac(self, digest: bytes) -> bytes:
        return hmac.new(self._key, _LABEL + digest, hashlib.sha256).digest()[:TOKEN_MAC_BYTES]


def _digest_of(identity: str) -> bytes:
    """The 32 bytes an ID spells (``format_id`` backwards; the ID is already checked)."""
    compact = identity.replace("-", "")
    groups = [compact[i:i + 13] for i in range(0, len(compact), 14)]  # drop each group's check character
    return base64.b32decode("".join(groups) + "====")



def web_token_handler(tokens: WebTokens) -> PeerHandler:
    """The handler of a client's ``GetWebToken``: its token, only if it proved a paired identity over TLS."""

    def handle(handler, frame: Frame) -> None:
        identity = handler.client_identity
        if not identity or not tokens.access.is_paired(identity):
            raise RequestFailed(ErrorCode.NOT_PAIRED, "not paired: ask the server's operator for a code, "
                                                      "then run: python client.py pair CODE")
        handler.connection.send(protocol.WebToken(tokens.token_for(identity)))

    return handle
