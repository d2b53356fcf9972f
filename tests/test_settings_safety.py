"""Unsafe settings are refused with one line naming the fix (issue 11, finding 8): unknown keys from every entry
point, empty hosts, keyless non-loopback binds, secret files readable while written, serving as root, and schema
pages that would call a CDN. Fast: no model is loaded (the root checks start no server)."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from appliance import fsutil
from appliance.errors import ConfigError, format_error
from appliance.install import steps
from appliance.install.layout import system_layout
from appliance.service import keys, privileges
from appliance.settings import Settings
from tests._service_util import create_key, default_gguf
from tests.conftest import run_cli

pytestmark = pytest.mark.fast


def _refused(match: str, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        Settings.load(**{"env": {}, **kw})
    assert match in err.value.message, err.value.message
    assert err.value.fix and "\n" not in format_error(err.value)
    return err.value


# --- unknown keys ------------------------------------------------------------------------------------------------

def test_a_misspelt_key_names_the_closest_setting(tmp_path):
    cfg = tmp_path / "bankllm.toml"
    for text, key, close in (("prot = 9000\n", "prot", "port"), ("[bankllm]\nrequire_key = false\n", "require_key",
                                                                  "require_keys"),
                             ("tls_certificate = '/x.pem'\n", "tls_certificate", "tls_cert"),
                             ("[server]\nport = 1\n", "server", None), ("zzzz = 1\n", "zzzz", None)):
        cfg.write_text(text)
        err = _refused(f"unknown setting {key!r} in configuration file {cfg}", config=cfg)
        assert (f"did you mean {close!r}?" in err.fix) if close else err.fix.startswith("remove it")
        assert "`bankllm settings`" in err.fix
    cfg.write_text("port = 9000\n[bankllm]\nhost = '127.0.0.1'\n")
    _refused("has 'port' outside its [bankllm] table", config=cfg)
    cfg.write_text("host = ['127.0.0.1']\n")
    _refused("is not a valid str", config=cfg)  # an array where text is expected
    err = _refused("unknown setting 'prot' in flags", prot=1)
    assert "did you mean 'port'?" in err.fix


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    error = [l for l in lines if l.startswith("error:")]
    assert len(error) == 1, proc.stderr
    assert "KeyError" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in error[0], error[0]
    return error[0]


def test_every_entry_point_refuses_an_unknown_key_in_one_line(tmp_path):
    cfg = tmp_path / "bankllm.toml"
    cfg.write_text("port = 8090\nrate_limit_per_minite = 5\n")
    needles = ("unknown setting 'rate_limit_per_minite'", "did you mean 'rate_limit_per_minute'?")
    for argv in (["serve", "--model", default_gguf(), "--config", cfg], ["settings", "--config", cfg],
                 ["keys", "list", "--config", cfg]):
        _one_error_line(run_cli(*argv, timeout=120), *needles)
    # install, status and doctor read the installed bankllm.toml of the layout.
    root = tmp_path / "img"
    lay = system_layout(root)
    lay.host(lay.config_dir).mkdir(parents=True)
    shutil.copy(cfg, lay.host(lay.config_file))
    for argv in (["install", "--root", root, "--build", tmp_path], ["doctor", "--root", root],
                 ["status", "--root", root]):
        _one_error_line(run_cli(*argv, timeout=120), *needles)
    assert not lay.host(lay.app_dir).exists()  # the install stopped before doing anything


def test_the_installer_keeps_only_valid_operator_keys(tmp_path):
    """The config header's promise: other settings stay; a key that is not a setting is refused, not kept."""
    lay = system_layout(tmp_path / "img")
    settings = Settings.load(env={})
    steps.write_config(settings, lay, [])
    cfg = lay.host(lay.config_file)
    assert "a key that is not a setting is refused" in cfg.read_text()
    cfg.write_text(cfg.read_text() + "queue_max = 9\n")
    steps.write_config(settings, lay, [])
    assert "queue_max = 9" in cfg.read_text()
    cfg.write_text(cfg.read_text() + "queue_mx = 9\n")
    with pytest.raises(ConfigError) as err:
        steps.write_config(settings, lay, [])  # even when the settings came from another --config file
    assert "unknown setting 'queue_mx'" in err.value.message and "did you mean 'queue_max'?" in err.value.fix


# --- binds ---------------------------------------------------------------------------------------------------------

def test_empty_host_is_refused_and_every_interface_only_when_named():
    for host in ("", "  ", " 127.0.0.1"):
        assert "0.0.0.0" in _refused("is empty or padded", host=host).fix
    _refused("is empty or padded", env={"BANKLLM_HOST": ""})
    assert Settings.load(env={}, host="0.0.0.0").host == "0.0.0.0"
    assert Settings.load(env={}, host="::").host == "::"


