"""Who serves: never root outside systemd; `serve --as-user NAME` hands the credentials over and drops to NAME.

Outside systemd (`bankllm install --foreground` on a machine whose PID 1 is not systemd) this does what the unit's
LoadCredential= and DynamicUser= do: root copies the keys file and the TLS files 0600 into a runtime directory
owned by the service user, then the process becomes that user with no groups, no capabilities and no_new_privs
(util-linux `setpriv`) before anything of the model or the network is touched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import typing
from pathlib import Path

from ..errors import ConfigError, InstallError
from ..fsutil import write_bytes_atomic
from ..settings import REDIS_CREDENTIALS, TLS_CREDENTIALS, Settings, under_systemd

SERVICE_USER = "bankllm"
RUNTIME_DIR = Path("/run/bankllm")  # what the unit's RuntimeDirectory= makes
RUN_RECORDS_DIR = RUNTIME_DIR / "run"  # where a dropped `serve` writes its run record (service/reload.py)
STATE_DIR = Path("/var/lib/bankllm-state")  # what the unit's StateDirectory= makes: adapters added at run time
LOGS_DIR = Path("/var/log/bankllm")  # what the unit's LogsDirectory= makes (for `audit_log` there)
KEYS_CREDENTIAL = "api-keys"


def refuse_root(settings: Settings, euid: int | None = None, env: typing.Mapping[str, str] | None = None) -> None:
    """Raise ConfigError when about to serve as root outside systemd (a unit's sandbox decides for itself)."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0 or settings.unsafe_serve_as_root or under_systemd(env):
        return
    raise ConfigError("bankllm serve is running as root outside systemd (a flaw in the service would own the machine)",
                      f"serve as the service user: run `bankllm serve --as-user {SERVICE_USER} ...` as root (what "
                      "`bankllm install --foreground` does), or start the hardened unit with `bankllm install`")


def ensure_service_user(name: str = SERVICE_USER) -> bool:
    """Create the system user `name` (no home, no shell) unless it exists; True when it was created."""
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    exe = shutil.which("useradd")
    if exe is None:
        raise InstallError("useradd is not installed, so the service user cannot be created",
                           f"create a system user named {name} yourself, then rerun")
    proc = subprocess.run([exe, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", "--comment", "bankllm service", name],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise InstallError(f"useradd {name} failed: {msg[-1] if msg else proc.returncode}",
                           f"create a system user named {name} yourself, then rerun")
    return True


def _owned_dir(path: Path, uid: int, gid: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    os.chown(path, uid, gid)


def stage_credentials(files: dict[str, Path], uid: int, gid: int, runtime: Path = RUNTIME_DIR) -> Path:
    """Copy each file (credential name -> source) 0600, owned by uid, into runtime/credentials (as LoadCredential=)."""
    _owned_dir(runtime, uid, gid)
    creds = runtime / "credentials"
    shutil.rmtree(creds, ignore_errors=True)  # a previous start's copies (a revoked key, an old certificate) go
    creds.mkdir(mode=0o700)
    for name, source in files.items():
        # Written 0600 by root, then handed over: at no moment readable by anyone else.
        write_bytes_atomic(creds / name, Path(source).read_bytes(), mode=0o600)
        os.chown(creds / name, uid, gid)
    os.chown(creds, uid, gid)
    return creds


def drop_command(user: pwd.struct_passwd, argv: list[str]) -> list[str]:
    """`argv` run as `user`: its own uid and group only, no capabilities (bounding set too), no_new_privs."""
    exe = shutil.which("setpriv")
    if exe is None:
        raise ConfigError("setpriv (util-linux) is not installed, so root cannot drop to the service user",
                          "install util-linux, or start the hardened systemd unit instead")
    return [exe, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--", *argv]


def serve_as(user_name: str, settings: Settings, flags: list[str],
             env: typing.Mapping[str, str] | None = None) -> typing.NoReturn:
    """As root: hand the keys file and TLS files to `user_name`, then exec `bankllm serve FLAGS` as that user."""
    if os.geteuid() != 0:
        raise ConfigError("--as-user needs root (it hands the credentials over, then drops to that user)",
                          "run it as root, or drop --as-user when this already is the service user")
    try:
        user = pwd.getpwnam(user_name)
    except KeyError:
        raise ConfigError(f"user {user_name!r} does not exist",
                          "rerun `bankllm install` (it creates the service user where systemd is not running), or "
                          f"`useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {user_name}`"
                          ) from None
    if user.pw_uid == 0:
        raise ConfigError(f"user {user_name!r} is root", "name an unprivileged user")
    files = {TLS_CREDENTIALS[name]: path for name, path in settings.resolved_tls_files(env).items()}
    files.update({REDIS_CREDENTIALS[name]: path for name, path in settings.resolved_redis_files(env).items()})
    keys_file = settings.resolved_keys_file(env)
    if keys_file.is_file():
        files[KEYS_CREDENTIAL] = keys_file
    elif settings.require_keys:
        raise ConfigError(f"the API key file {keys_file} does not exist",
                          f"create a key: `bankllm keys create --name NAME --keys-file {keys_file}`")
    creds = RUNTIME_DIR / "credentials"
    argv = drop_command(user, [sys.executable, "-m", "appliance", "serve", "--keys-file", str(creds / KEYS_CREDENTIAL),
                               *flags])
    stage_credentials(files, user.pw_uid, user.pw_gid, RUNTIME_DIR)
    _owned_dir(LOGS_DIR, user.pw_uid, user.pw_gid)
    child_env = {k: v for k, v in (os.environ if env is None else env).items()
                 if k not in ("BANKLLM_KEYS_FILE", "INVOCATION_ID", "CREDENTIALS_DIRECTORY")}
    child_env.update(CREDENTIALS_DIRECTORY=str(creds), HOME=str(RUNTIME_DIR), PYTHONDONTWRITEBYTECODE="1",
                     PYTHONUNBUFFERED="1", BANKLLM_RUN_DIR=str(RUN_RECORDS_DIR))
    if KEYS_CREDENTIAL in files:
        # `bankllm keys create/revoke` (root) find this process by the key file it was handed, copy the changed file
        # over the copy it reads and send SIGHUP: the process itself cannot read the original any more.
        child_env["BANKLLM_KEYS_SOURCE"] = str(keys_file)
    _owned_dir(RUN_RECORDS_DIR, user.pw_uid, user.pw_gid)
    if settings.state_dir is None:  # root's <data_dir>/state is not the dropped user's to read or write
        _owned_dir(STATE_DIR, user.pw_uid, user.pw_gid)
        child_env["BANKLLM_STATE_DIR"] = str(STATE_DIR)
    os.chdir(RUNTIME_DIR)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, child_env)
