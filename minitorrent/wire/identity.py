"""Who a program is on the wire: its key, its certificate, and the ID people compare.

Each program (a server, a client) creates on first start a P-256 key and a
self-signed certificate, kept together in ``identity.pem`` in its data folder,
readable by its owner only (mode 0600). Its identity is the SHA-256 of the
certificate (DER): whoever can finish a TLS handshake with that certificate
holds the key, so a pinned identity cannot be borrowed.

An identity is written the way Syncthing writes device IDs: the 32 bytes in
base32 (52 characters), cut into four groups of 13, each followed by a Luhn
mod-32 check character, shown in groups of 7 joined by dashes::

    MFZWI3D-BONSGYC-YLTMRWG-C43ENR5-QXGZDMM-FZWI3DP-ONSGYYL-TMRWGC4

A typo in a group (one wrong character, or two swapped) fails its check
character, so an ID read aloud or copied by hand is either right or refused.

The cluster key (``cluster_key``) is the secret the main and the backup prove
to each other when ``server.secret`` is empty: a random file both read, made
by whichever starts first (like Erlang's cookie).
"""
from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from error_handler import ConfigError

if TYPE_CHECKING:  # for type hints only (see _self_signed)
    from cryptography import x509

IDENTITY_FILE = "identity.pem"  # the key and the certificate, together, so a reader never sees half
CERT_VALID_DAYS = 100 * 365  # validity is never checked (identities are pinned), so it must simply not lapse
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 base32
_GROUP = 13  # base32 characters per check character
ID_LENGTH = 63  # 56 characters and 7 dashes
SHORT_ID_LENGTH = 7  # the first group: enough for a person to tell two machines apart at a glance
CLUSTER_KEY_BYTES = 32


@dataclass(frozen=True)
class Identity:
    """A program's identity: the PEM file holding its key and certificate, and its ID."""

    path: Path
    certificate_der: bytes

    @property
    def id(self) -> str:
        """The identity as people compare it (``format_id``)."""
        return id_of_certificate(self.certificate_der)

    @property
    def short_id(self) -> str:
        """The identity's first group, for narrow places (a window's title)."""
        return self.id[:SHORT_ID_LENGTH]

    @functools.cached_property
    def _key(self) -> ec.EllipticCurvePrivateKey:
        return serialization.load_pem_private_key(self.path.read_bytes(), password=None)

    def identify(self, server_id: str, nonce: str) -> tuple[str, str]:
        """(certificate, signature), base64: proof for the server ``server_id`` that we hold our key.

        The signature covers the server's identity and its fresh ``nonce``, so
        it is worth nothing to any other server, nor to this one later.
        """
        signature = self._key.sign(_identify_text(server_id, nonce), ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(self.certificate_der).decode(), base64.b64encode(signature).decode()


def verify_identify(certificate: str, signature: str, server_id: str, nonce: str) -> str:
    """The identity a client proved with ``Identity.identify``; ``ValueError`` if the proof is bad."""
    from cryptography import x509  # here, not at the top: ~50 ms of every client's start-up, and only servers verify
    try:
        der = base64.b64decode(certificate, validate=True)
        public_key = x509.load_der_x509_certificate(der).public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("not an elliptic-curve certificate")
        public_key.verify(base64.b64decode(signature, validate=True), _identify_text(server_id, nonce),
                          ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as error:  # a curve it cannot load
        raise ValueError(f"identity proof refused: {error or type(error).__name__}") from None
    return id_of_certificate(der)


def _identify_text(server_id: str, nonce: str) -> bytes:
    return f"minitorrent-identify\0{server_id}\0{nonce}".encode()


def load_or_create(data_dir: Path) -> Identity:
    """This program's identity in ``data_dir``, created on first use.

    Two processes starting together on one folder end up with the same
    identity: the file is written aside and linked into place, and the loser
    of that race reads the winner's. Raises ``ConfigError`` if the folder
    cannot be written or the file is not a key and certificate.
    """
    path = Path(data_dir) / IDENTITY_FILE
    try:
        if not path.exists():
            _create(path)
        pem = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot keep this program's identity in {path}: {error.strerror or error}") from error
    return Identity(path, _certificate_der(pem, path))


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()) + _self_signed(key).public_bytes(serialization.Encoding.PEM)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    _write_private(aside, pem)
    try:
        os.link(aside, path)  # fails if another process got there first: then its identity is ours
    except FileExistsError:
        pass
    finally:
        aside.unlink()


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    from cryptography import x509  # only a new identity needs a certificate built (see verify_identify)
    from cryptography.x509.oid import NameOID
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "minitorrent")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS)).sign(key, hashes.SHA256()))