def test_keyless_service_only_on_loopback():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert Settings.load(env={}, host=host, require_keys=False).require_keys is False
    for host in ("0.0.0.0", "::", "10.20.0.5", "bank-llm.internal", "::ffff:10.0.0.1"):
        err = _refused(f"require_keys = false on host = {host!r}", host=host, require_keys=False)
        assert "require_keys = true" in err.fix and "127.0.0.1" in err.fix
    assert Settings.load(env={}, host="0.0.0.0").require_keys  # keys on: any bind is fine


# --- secret files are never readable by others, not even while written ----------------------------------------

@pytest.fixture
def watched_writes(monkeypatch):
    """Record (path name, mode) of every temp file the moment before its first byte is written."""
    seen: list[tuple[str, int]] = []
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name.endswith(".tmp"):  # fsutil's temp files (the test's own files are written directly)
            seen.append((self.name, stat.S_IMODE(os.stat(self).st_mode)))
            assert os.stat(self).st_size == 0
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    return seen


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_atomic_writes_have_their_final_mode_before_the_first_byte(tmp_path, watched_writes, umask):
    old = os.umask(umask)
    try:
        fsutil.write_text_atomic(tmp_path / "secret", "s3cret", mode=0o600)
        fsutil.write_text_atomic(tmp_path / "public", "hello")
        fsutil.write_bytes_atomic(tmp_path / "exact", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert [(n.split(".")[1], m) for n, m in watched_writes] == [("secret", 0o600), ("public", 0o666 & ~umask),
                                                               ("exact", 0o640)]
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))


def test_keys_first_key_and_tls_key_are_0600_from_the_first_byte(tmp_path, watched_writes):
    from tests._tls_util import make_pki

    old = os.umask(0)  # the worst umask: the mode must not come from it
    try:
        keys.create_key(tmp_path / "api-keys", name="a")
        lay = system_layout(tmp_path / "img")
        steps.ensure_first_key(lay, [])
        pki = make_pki(tmp_path / "pki")
        watched_writes.clear()
        steps.install_tls(Settings.load(env={}, tls_cert=pki.server_cert, tls_key=pki.server_key), lay, [])
    finally:
        os.umask(old)
    assert {m for _, m in watched_writes} == {0o600} and any("tls-key" in n for n, _ in watched_writes)
    for p in (tmp_path / "api-keys", lay.host(lay.keys_file), lay.host(lay.first_key_file),
              lay.host(lay.credentials_dir / "tls-key")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


# --- never serve as root outside systemd ---------------------------------------------------------------------------

def test_serving_as_root_is_refused_outside_systemd():
    s = Settings.load(env={})
    with pytest.raises(ConfigError) as err:
        privileges.refuse_root(s, euid=0, env={})
    assert "--as-user bankllm" in err.value.fix and "bankllm install" in err.value.fix
    privileges.refuse_root(s, euid=1000, env={})
    privileges.refuse_root(s, euid=0, env={"INVOCATION_ID": "0123abcd"})  # the unit's sandbox decides
    privileges.refuse_root(Settings.load(env={}, unsafe_serve_as_root=True), euid=0, env={})


def test_bankllm_serve_run_as_root_refuses_in_one_line(tmp_path):
    assert os.geteuid() == 0, "the test machine runs the tests as root"
    keys_file = tmp_path / "api-keys"
    create_key(keys_file, "t")
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "BANKLLM_UNSAFE_SERVE_AS_ROOT")}
    proc = run_cli("serve", "--model", default_gguf(), "--keys-file", keys_file, "--port", "1", env=env, timeout=120)
    line = _one_error_line(proc, "running as root outside systemd", "--as-user bankllm")
    assert "serving" not in proc.stderr.replace(line, "")  # refused before uvicorn started


@pytest.fixture
def runtime(monkeypatch):
    """A runtime directory the dropped user can reach (pytest's tmp dirs are root-only)."""
    top = Path(tempfile.mkdtemp(prefix="bankllm-runtime-", dir="/tmp"))
    os.chmod(top, 0o755)
    monkeypatch.setattr(privileges, "RUNTIME_DIR", top / "run")
    monkeypatch.setattr(privileges, "LOGS_DIR", top / "log")
    yield top
    shutil.rmtree(top, ignore_errors=True)


