"""How the main and the backup prove they share ``server.secret``, and how an epoch is proven.

An HMAC challenge-response in both directions; the secret itself never
crosses the wire. Each side's proof covers the other side's fresh random
nonce and a purpose string, so a recorded proof cannot be replayed and a
server's proof cannot be reflected back as a peer's.

An epoch is authority, so it travels with proof: the active server hands
clients its epoch with an HMAC over (epoch, server id) keyed with the same
secret, which a client relays in its hellos. A server believes a relayed
epoch only if that proof checks out; only a server that knows the secret
can have made it. (Replaying a real proof is harmless: it only repeats an
epoch a server really took.)
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


EPOCH_PURPOSE = "minitorrent-epoch"


def prove_epoch(secret: str, epoch: int, server_id: str) -> str:
    """The proof a server with ``secret`` gives that ``server_id`` took ``epoch`` ("" without a secret)."""
    return prove(secret, EPOCH_PURPOSE, f"{epoch}:{server_id}") if secret else ""


def epoch_proof_ok(secret: str, epoch: int, server_id: str, proof: str) -> bool:
    """True if ``proof`` shows a server knowing ``secret`` issued ``epoch`` as ``server_id`` (constant time)."""
    return proof_ok(secret, EPOCH_PURPOSE, f"{epoch}:{server_id}", proof)
