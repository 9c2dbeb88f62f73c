"""Identities: one key and certificate per program, IDs people can check, the cluster key file."""
from __future__ import annotations

import hashlib
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from error_handler import ConfigError
from minitorrent.wire.identity import (
    IDENTITY_FILE,
    cluster_key,
    format_id,
    id_of_certificate,
    load_or_create,
    parse_id,
)

ROOT = Path(__file__).resolve().parents[2]


class TestIdentityFile:
    def test_first_start_creates_a_private_key_and_certificate(self, tmp_path):
        """The identity file is made on first use, readable by its owner only, and holds a P-256 certificate."""
        identity = load_or_create(tmp_path / "data")
        mode = stat.S_IMODE((tmp_path / "data" / IDENTITY_FILE).stat().st_mode)
        certificate = x509.load_der_x509_certificate(identity.certificate_der)
        assert (0o600, "secp256r1") == (mode, certificate.public_key().curve.name)

    def test_identity_is_stable_across_starts(self, tmp_path):
        """A second start reads the same identity instead of making a new one."""
        assert load_or_create(tmp_path).id == load_or_create(tmp_path).id

    def test_identity_is_the_sha256_of_the_certificate(self, tmp_path):
        """The ID encodes SHA-256 of the DER certificate."""
        identity = load_or_create(tmp_path)
        assert format_id(hashlib.sha256(identity.certificate_der).digest()) == identity.id

    def test_programs_starting_together_share_one_identity(self, tmp_path):
        """Eight threads creating the identity at once all end up with the same one."""
        seen: list[str] = []
        threads = [threading.Thread(target=lambda: seen.append(load_or_create(tmp_path).id)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert 1 == len(set(seen))

    def test_a_damaged_file_is_a_one_line_error(self, tmp_path):
        """A file that is not a key and certificate is refused with a message naming it."""
        (tmp_path / IDENTITY_FILE).write_text("not a key")
        with pytest.raises(ConfigError, match=IDENTITY_FILE):
            load_or_create(tmp_path)

    def test_a_key_with_another_identitys_certificate_is_refused(self, tmp_path):
        """A key beside a certificate that is not its own is not an identity (it could never prove itself)."""
        first, second = (load_or_create(tmp_path / name).path.read_text() for name in ("a", "b"))
        key, certificate = first.split("-----BEGIN CERTIFICATE-----")[0], second[second.index("-----BEGIN CERTIFICATE-----"):]
        (tmp_path / IDENTITY_FILE).write_text(key + certificate)
        with pytest.raises(ConfigError, match=IDENTITY_FILE):
            load_or_create(tmp_path)

    def test_the_certificate_read_is_the_one_tls_presents(self, tmp_path):
        """The DER the identity is computed from is exactly the certificate in the file, byte for byte."""
        identity = load_or_create(tmp_path)
        pem = identity.path.read_bytes()
        expected = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        assert expected == identity.certificate_der

    def test_loading_an_identity_does_not_import_x509(self, tmp_path):
        """A client's start-up reads its identity without cryptography.x509 (about 50 ms of import)."""
        load_or_create(tmp_path)
        code = ("import sys; from minitorrent.wire.identity import load_or_create; "
                f"load_or_create({str(tmp_path)!r}); print('cryptography.x509' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        assert "False" == done.stdout.strip()


class TestIds:
    def test_format_is_eight_groups_of_seven(self, tmp_path):
        """An ID is 8 dash-separated groups of 7 base32 characters."""
        groups = load_or_create(tmp_path).id.split("-")
        assert [7] * 8 == [len(group) for group in groups]

    def test_parse_accepts_any_case_and_spacing(self, tmp_path):
        """Lower case, no dashes or spaces between groups parse to the same ID."""
        canonical = load_or_create(tmp_path).id
        assert canonical == parse_id(canonical.lower().replace("-", " "))

    @pytest.mark.parametrize("position", range(0, 63, 5))
    def test_one_wrong_character_is_caught(self, tmp_path, position):
        """Changing any one character makes the ID fail its check characters."""
        canonical = load_or_create(tmp_path).id
        if canonical[position] == "-":
            position += 1
        wrong = canonical[:position] + ("B" if canonical[position] == "A" else "A") + canonical[position + 1:]
        with pytest.raises(ValueError, match="does not check out|letters and digits"):
            parse_id(wrong)

    def test_wrong_length_and_alphabet_are_explained(self):
        """Too short, or holding 0/1/8/9, gets a message saying which."""
        with pytest.raises(ValueError, match="56 letters"):
            parse_id("ABC")
        with pytest.raises(ValueError, match="only A-Z and 2-7"):
            parse_id("0" * 56)

    def test_distinct_certificates_have_distinct_ids(self, tmp_path):
        """Two programs' identities differ."""
        assert id_of_certificate(load_or_create(tmp_path / "a").certificate_der) != \
            id_of_certificate(load_or_create(tmp_path / "b").certificate_der)


class TestClusterKey:
    def test_made_once_private_and_shared(self, tmp_path):
        """The first caller makes the key file (0600); every later caller reads the same key."""
        path = tmp_path / "cluster.key"
        first = cluster_key(path)
        assert (0o600, first) == (stat.S_IMODE(path.stat().st_mode), cluster_key(path))

    def test_a_key_others_can_read_is_refused(self, tmp_path):
        """A key file readable by the group or others is refused with the chmod that fixes it."""
        path = tmp_path / "cluster.key"
        cluster_key(path)
        path.chmod(0o644)
        with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
            cluster_key(path)