def test_as_user_hands_over_the_credentials_and_drops_every_privilege(tmp_path, runtime, monkeypatch):
    """`serve --as-user nobody`: the keys file and TLS files are staged 0600 for that user, and the command it execs
    runs as that user with no groups, no capabilities and no_new_privs (checked by running its setpriv prefix)."""
    from tests._tls_util import make_pki

    pki = make_pki(tmp_path / "pki")
    keys_file = tmp_path / "api-keys"
    keys.create_key(keys_file, name="a")
    s = Settings.load(env={}, keys_file=keys_file, tls_cert=pki.server_cert, tls_key=pki.server_key,
                      tls_client_ca=pki.ca.path, require_client_cert=True, host="0.0.0.0")
    execs = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append((path, argv, env)))
    monkeypatch.chdir(tmp_path)
    privileges.serve_as("nobody", s, ["--config", "/etc/bankllm/bankllm.toml", "--port", "8443"],
                        env={"PATH": os.environ["PATH"], "BANKLLM_KEYS_FILE": str(keys_file)})
    (path, argv, env), = execs
    nobody = pwd.getpwnam("nobody")
    creds = runtime / "run" / "credentials"
    assert argv[0] == path and Path(path).name == "setpriv"
    assert argv[1:8] == [f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--no-new-privs",
                         "--inh-caps=-all", "--bounding-set=-all", "--"]
    assert argv[8:] == [sys.executable, "-m", "appliance", "serve", "--keys-file", str(creds / "api-keys"),
                        "--config", "/etc/bankllm/bankllm.toml", "--port", "8443"]
    assert env["CREDENTIALS_DIRECTORY"] == str(creds) and "BANKLLM_KEYS_FILE" not in env
    for name, src in (("api-keys", keys_file), ("tls-cert", pki.server_cert), ("tls-key", pki.server_key),
                      ("tls-client-ca", pki.ca.path)):
        st = (creds / name).stat()
        assert (creds / name).read_bytes() == src.read_bytes()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, nobody.pw_uid), name
    assert (stat.S_IMODE(creds.stat().st_mode), creds.stat().st_uid) == (0o700, nobody.pw_uid)
    assert (runtime / "log").stat().st_uid == nobody.pw_uid
    # Run the real privilege drop with a shell in place of the service: what can the served process do?
    probe = ("id -u; id -G; grep -E '^(NoNewPrivs|CapEff|CapPrm|CapBnd|CapAmb):' /proc/self/status; "
             "cat \"$CREDENTIALS_DIRECTORY/tls-key\" | head -c 27; echo; cat /etc/shadow >/dev/null 2>&1 || echo denied")
    proc = subprocess.run([*argv[:8], "/bin/sh", "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == str(nobody.pw_uid) and out[1] == str(nobody.pw_gid)
    status = dict(re.findall(r"^(\w+):\s+(\S+)$", "\n".join(out[2:7]), re.M))
    assert status["NoNewPrivs"] == "1"
    assert {status[c] for c in ("CapEff", "CapPrm", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert out[7] == "-----BEGIN PRIVATE KEY-----" and out[8] == "denied"


def test_as_user_refusals(tmp_path):
    s = Settings.load(env={}, keys_file=tmp_path / "none")
    with pytest.raises(ConfigError, match="does not exist") as err:
        privileges.serve_as("no-such-user-here", s, [])
    assert "bankllm install" in err.value.fix
    with pytest.raises(ConfigError, match="is root"):
        privileges.serve_as("root", s, [])
    with pytest.raises(ConfigError, match="API key file .* does not exist") as err:
        privileges.serve_as("nobody", s, [])
    assert "keys create" in err.value.fix


# --- schema pages call no other host -------------------------------------------------------------------------------

def test_schema_pages_name_no_other_host(tmp_path):
    from tests.test_assistant_routes import client, make_build

    with client(make_build(tmp_path)) as c:
        served = {}
        for path in ("/schema", "/schema/openapi.json", "/schema/swagger", "/schema/redoc", "/schema/elements",
                     "/schema/rapidoc", "/schema/scalar", "/schema/openapi.yaml", "/schema/openapi.yml"):
            r = c.get(path)
            assert r.status_code in (200, 404), (path, r.status_code)
            if r.status_code == 200:
                served[path] = r.text
    assert set(served) == {"/schema", "/schema/openapi.json"}
    spec = json.loads(served["/schema"])
    assert spec["info"]["title"] == "bankllm" and "/v1/chat/completions" in spec["paths"]
    for path, text in served.items():
        hosts = set(re.findall(r"https?://([^/\s\"'<>]+)", text))
        assert hosts <= {"testserver", "127.0.0.1", "localhost"}, (path, hosts)
