"""A test PKI made with `cryptography`: a bank CA, a server certificate for 127.0.0.1/localhost, client
certificates from the bank CA and from another CA (no openssl binary, nothing fetched)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path, password: bytes | None = None) -> Path:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    path.chmod(0o600)
    return path


def _write_cert(certs, path: Path) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


@dataclasses.dataclass
class CA:
    key: object
    cert: x509.Certificate
    path: Path

    def issue(self, out: Path, stem: str, *, server: bool, dns=(), ips=(), not_before=None, not_after=None,
              password: bytes | None = None) -> tuple[Path, Path]:
        """(certificate file, key file) of a leaf signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or NOW - datetime.timedelta(hours=1))
                   .not_valid_after(not_after or NOW + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _write_cert([cert], out / f"{stem}.pem"), _write_key(key, out / f"{stem}.key", password)


def make_ca(out: Path, cn: str) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    return CA(key, cert, _write_cert([cert], out / f"{cn}.pem"))


@dataclasses.dataclass
class PKI:
    dir: Path
    ca: CA            # the bank's CA: signs the server certificate and the good client certificate
    other_ca: CA      # a stranger's CA
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def make_pki(out: Path) -> PKI:
    ca, other = make_ca(out, "bank-ca"), make_ca(out, "other-ca")
    server = ca.issue(out, "server", server=True, dns=["localhost"], ips=["127.0.0.1", "::1"])
    client = ca.issue(out, "client", server=False)
    stranger = other.issue(out, "stranger", server=False)
    return PKI(out, ca, other, *server, *client, *stranger)