def _certificate_der(pem: bytes, path: Path) -> bytes:
    """The certificate of an identity file, DER; ``ConfigError`` unless it holds a key and its certificate.

    Checked by ``ssl`` (key, certificate, and that they match), not by
    ``cryptography.x509``, whose import alone would cost every start-up ~50 ms.
    """
    text = pem.decode("ascii", "replace")
    begin, end = text.find(ssl.PEM_HEADER), text.find(ssl.PEM_FOOTER)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(path, password=b"")  # never a prompt
        if begin < 0 or end < begin:
            raise ValueError("no certificate")
        return ssl.PEM_cert_to_DER_cert(text[begin:end + len(ssl.PEM_FOOTER)])
    except (ssl.SSLError, ValueError) as error:
        raise ConfigError(f"{path} is not a MiniTorrent identity (a key and a certificate); "
                          "move it away and a new identity is made") from error


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file only the owner may read, durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# IDs ------------------------------------------------------------------------------------


def id_of_certificate(der: bytes) -> str:
    """The identity of the certificate ``der`` (SHA-256 of it, in ``format_id`` form)."""
    return format_id(hashlib.sha256(der).digest())


def id_of_pem_certificate(pem: str) -> str:
    """The identity of a PEM certificate (as ``ssl`` hands them out)."""
    return id_of_certificate(ssl.PEM_cert_to_DER_cert(pem))


def format_id(digest: bytes) -> str:
    """A 32-byte digest as a dashed ID with a check character per 13 characters."""
    if len(digest) != 32:
        raise ValueError(f"an identity is 32 bytes, got {len(digest)}")
    text = base64.b32encode(digest).decode().rstrip("=")
    checked = "".join(group + _luhn32(group) for group in _groups(text, _GROUP))
    return "-".join(_groups(checked, SHORT_ID_LENGTH))


def parse_id(text: str) -> str:
    """``text`` as a well-formed ID (any case, dashes and spaces optional); ``ValueError`` if it is not one.

    The message says what is wrong: the length, a character outside
    base32, or which group's check character fails (a typo).
    """
    compact = "".join(text.split()).replace("-", "").upper()
    if len(compact) != 56:
        raise ValueError(f"an identity has 56 letters and digits (63 with dashes), got {len(compact)}")
    wrong = sorted(set(compact) - set(_ALPHABET))
    if wrong:
        raise ValueError(f"an identity holds only A-Z and 2-7, not {''.join(wrong)!r}")
    for number, group in enumerate(_groups(compact, _GROUP + 1), start=1):
        if _luhn32(group[:-1]) != group[-1]:
            raise ValueError(f"identity part {number} of 4 does not check out: a typo?")
    return "-".join(_groups(compact, SHORT_ID_LENGTH))


def _groups(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _luhn32(text: str) -> str:
    """The Luhn mod-32 check character of ``text`` (base32 characters)."""
    n = len(_ALPHABET)
    total, factor = 0, 2
    for char in reversed(text):
        addend = factor * _ALPHABET.index(char)
        total += addend // n + addend % n
        factor = 1 if factor == 2 else 2
    return _ALPHABET[(n - total % n) % n]


# The cluster key --------------------------------------------------------------------------


def cluster_key(path: Path) -> str:
    """The secret in the cluster key file at ``path``, created (mode 0600) if it is missing.

    Raises ``ConfigError`` naming the file if it cannot be read or made,
    or if it is readable by others (a key the whole machine can read is
    not a secret).
    """
    path = Path(path)
    try:
        if not path.exists():
            _create_cluster_key(path)
        mode = path.stat().st_mode & 0o077
        if mode:
            raise ConfigError(f"{path}: the cluster key must be readable by its owner only: chmod 600 {path}")
        key = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read or create the cluster key {path}: {getattr(error, 'strerror', error)}") from error
    if len(key) < 32:
        raise ConfigError(f"{path}: the cluster key is too short; delete it on both servers' machines and restart")
    return key


def _create_cluster_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    _write_private(aside, (secrets.token_hex(CLUSTER_KEY_BYTES) + "\n").encode())
    try:
        os.link(aside, path)  # the backup starting beside the main must end up with the main's key
    except FileExistsError:
        pass
    finally:
        aside.unlink()
