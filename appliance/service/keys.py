"""API keys: several, each with an id and a name, stored only as salted SHA-256 hashes, checked in constant time.

A key looks like `bk_<id>_<secret>`; the id selects the stored record, the whole key is hashed with that record's
salt and compared with hmac.compare_digest. The secret has 256 bits of entropy, so a fast salted hash is enough
(a slow KDF protects guessable passwords, not random tokens).

Each record also carries the key's scopes (which route families it may call) and its own rate limit, stored next to
its salted hash. A record without scopes (made before scopes existed) has the default: every non-admin scope.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import re
import secrets
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ConfigError, InputError
from ..fsutil import sha256_bytes, write_json_atomic

log = logging.getLogger("bankllm.service")

KEY_RE = re.compile(r"^bk_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")

# Route families a key may be limited to; every route declares one (routes/__init__.py), admin is never implied.
# health: a balancer's checks, only /ready and /metrics, never rate limited (issue 12).
SCOPES = ("classify", "chat", "openai", "admin", "health")
DEFAULT_SCOPES = ("classify", "chat", "openai")


@dataclasses.dataclass
class KeyRecord:
    id: str
    name: str
    salt: str
    hash: str
    created: str
    revoked: str | None = None
    scopes: list[str] | None = None  # None: a key from before scopes, with DEFAULT_SCOPES
    rate: int | None = None  # requests per minute for this key (0 = no limit); None: rate_limit_per_minute

    @property
    def effective_scopes(self) -> tuple[str, ...]:
        return tuple(self.scopes) if self.scopes is not None else DEFAULT_SCOPES


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes, known and without repeats, in SCOPES order; InputError names an unknown one."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise InputError(f"unknown key scope {unknown[0]!r}", f"use one or more of {', '.join(SCOPES)}")
    if not wanted:
        raise InputError("a key needs at least one scope", f"use one or more of {', '.join(SCOPES)}")
    return [s for s in SCOPES if s in wanted]


def _check_record(r: KeyRecord) -> KeyRecord:
    if r.scopes is not None:
        if not isinstance(r.scopes, list):
            raise TypeError(f"key {r.id}: scopes must be a list")
        r.scopes = check_scopes(r.scopes)
    if r.rate is not None and (not isinstance(r.rate, int) or isinstance(r.rate, bool) or r.rate < 0):
        raise TypeError(f"key {r.id}: rate must be a whole number >= 0")
    return r


def _hash(salt: str, key: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + key.encode()).hexdigest()


def parse_records(data: bytes, path: Path) -> list[KeyRecord]:
    """The records of a key file's bytes; ConfigError when they are not a valid key file."""
    try:
        return [_check_record(KeyRecord(**r)) for r in json.loads(data)["keys"]]
    except (ValueError, KeyError, TypeError, InputError) as exc:
        why = exc.message if isinstance(exc, InputError) else exc
        raise ConfigError(f"API key file {path} is not valid ({why})",
                          "restore it from backup or delete it and create keys with `bankllm keys create`") from None


def load_records(path: Path) -> list[KeyRecord]:
    """Read the key file; a missing file means no keys."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return parse_records(data, path)


def save_records(path: Path, records: list[KeyRecord]) -> None:
    write_json_atomic(Path(path), {"version": 1, "keys": [dataclasses.asdict(r) for r in records]}, mode=0o600)


def create_key(path: Path, name: str, scopes: Iterable[str] | None = None,
               rate: int | None = None) -> tuple[KeyRecord, str]:
    """Add a key named `name` (scopes default: every non-admin scope; rate default: the service's limit); return its
    record and the key itself (shown once, never stored)."""
    if not NAME_RE.match(name):
        raise InputError(f"key name {name!r} is not allowed",
                         "use 1-64 letters, digits, spaces, dots, dashes or underscores")
    scopes = check_scopes(scopes) if scopes is not None else list(DEFAULT_SCOPES)
    if rate is not None and rate < 0:
        raise InputError(f"rate {rate} is negative", "give requests per minute, 0 for no limit")
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
    record = KeyRecord(key_id, name, salt, _hash(salt, key), now, scopes=scopes, rate=rate)
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
    """The service's view of the key file. It is re-read when the file changes (checked on each request) and when
    the service is told to reload (SIGHUP, POST /admin/reload): `path_of()` names the file to read then, so a copy
    that `systemctl reload` refreshed replaces the credential systemd copied at start. A file that is not valid on a
    re-read keeps the keys in force and logs one line: a half-edited file must not lock every client out."""

    def __init__(self, path_of: Callable[[], Path] | Path):
        self.path_of = path_of if callable(path_of) else (lambda p=Path(path_of): p)
        self.path = Path(self.path_of())
        self._stamp: tuple | None = None
        self._by_id: dict[str, KeyRecord] = {}
        self._dummy_salt = secrets.token_hex(16)
        self.digest: str | None = None  # sha256 of the bytes in force (None: no file), for reload acknowledgements
        self.error: str | None = None  # why the last re-read was refused (the old keys stayed)
        self._load(self.path, strict=True)

    def _stamp_of(self, path: Path) -> tuple | None:
        try:
            st = path.stat()
            return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            return None

    def _load(self, path: Path, strict: bool = False) -> bool:
        """Read `path` and put its active keys in force; keep the old ones (or raise, when `strict`) if invalid,
        logging one line per new problem (not one per request or per reload)."""
        stamp = self._stamp_of(path)
        try:
            data = path.read_bytes() if stamp is not None else None
            records = parse_records(data, path) if data is not None else []
        except (OSError, ConfigError) as exc:
            if strict:
                raise
            message = exc.message if isinstance(exc, ConfigError) else f"cannot read {path} ({exc})"
            if self.error != message:
                log.error("keys not reloaded, the previous %d stay in force: %s", len(self._by_id), message)
            self.error = message
            self._stamp = stamp  # not retried on every request; a fixed file has a new stamp
            return False
        self._by_id = {r.id: r for r in records if r.revoked is None}  # one assignment: readers see old or new
        self.path, self._stamp, self.error = path, stamp, None
        self.digest = sha256_bytes(data) if data is not None else None
        return True

    def reload(self, force: bool = False) -> bool:
        """Re-read the key file if it changed (or always, with `force`); False when a bad file was refused."""
        path = Path(self.path_of())
        if not force and self._stamp_of(path) == self._stamp:
            return self.error is None
        return self._load(path)

    @property
    def count(self) -> int:
        return len(self._by_id)

    def verify(self, key: str) -> KeyRecord | None:
        """The key's record if `key` is a current key, else None."""
        self.reload()
        m = KEY_RE.match(key)
        record = self._by_id.get(m.group(1)) if m else None
        salt = record.salt if record else self._dummy_salt
        digest = _hash(salt, key)
        # Compare even when no record matched, so timing does not tell ids apart.
        ok = hmac.compare_digest(digest, record.hash if record else "0" * 64)
        return record if (ok and record) else None
