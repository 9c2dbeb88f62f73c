"""How the main and the backup prove they share ``server.secret``.

An HMAC challenge-response in both directions; the secret itself never
crosses the wire. Each side's proof covers the other side's fresh random
nonce and a purpose string, so a recorded proof cannot be replayed and a
server's proof cannot be reflected back as a peer's.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

SERVER_PURPOSE = "minitorrent-server"
PEER_PURPOSE = "minitorrent-peer"


def new_nonce() -> str:
    """A fresh random challenge."""
    return secrets.token_hex(16)


def prove(secret: str, purpose: str, nonce: str) -> str:
    """HMAC-SHA256 of ``purpose:nonce`` keyed with the shared secret, hex."""
    return hmac.new(secret.encode(), f"{purpose}:{nonce}".encode(), hashlib.sha256).hexdigest()


def proof_ok(secret: str, purpose: str, nonce: str, proof: str) -> bool:
    """True if ``proof`` answers ``nonce`` for ``purpose`` with ``secret`` (constant time)."""
    return bool(secret) and hmac.compare_digest(prove(secret, purpose, nonce), proof)
