"""API keys: several, each with an id and a name, stored only as salted SHA-256 hashes, checked in constant time.

A key looks like `bk_<id>_<secret>`; the id selects the stored record, the whole key is hashed with that record's
salt and compared with hmac.compare_digest. The secret has 256 bits of entropy, so a fast salted hash is enough
(a slow KDF protects guessable passwords, not random tokens).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import re
import secrets
from pathlib import Path

from ..errors import ConfigError, InputError
from ..fsutil import write_json_atomic

KEY_RE = re.compile(r"^bk_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")


@dataclasses.dataclass
class KeyRecord:
    id: str
    name: str
    salt: str
    hash: str
    created: str
    revoked: str | None = None


def _hash(salt: str, key: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


def load_records(path: Path) -> list[KeyRecord]:
    """Read the key file; a missing file means no keys."""
    try:
        data = json.loads(Path(path).read_text())
        return [KeyRecord(**r) for r in data["keys"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"API key file {path} is not valid ({exc})",
                          "restore it from backup or delete it and create keys with `bankllm keys create`") from None


def save_records(path: Path, records: list[KeyRecord]) -> None:
    write_json_atomic(Path(path), {"version": 1, "keys": [dataclasses.asdict(r) for r in records]}, mode=0o600)


def create_key(path: Path, name: str) -> tuple[KeyRecord, str]:
    """Add a key named `name`; return its record and the key itself (shown once, never stored)."""
    if not NAME_RE.match(name):
        raise InputError(f"key name {name!r} is not allowed",
                         "use 1-64 letters, digits, spaces, dots, dashes or underscores")
    records = load_records(path)
    if any(r.name == name and r.revoked is None for r in records):
        raise InputError(f"an active key named {name!r} already exists", "pick another name or revoke the old key")
    ids = {r.id for r in records}
    key_id = secrets.token_hex(4)
    while key_id in ids:
        key_id = secrets.token_hex(4)
    key = f"bk_{key_id}_{secrets.token_urlsafe(32)}"
    salt = secrets.token_hex(16)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = KeyRecord(key_id, name, salt, _hash(salt, key), now)
    save_records(path, records + [record])
    return record, key


def revoke_key(path: Path, key_id_or_name: str) -> KeyRecord:
    records = load_records(path)
    for r in records:
        if r.revoked is None and key_id_or_name in (r.id, r.name):
            r.revoked = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            save_records(path, records)
            return r
    raise InputError(f"no active key with id or name {key_id_or_name!r} in {path}", "see `bankllm keys list`")


class KeyStore:
    """The service's view of the key file, reloaded when the file changes (so a revoke takes effect at once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._by_id: dict[str, KeyRecord] = {}
        self._dummy_salt = secrets.token_hex(16)
        self.reload()

    def reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._by_id = {r.id: r for r in load_records(self.path) if r.revoked is None}
            self._stamp = stamp

    @property
    def count(self) -> int:
        return len(self._by_id)

    def verify(self, key: str) -> str | None:
        """The key's id if `key` is a current key, else None."""
        self.reload()
        m = KEY_RE.match(key)
        record = self._by_id.get(m.group(1)) if m else None
        salt = record.salt if record else self._dummy_salt
        digest = _hash(salt, key)
        # Compare even when no record matched, so timing does not tell ids apart.
        ok = hmac.compare_digest(digest, record.hash if record else "0" * 64)
        return record.id if (ok and record) else None
