"""ed25519 signatures made with the bank's own key pair: bundles and build directories (no transparency log).

What is signed is always a context string, a NUL byte, then the exact bytes of a manifest (canonical JSON: sorted
keys, no spaces). The context differs per kind of artifact ("bankllm-bundle-v1", "bankllm-build-v1"), so a build
directory's signature can never be replayed as a bundle's, or the other way round, even under the same key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .artifacts import SIGNATURE_FILE
from .errors import InputError, SignatureError
from .fsutil import sha256_file, write_bytes_atomic

BUNDLE_CONTEXT = "bankllm-bundle-v1"
BUILD_CONTEXT = "bankllm-build-v1"
SIGNATURE_SCHEMA = "bankllm-signature/1"
BUILD_MANIFEST_SCHEMA = "bankllm-build-manifest/1"
PRIVATE_KEY_FILE = "bankllm-signing.key"
PUBLIC_KEY_FILE = "bankllm-signing.pub"
# A signature document is a few hundred bytes; a build manifest lists a dozen files. Anything far larger is not ours
# and is refused before it is parsed.
MAX_SIGNATURE_BYTES = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- keys -----------------------------------------------------------------------------------------

def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, with `mode` from its first byte (a temp file, then a hard link: a
    concurrent writer or an existing key is never overwritten, and a crash never leaves half a key)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask does not widen or narrow what we asked for
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.link(tmp, path)
    except FileExistsError:
        raise InputError(f"{path} already exists", "choose another --out directory; existing keys are never "
                                                   "overwritten") from None
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def generate_keys(out_dir: Path) -> tuple[Path, Path]:
    """A new key pair in `out_dir`: the private key (PEM PKCS#8, 0600) and the public key (PEM, 0644)."""
    out_dir = Path(out_dir)
    private, public = out_dir / PRIVATE_KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for p in (private, public):
        if p.exists() or p.is_symlink():
            raise InputError(f"{p} already exists", "choose another --out directory; existing keys are never "
                                                    "overwritten")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    _write_new(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)
    _write_new(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
    return private, public


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 1024:
            raise InputError(f"{what} {path} is not a key file", "pass the file `bankllm sign keygen` wrote")
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist", "make a key pair with `bankllm sign keygen --out DIR`") \
            from None
    except PermissionError:
        raise InputError(f"{what} {path} cannot be read", "run as a user who can read it (root for a system "
                                                          "install)") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key (PEM PKCS#8, unencrypted); refused when others can read it, as ssh does."""
    path = Path(path)
    data = _read_key_file(path, "signing key")
    if b"PRIVATE KEY" not in data:
        raise InputError(f"{path} is not a private key", "pass the private key (bankllm-signing.key) to --sign/--key; "
                                                         "the .pub file is for --trust")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise InputError(f"signing key {path} can be read by other users (mode {mode:04o})", f"chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"signing key {path} cannot be loaded ({exc})",
                         "pass an unencrypted ed25519 key made by `bankllm sign keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"signing key {path} is not an ed25519 key", "make one with `bankllm sign keygen`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The trusted key: PEM (SubjectPublicKeyInfo), OpenSSH `ssh-ed25519 ...`, or its 32 raw bytes."""
    path = Path(path)
    data = _read_key_file(path, "trusted public key")
    if b"PRIVATE KEY" in data:
        raise InputError(f"{path} is a private key", "pass the public key (bankllm-signing.pub); keep the private "
                                                     "key off the server")
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        elif data.startswith(b"ssh-ed25519 "):
            key = serialization.load_ssh_public_key(data.strip())
        elif len(data) == 32:
            key = Ed25519PublicKey.from_public_bytes(data)
        else:
            raise ValueError("not PEM, OpenSSH or 32 raw bytes")
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InputError(f"trusted public key {path} cannot be loaded ({exc})",
                         "pass the bankllm-signing.pub that `bankllm sign keygen` wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"trusted public key {path} is not an ed25519 key", "pass the .pub from `bankllm sign keygen`")
    return key


# --- signatures over bytes ------------------------------------------------------------------------

def canonical_json(obj) -> bytes:
    """The one byte form of a manifest that is signed: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _message(context: str, payload: bytes) -> bytes:
    return context.encode("ascii") + b"\0" + payload


def signature_document(private_key: Ed25519PrivateKey, context: str, payload: bytes, **fields) -> dict:
    """A signature over `payload` under `context`, as a JSON-able document (extra `fields` travel unsigned
    unless they are the payload itself)."""
    sig = private_key.sign(_message(context, payload))
    return {"schema": SIGNATURE_SCHEMA, "algorithm": "ed25519", "context": context,
            "key_id": key_id(private_key.public_key()), **fields, "signature": base64.b64encode(sig).decode()}


def parse_document(data: bytes, what: str) -> dict:
    """A signature document's JSON, checked for shape (not yet for the signature)."""
    fix = "sign it again with `bankllm sign` / `bankllm bundle --sign`"
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{what} is {len(data)} bytes, too large to be a signature", fix)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SignatureError(f"{what} is not valid JSON ({exc})", fix) from None
    if not isinstance(doc, dict) or doc.get("schema") != SIGNATURE_SCHEMA or doc.get("algorithm") != "ed25519" \
            or not all(isinstance(doc.get(k), str) for k in ("context", "key_id", "signature")):
        raise SignatureError(f"{what} is not a bankllm signature ({SIGNATURE_SCHEMA}, ed25519)", fix)
    return doc


def verify_document(public_key: Ed25519PublicKey, context: str, payload: bytes, doc: dict, what: str) -> None:
    """Raise SignatureError unless `doc` is a signature by `public_key` over `context` + `payload`."""
    if doc["context"] != context:
        raise SignatureError(f"{what} was made for {doc['context']!r}, not {context!r}",
                             "a signature of one kind of artifact is never accepted for another; sign this one")
    trusted = key_id(public_key)
    if doc["key_id"] != trusted:
        raise SignatureError(f"{what} was made with key {doc['key_id']}, not the trusted key {trusted}",
                             "sign with the key whose .pub you trust, or trust the key that signed it")
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
        public_key.verify(sig, _message(context, payload))
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(f"{what} does not match the signed bytes (altered after signing, or forged)",
                             "get the artifact again from whoever signed it; do not use this copy") from None


# --- build directories ----------------------------------------------------------------------------

def _entries(build_dir: Path) -> dict[str, os.stat_result]:
    """Every entry of the build directory but its signature, by name (lstat: a link is not followed)."""
    try:
        return {p.name: p.lstat() for p in Path(build_dir).iterdir() if p.name != SIGNATURE_FILE}
    except FileNotFoundError:
        raise InputError(f"build directory {build_dir} does not exist", "pass a directory `bankllm build` wrote") \
            from None
    except NotADirectoryError:
        raise InputError(f"{build_dir} is not a build directory", "pass a directory `bankllm build` wrote") from None


def build_manifest(build_dir: Path) -> dict:
    """Every file of a build directory with its size and sha256: what the service reads and the Modelfile alike.

    Only a flat directory of regular files can be signed: a link, a subdirectory or a dot-file (which the installer
    does not copy) would be something the signature does not pin down."""
    build_dir = Path(build_dir)
    files = {}
    for name, st in sorted(_entries(build_dir).items()):
        if name.startswith(".") or not stat.S_ISREG(st.st_mode):
            raise InputError(f"{build_dir}/{name} is not a plain regular file, so it cannot be signed",
                             "remove it (a build directory holds only the files `bankllm build` wrote)")
        files[name] = {"size": st.st_size, "sha256": sha256_file(build_dir / name)}
    if not files:
        raise InputError(f"build directory {build_dir} is empty", "pass a directory `bankllm build` wrote")
    return {"schema": BUILD_MANIFEST_SCHEMA, "files": files}


def build_signature(build_dir: Path, private_key: Ed25519PrivateKey) -> bytes:
    """The signature file's bytes for a build directory (its manifest travels inside, signed)."""
    manifest = build_manifest(build_dir)
    doc = signature_document(private_key, BUILD_CONTEXT, canonical_json(manifest), manifest=manifest)
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def sign_build(build_dir: Path, private_key: Ed25519PrivateKey) -> Path:
    """Write the build directory's signature file (atomically, replacing an older one); return its path."""
    path = Path(build_dir) / SIGNATURE_FILE
    write_bytes_atomic(path, build_signature(build_dir, private_key), mode=0o644)
    return path


def _checked_manifest(manifest, what: str) -> dict[str, dict]:
    fix = "sign the build directory again with `bankllm sign`"
    if not isinstance(manifest, dict) or manifest.get("schema") != BUILD_MANIFEST_SCHEMA \
            or not isinstance(manifest.get("files"), dict):
        raise SignatureError(f"{what} holds no {BUILD_MANIFEST_SCHEMA} manifest", fix)
    for name, entry in manifest["files"].items():
        if not (isinstance(name, str) and name and "/" not in name and "\0" not in name
                and not name.startswith(".") and name != SIGNATURE_FILE
                and isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) and _HEX64.match(entry["sha256"])):
            raise SignatureError(f"{what} lists an entry that is not a plain file name with size and sha256 "
                                 f"({str(name)[:60]!r})", fix)
    return manifest["files"]


def verify_build(build_dir: Path, public_key: Ed25519PublicKey) -> dict:
    """Check the build directory against its signature: the signature, then that no file is missing, added or
    changed (sizes first, then one sha256 pass over each file). Returns the verified manifest."""
    build_dir = Path(build_dir)
    sig_path = build_dir / SIGNATURE_FILE
    what = f"the signature of build {build_dir}"
    try:
        st = sig_path.lstat()
    except FileNotFoundError:
        if not build_dir.is_dir():
            raise InputError(f"build directory {build_dir} does not exist", "pass a directory `bankllm build` "
                                                                            "wrote") from None
        raise SignatureError(f"build {build_dir} is not signed (no {SIGNATURE_FILE})",
                             f"sign it with `bankllm sign {build_dir} --key KEY`, or unset trust_key") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{sig_path} is not a signature file (a link, or too large)",
                             "sign the build directory again")
    doc = parse_document(sig_path.read_bytes(), what)
    if "manifest" not in doc:
        raise SignatureError(f"{what} holds no manifest", "sign the build directory again with `bankllm sign`")
    # The canonical bytes of what was parsed are what is verified, and what is then used: nothing unsigned is read.
    verify_document(public_key, BUILD_CONTEXT, canonical_json(doc["manifest"]), doc, what)
    files = _checked_manifest(doc["manifest"], what)
    entries = _entries(build_dir)
    fix = "restore the build directory from the signed original (or sign it again if the change is yours)"
    extra = sorted(set(entries) - set(files))
    if extra:
        raise SignatureError(f"build {build_dir} holds {extra[0]!r}, which its signature does not cover", fix)
    missing = sorted(set(files) - set(entries))
    if missing:
        raise SignatureError(f"build {build_dir} lacks {missing[0]!r}, which its signature covers", fix)
    for name, entry in sorted(files.items()):
        st = entries[name]
        if not stat.S_ISREG(st.st_mode):
            raise SignatureError(f"build {build_dir}: {name} is not a regular file (a link or a directory)", fix)
        if st.st_size != entry["size"]:
            raise SignatureError(f"build {build_dir}: {name} changed since it was signed (size)", fix)
    for name, entry in sorted(files.items()):
        if sha256_file(build_dir / name) != entry["sha256"]:
            raise SignatureError(f"build {build_dir}: {name} changed since it was signed (sha256)", fix)
    return doc["manifest"]


def verify_served_model(model: Path | None, trust_key: Path) -> Path | None:
    """What `bankllm serve` does at start when trust_key is set: the model must be a signed build directory that
    verifies under the key. Returns the resolved directory (served from then on, so a link switched later does not
    swap in an unverified build)."""
    key = load_public_key(trust_key)
    if model is None:
        return None  # resolve_model says what is missing
    path = Path(model)
    if not path.is_dir():
        raise SignatureError(f"trust_key is set, but the model {path} is not a build directory",
                             "serve the signed build directory (model.gguf beside bankllm-build.sig)")
    path = path.resolve()
    verify_build(path, key)
    return path


# --- bundles --------------------------------------------------------------------------------------

def sign_bundle_manifest(private_key: Ed25519PrivateKey, manifest_bytes: bytes) -> bytes:
    """The bundle's manifest.sig: a signature over the exact bytes of its manifest.json."""
    doc = signature_document(private_key, BUNDLE_CONTEXT, manifest_bytes)
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def verify_bundle_manifest(public_key: Ed25519PublicKey, manifest_bytes: bytes, sig_bytes: bytes,
                           what: str) -> None:
    verify_document(public_key, BUNDLE_CONTEXT, manifest_bytes, parse_document(sig_bytes, what), what)
