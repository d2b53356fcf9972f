"""Reloading a running service's keys: the service side (SIGHUP, a run record acknowledging what is in force) and the
side of `bankllm keys create/revoke` (find the running service, make it reload, wait for its acknowledgement).

Under systemd the unit's `ExecReload=` copies the key store into the service's runtime directory (systemd 252
does not refresh a `LoadCredential=` copy on reload) and sends SIGHUP; `bankllm serve` in the foreground gets SIGHUP
directly. Either way the service rewrites its run record, `serve-<pid>.json` in its run directory, with the sha256
of the key file it now has in force, so the CLI can say exactly what happened instead of assuming.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path

from ..fsutil import sha256_bytes, write_json_atomic

log = logging.getLogger("bankllm.service")
RECORD_GLOB = "serve-*.json"
CONFIRM_TIMEOUT_S = 15.0


def record_path(run_dir: Path, pid: int | None = None) -> Path:
    return Path(run_dir) / f"serve-{os.getpid() if pid is None else pid}.json"


def write_record(service, run_dir: Path) -> None:
    """The run record: this process, the key file it reads (as configured and as read) and the digest in force."""
    write_json_atomic(record_path(run_dir), {
        "pid": os.getpid(), "keys_file": str(service.settings.resolved_keys_file()), "keys_read": str(service.keys.path),
        # The file root handed over (serve --as-user): the one operators edit; keys_read is this process's copy.
        "keys_source": os.environ.get("BANKLLM_KEYS_SOURCE") or str(service.settings.resolved_keys_file()),
        "keys_digest": service.keys.digest, "keys_active": service.keys.count, "keys_error": service.keys.error,
        "reloads": service.reloads, "at": time.time()}, mode=0o600)


@contextlib.contextmanager
def serving(service, run_dir: Path):
    """While `bankllm serve` runs: SIGHUP reloads, and the run record says what is in force (removed at exit)."""
    run_dir = Path(run_dir)

    def on_reload(svc) -> None:
        try:
            write_record(svc, run_dir)
        except OSError as exc:  # the reload itself happened; only the acknowledgement is missing
            log.error("could not write the run record in %s: %s", run_dir, exc)

    def on_hup(_signum, _frame) -> None:
        service.reload()

    service.on_reload = on_reload
    # Removed when the app stops: uvicorn re-raises the SIGTERM it caught, so code after it never runs.
    service.on_stop = lambda: record_path(run_dir).unlink(missing_ok=True)
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_record(service, run_dir)
    except OSError as exc:
        log.warning("no run record in %s (%s): `bankllm keys` will not find this process to reload it", run_dir, exc)
    # Installed before the model loads: SIGHUP's default action would end the process.
    previous = signal.signal(signal.SIGHUP, on_hup)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)
        service.on_reload = service.on_stop = None
        record_path(run_dir).unlink(missing_ok=True)


# --- the CLI's side ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """What happened to the running services after the key file changed."""

    ok: bool
    message: str


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_serve(pid: int) -> bool:
    """A live process that is a `bankllm serve` (a stale record's pid may belong to anything by now)."""
    try:
        os.kill(pid, 0)
        return b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False


def _await(record: Path, before: int, digest: str | None, timeout: float) -> tuple[bool, str]:
    """Wait until the record shows a reload after `before`; (True, '') when it has `digest` in force."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = _read(record)
        if rec is not None and rec.get("reloads", 0) > before:
            if rec.get("keys_error"):
                return False, f"refused the key file and kept its previous keys ({rec['keys_error']})"
            if rec.get("keys_digest") != digest:
                return False, "reloaded a key file that differs from this one (changed again meanwhile?)"
            return True, ""
        time.sleep(0.1)
    return False, f"did not confirm a reload within {timeout:.0f} s"


def _same(a: str | Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def _units_using(keys_file: Path) -> list[tuple[bool, Path]]:
    """(user manager?, run dir) of each installed bankllm unit whose LoadCredential= is this key file."""
    import platformdirs

    from ..errors import BankllmError
    from ..install import systemd as sd
    from ..install.layout import system_layout, user_layout

    found = []
    for user, layout in ((False, system_layout()), (True, user_layout())):
        try:
            unit = sd.parse_unit(layout.unit_path.read_text())
        except (OSError, BankllmError):  # no unit, or not one we can read: not ours to reload
            continue
        creds = unit.get("Service", {}).get("LoadCredential", [])
        if any(c.split(":", 1)[0] == "api-keys" and _same(c.split(":", 1)[1], keys_file) for c in creds):
            run_dir = Path(platformdirs.user_runtime_dir("bankllm", appauthor=False)) if user else Path("/run/bankllm")
            found.append((user, run_dir))
    return found


def _reload_unit(user: bool, run_dir: Path, digest: str | None, timeout: float) -> Outcome | None:
    """`systemctl reload` the active unit and wait for its acknowledgement; None when the unit is not running."""
    from ..errors import InstallError
    from ..install import systemd as sd

    unit, flag = sd.UNIT_NAME, " --user" if user else ""
    try:
        if sd.systemctl("is-active", unit, user=user, check=False, timeout=30).stdout.strip() != "active":
            return None
        pid = int(sd.systemctl("show", "-p", "MainPID", "--value", unit, user=user, timeout=30).stdout.strip() or 0)
    except (InstallError, ValueError):
        return None
    record = record_path(run_dir, pid)
    before = (_read(record) or {}).get("reloads", 0)
    proc = sd.systemctl("reload", unit, user=user, check=False, timeout=60)
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        return Outcome(False, f"`systemctl{flag} reload {unit}` failed ({why[-1] if why else proc.returncode}); "
                              f"the running service still has its old keys")
    ok, why = _await(record, before, digest, timeout)
    if ok:
        return Outcome(True, f"the running service ({unit}, pid {pid}) reloaded its keys")
    return Outcome(False, f"the running service ({unit}, pid {pid}) {why} after `systemctl{flag} reload`")


def _handover(rec: dict, record: Path, keys_file: Path) -> str | None:
    """A `serve --as-user` reads a copy root made at its start: copy the changed key file over it (0600, the
    process's user, atomically) so its reload sees the change. Returns why it could not, or None."""
    from ..fsutil import write_bytes_atomic

    target = Path(rec.get("keys_read", ""))
    if not rec.get("keys_read") or _same(target, keys_file):
        return None  # it reads the key file itself
    try:
        owner = record.stat()
        write_bytes_atomic(target, Path(keys_file).read_bytes(), mode=0o600)
        os.chown(target, owner.st_uid, owner.st_gid)
    except OSError as exc:
        return f"could not hand the changed key file to it at {target} ({exc.strerror}; run as root)"
    return None


def _run_dirs(run_dir: Path) -> list[Path]:
    """This user's run directory and the one a `serve --as-user` (started by root) writes its record in."""
    from .privileges import RUN_RECORDS_DIR

    dirs = [Path(run_dir)]
    if not _same(RUN_RECORDS_DIR, Path(run_dir)):
        dirs.append(RUN_RECORDS_DIR)
    return [d for d in dirs if d.is_dir()]


def _reload_foreground(keys_file: Path, run_dir: Path, digest: str | None, timeout: float) -> list[Outcome]:
    """SIGHUP each live `bankllm serve` whose run record names this key file, and wait for its acknowledgement."""
    outcomes = []
    for path in sorted(p for d in _run_dirs(run_dir) for p in d.glob(RECORD_GLOB)):
        rec = _read(path)
        if not rec or not isinstance(rec.get("pid"), int) or not (
                _same(rec.get("keys_file", ""), keys_file) or _same(rec.get("keys_source", ""), keys_file)):
            continue
        pid = rec["pid"]
        if not _is_serve(pid):
            path.unlink(missing_ok=True)  # a process that died without cleaning up
            continue
        why = _handover(rec, path, keys_file)
        if why is not None:
            outcomes.append(Outcome(False, f"the running `bankllm serve` (pid {pid}): {why}"))
            continue
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            outcomes.append(Outcome(False, f"could not signal `bankllm serve` (pid {pid}): {exc.strerror}"))
            continue
        ok, why = _await(path, rec.get("reloads", 0), digest, timeout)
        outcomes.append(Outcome(ok, f"the running `bankllm serve` (pid {pid}) reloaded its keys" if ok
                                else f"the running `bankllm serve` (pid {pid}) {why} after SIGHUP"))
    return outcomes


def apply_to_running(keys_file: Path, run_dir: Path, timeout: float = CONFIRM_TIMEOUT_S) -> Outcome:
    """Make every running service that reads `keys_file` reload it; one Outcome saying what happened."""
    from ..install import systemd as sd

    try:
        digest = sha256_bytes(Path(keys_file).read_bytes())
    except FileNotFoundError:
        digest = None
    outcomes: list[Outcome] = []
    if sd.systemd_running():
        for user, unit_run_dir in _units_using(keys_file):
            outcome = _reload_unit(user, unit_run_dir, digest, timeout)
            if outcome is not None:
                outcomes.append(outcome)
    outcomes += _reload_foreground(keys_file, run_dir, digest, timeout)
    if not outcomes:
        return Outcome(True, "no running service found: takes effect at next start")
    return Outcome(all(o.ok for o in outcomes), "; ".join(o.message for o in outcomes))
