"""TLS: the bank's certificate, key and client CA checked when the settings load, then handed to uvicorn."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from ..errors import ConfigError
from ..settings import Settings


def _read(name: str, path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{name} {path} does not exist", f"set {name} to the bank's PEM file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name} {path} is a directory", f"set {name} to a PEM file") from None
    except PermissionError:
        raise ConfigError(f"{name} {path} is not readable by this user",
                          "run as root (`bankllm install` hands the service a copy) or fix its owner and mode") from None
    except OSError as exc:
        raise ConfigError(f"{name} {path} cannot be read: {exc.strerror}", f"check {name}") from None


def _certificates(name: str, path: Path) -> list:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(_read(name, path))
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{name} {path} holds no PEM certificate", f"set {name} to a PEM file (-----BEGIN CERTIFICATE-----)")
    return certs


def _private_key(path: Path):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = _read("tls_key", path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying the key needs a password
        raise ConfigError(f"tls_key {path} is encrypted (it needs a password at every start)",
                          "give an unencrypted key: `openssl pkey -in KEY -out KEY.plain`, kept 0600") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"tls_key {path} is not a PEM private key ({type(exc).__name__})",
                          "set tls_key to the certificate's PEM private key (-----BEGIN PRIVATE KEY-----)") from None


def _spki(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_files(files: dict[str, Path], now: datetime.datetime | None = None) -> None:
    """Raise ConfigError (one line) unless the certificate and key exist, parse, match and are in date, and the
    client CA parses; then load them as uvicorn will, so a start never fails on them later."""
    cert_path, key_path = files["tls_cert"], files["tls_key"]
    leaf = _certificates("tls_cert", cert_path)[0]
    key = _private_key(key_path)
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise ConfigError(f"tls_key {key_path} is not the private key of tls_cert {cert_path}",
                          "set tls_key to the key the certificate was issued for (or tls_cert to its certificate)")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc < now:
        raise ConfigError(f"tls_cert {cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d}",
                          "renew the certificate and set tls_cert to the new one")
    if leaf.not_valid_before_utc > now:
        raise ConfigError(f"tls_cert {cert_path} is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                          "check this machine's clock, or use a certificate that is valid now")
    ca_path = files.get("tls_client_ca")
    if ca_path is not None:
        _certificates("tls_client_ca", ca_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert_path), str(key_path))
        if ca_path is not None:
            context.load_verify_locations(cafile=str(ca_path))
    except ssl.SSLError as exc:
        raise ConfigError(f"the TLS files are refused by OpenSSL: {exc.reason or exc}",
                          "check tls_cert, tls_key and tls_client_ca") from None


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn's ssl_* arguments for these settings ({} = plain HTTP)."""
    files = settings.resolved_tls_files()
    if not files:
        return {}
    options = {"ssl_certfile": str(files["tls_cert"]), "ssl_keyfile": str(files["tls_key"])}
    if "tls_client_ca" in files:
        options["ssl_ca_certs"] = str(files["tls_client_ca"])
        # Without require_client_cert a certificate is optional, but one that is sent must chain to the bank's CA.
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_OPTIONAL
    return options


def leaf_der(cert_path: Path) -> bytes:
    """The DER bytes of the certificate's first (server) certificate: what the service presents in the handshake."""
    from cryptography.hazmat.primitives import serialization

    return _certificates("tls_cert", cert_path)[0].public_bytes(serialization.Encoding.DER)


def names_of(cert_path: Path) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the certificate is valid for (its subjectAltName)."""
    from cryptography import x509

    leaf = _certificates("tls_cert", cert_path)[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
