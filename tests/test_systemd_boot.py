"""The system test: a real systemd booted in private namespaces, `bankllm install --bundle` run against it with
no network but loopback, and the service that systemd started under the hardened unit answering a chat."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests._systemd_util import CACHE, BootedSystemd, build_dir, clean_env, wheelhouse

pytestmark = [pytest.mark.system, pytest.mark.slow]

BANKLLM = str(os.path.join(os.path.dirname(sys.executable), "bankllm"))
CHAT = """
import sys, openai
client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=sys.argv[1], timeout=150, max_retries=0)
r = client.chat.completions.create(model="bankllm", messages=[{"role": "user", "content": "What is an IBAN?"}],
                                   max_tokens=24, temperature=0)
print(r.choices[0].message.content.strip().replace("\\n", " ")[:200])
try:
    openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="wrong", max_retries=0).models.list()
    print("NO-AUTH")
except openai.AuthenticationError:
    print("AUTH-REQUIRED")
"""


@pytest.fixture(scope="module")
def inputs():
    """Wheelhouse, two builds and a bundle under .cache (the namespace's /tmp is private, .cache is not)."""
    if os.geteuid() != 0:
        pytest.fail("the systemd system test needs root (unshare/nsenter/mount)")
    root = CACHE / f"run-{os.getpid()}"
    wh = wheelhouse(root / "wheels")
    a, b = build_dir(root / "build-a", "smollm2-a"), build_dir(root / "build-b", "smollm2-b")
    bundle = root / "bankllm-bundle.tar"
    # Signed with the bank's key (issue 11): the bundle and both builds; the service verifies its build at start.
    subprocess.run([BANKLLM, "sign", "keygen", "--out", str(root / "keys")], check=True, capture_output=True)
    key, pub = root / "keys" / "bankllm-signing.key", root / "keys" / "bankllm-signing.pub"
    subprocess.run([BANKLLM, "bundle", "--build", str(a), "--wheelhouse", str(wh), "--out", str(bundle),
                    "--sign", str(key)], check=True, timeout=300, capture_output=True)
    subprocess.run([BANKLLM, "sign", str(b), "--key", str(key)], check=True, timeout=300, capture_output=True)
    yield {"root": root, "wheels": wh, "a": a, "b": b, "bundle": bundle, "pub": pub}
    shutil.rmtree(root, ignore_errors=True)


def _install(sysd: BootedSystemd, data_dir, *args, timeout=900):
    proc = sysd.run([BANKLLM, "install", *map(str, args)], timeout=timeout, check=False,
                    env=clean_env(BANKLLM_DATA_DIR=data_dir, BANKLLM_INSTALL_READY_TIMEOUT_S=120))
    assert proc.returncode == 0, f"install failed: {proc.stdout}\n{proc.stderr}\n{sysd.journal()}"
    return proc.stdout


def _proc_status(sysd: BootedSystemd) -> dict[str, str]:
    main_pid = sysd.run(["systemctl", "show", "-p", "MainPID", "--value", "bankllm"]).stdout.strip()
    text = sysd.run(["cat", f"/proc/{main_pid}/status"]).stdout
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _health(sysd: BootedSystemd, addr: str) -> str:
    """GET /health from inside the namespace's network; 'no answer' when the packets are dropped."""
    code = ("import sys, urllib.request\n"
            "try:\n    print(urllib.request.urlopen(f'http://{sys.argv[1]}:8080/health', timeout=3).status)\n"
            "except Exception:\n    print('no answer')")
    return sysd.run([sys.executable, "-c", code, addr], net_only=True, timeout=30).stdout.strip()


def _status_of(sysd: BootedSystemd, key: str, method: str, path: str, body: dict | None = None) -> int:
    """The HTTP status the service answers `key` with, from inside the namespace's network."""
    code = ("import json, sys, urllib.request, urllib.error\n"
            "body = json.loads(sys.argv[4]) if sys.argv[4] != 'null' else None\n"
            "req = urllib.request.Request('http://127.0.0.1:8080' + sys.argv[3], method=sys.argv[2],\n"
            "    data=None if body is None else json.dumps(body).encode(),\n"
            "    headers={'Authorization': 'Bearer ' + sys.argv[1], 'Content-Type': 'application/json'})\n"
            "try:\n    print(urllib.request.urlopen(req, timeout=60).status)\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)")
    out = sysd.run([sys.executable, "-c", code, key, method, path, json.dumps(body)], net_only=True, timeout=90)
    return int(out.stdout.strip())


def _keys(sysd: BootedSystemd, *args) -> subprocess.CompletedProcess:
    proc = sysd.run([BANKLLM, "keys", *args, "--keys-file", "/etc/bankllm/credentials/api-keys"], timeout=120,
                    check=False, env=clean_env())
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def test_install_bundle_under_real_systemd(inputs):
    sysd = BootedSystemd(inputs["root"] / "ns")
    data = inputs["root"] / "data"
    try:
        sysd.start()
        # A second local address, so a client that is not loopback can be tried against IPAddressDeny.
        sysd.run(["bash", "-c", "ip addr add 10.99.0.1/32 dev lo"])
        # 0. A port already taken by another process: refused before anything is written.
        blocker = subprocess.Popen(["nsenter", "-t", str(sysd.pid), "-n", sys.executable, "-c",
                                    "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',8081)); s.listen(); time.sleep(120)"])
        try:
            for _ in range(50):
                if "8081" in sysd.run(["ss", "-ltn"], check=False).stdout:
                    break
                time.sleep(0.1)
            proc = sysd.run([BANKLLM, "install", "--bundle", str(inputs["bundle"]), "--trust", str(inputs["pub"]),
                             "--port", "8081"], timeout=300,
                            check=False, env=clean_env(BANKLLM_DATA_DIR=data))
        finally:
            blocker.kill()
        assert proc.returncode != 0 and "port 8081 on 127.0.0.1 is already in use" in proc.stderr, proc.stderr
        assert not sysd.path("/etc/bankllm").exists() and not sysd.path("/opt/bankllm").exists()

        # 1. Install from the bundle, inside a network namespace that has nothing but loopback (plus 10.99.0.1 on lo):
        #    listening on every address, clients allowed from 192.0.2.0/24 only (and loopback).
        out = _install(sysd, data, "--bundle", inputs["bundle"], "--trust", inputs["pub"], "--host", "0.0.0.0",
                       "--allow", "192.0.2.0/24")
        print(out)
        assert "running under systemd" in out, out
        assert "ollama create bankllm -f /var/lib/bankllm/models/current/Modelfile" in out

        key_file = sysd.path("/etc/bankllm/credentials/first-api-key")
        key = key_file.read_text().strip()
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert oct(sysd.path("/etc/bankllm/credentials").stat().st_mode & 0o777) == "0o700"
        assert os.readlink(sysd.path("/var/lib/bankllm/models/current")) == "smollm2-a"

        # 2. A chat completion from the service systemd started, through the real openai client; keys enforced.
        chat = sysd.run([sys.executable, "-c", CHAT, key], net_only=True, timeout=180).stdout.splitlines()
        print("chat completion from the systemd service:", chat[0])
        assert chat[0].strip(), chat
        assert chat[-1] == "AUTH-REQUIRED", chat

        # The curl line the installer printed works as printed.
        curl = next(line for line in out.splitlines() if line.startswith("try: "))[len("try: "):]
        answer = json.loads(sysd.run(["bash", "-c", curl], timeout=120).stdout)
        assert answer["choices"][0]["message"]["content"].strip(), answer

        # 3. The hardening is in force on the running process, not only written in the unit.
        st = _proc_status(sysd)
        assert int(st["Uid"].split()[0]) != 0, st["Uid"]
        assert st["NoNewPrivs"].strip() == "1"
        assert st["Seccomp"].strip() == "2"
        assert int(st["CapEff"].strip(), 16) == 0 and int(st["CapBnd"].strip(), 16) == 0
        props = sysd.run(["systemctl", "show", "bankllm", "-p", "ActiveState", "-p", "NRestarts",
                          "-p", "ExecMainStatus"]).stdout
        assert "ActiveState=active" in props and "NRestarts=0" in props, props

        # The unit's IP filter is enforced: loopback answers, 10.99.0.1 (not allowed) gets nothing.
        assert _health(sysd, "127.0.0.1") == "200"
        assert _health(sysd, "10.99.0.1") == "no answer"

        # The service was told to verify its build at every start, and could read the key under the hardening.
        assert 'trust_key = "/etc/bankllm/trust-key.pub"' in sysd.path("/etc/bankllm/bankllm.toml").read_text()

        # 3b. Keys created and revoked while the service runs take effect without a restart: systemd 252 does not
        #     refresh the LoadCredential= copy, so `bankllm keys` runs `systemctl reload` (ExecReload copies the key
        #     store into the runtime directory, SIGHUP re-reads it) and waits for the service's acknowledgement.
        main_pid = sysd.run(["systemctl", "show", "-p", "MainPID", "--value", "bankllm"]).stdout.strip()
        proc = _keys(sysd, "create", "--name", "reload-test", "--scope", "openai")
        new_key = proc.stdout.strip()
        assert f"created; the running service (bankllm.service, pid {main_pid}) reloaded its keys" in proc.stderr, \
            proc.stderr
        assert _status_of(sysd, new_key, "GET", "/v1/models") == 200
        assert _status_of(sysd, new_key, "POST", "/api/v1/classify", {"text": "hi"}) == 403  # openai scope only
        copy = sysd.path("/run/bankllm/api-keys")
        assert oct(copy.stat().st_mode & 0o777) == "0o600" and copy.stat().st_uid != 0
        proc = _keys(sysd, "revoke", "reload-test")
        assert (f"revoked key {new_key.split('_')[1]} (reload-test); the running service (bankllm.service, "
                f"pid {main_pid}) reloaded its keys") in proc.stdout, proc.stdout
        assert _status_of(sysd, new_key, "GET", "/v1/models") == 401
        assert _status_of(sysd, key, "GET", "/v1/models") == 200  # the install's key is untouched
        props = sysd.run(["systemctl", "show", "bankllm", "-p", "MainPID", "-p", "NRestarts", "-p", "ActiveState"]).stdout
        assert f"MainPID={main_pid}" in props and "NRestarts=0" in props and "ActiveState=active" in props, props

        # 4. A rerun with the same inputs changes nothing and leaves the service running (the configured trust key
        #    verifies the bundle).
        out = _install(sysd, data, "--bundle", inputs["bundle"])
        assert "nothing changed" in out, out

        # 5. Upgrade to another build (keeps the previous one) and allow 10.99.0.0/24; then roll back.
        out = _install(sysd, data, "--build", inputs["b"], "--wheelhouse", inputs["wheels"], "--allow", "10.99.0.0/24")
        assert "current -> smollm2-b" in out and "unit" in out, out
        assert _health(sysd, "10.99.0.1") == "200"
        assert os.readlink(sysd.path("/var/lib/bankllm/models/previous")) == "smollm2-a"
        # An operator's own setting survives reinstalls; the audit log may live in the unit's LogsDirectory.
        cfg = sysd.path("/etc/bankllm/bankllm.toml")
        cfg.write_text(cfg.read_text() + 'audit_log = "/var/log/bankllm/audit.jsonl"\n')
        proc = sysd.run([BANKLLM, "rollback"], timeout=300, env=clean_env(BANKLLM_INSTALL_READY_TIMEOUT_S=120))
        assert "smollm2-b -> smollm2-a" in proc.stdout
        sysd.run([sys.executable, "-c", CHAT, key], net_only=True, timeout=180)
        audit = sysd.run(["cat", "/var/log/bankllm/audit.jsonl"]).stdout.splitlines()
        assert audit and all(json.loads(line) for line in audit)
        assert "IBAN" not in "\n".join(audit) and key not in "\n".join(audit)
        status = json.loads(sysd.run([BANKLLM, "status", "--json"], timeout=60, env=clean_env()).stdout)
        assert status["model"]["build_id"] == "smollm2-a" and status["ready"] == 200, status
        assert status["unit"]["is-active"] == "active"

        # 6. Uninstall: the service stops, its code goes, models and keys stay.
        sysd.run([BANKLLM, "uninstall"], timeout=120, env=clean_env())
        assert not sysd.path("/etc/systemd/system/bankllm.service").exists()
        assert not sysd.path("/opt/bankllm").exists()
        assert sysd.path("/var/lib/bankllm/models/smollm2-a/model.gguf").is_file()
        assert sysd.path("/etc/bankllm/credentials/api-keys").is_file()
        state = sysd.run(["systemctl", "is-active", "bankllm"], check=False).stdout.strip()
        assert state in ("inactive", "unknown"), state
    except BaseException:
        print(sysd.journal(lines=80) if sysd.pid else "(no systemd)")
        raise
    finally:
        sysd.kill()


def test_user_install_under_a_real_user_manager(inputs):
    """`bankllm install --user` against a live user manager (user@0.service in the booted systemd): the user unit
    starts, answers /ready and a chat completion, and `bankllm status --user` sees it; uninstall stops it."""
    sysd = BootedSystemd(inputs["root"] / "ns-user")
    env = clean_env(BANKLLM_DATA_DIR=inputs["root"] / "data-user", BANKLLM_INSTALL_READY_TIMEOUT_S=120,
                    XDG_RUNTIME_DIR="/run/user/0", DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/0/bus")
    try:
        sysd.start()
        sysd.run(["systemctl", "start", "user@0.service"], timeout=60)
        proc = sysd.run([BANKLLM, "install", "--user", "--build", str(inputs["a"]), "--wheelhouse",
                         str(inputs["wheels"])], timeout=900, check=False, env=env)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n" + sysd.run(
            ["journalctl", "--user-unit", "bankllm", "-n", "40", "--no-pager"], check=False, env=env).stdout
        assert "running under systemd" in proc.stdout, proc.stdout
        unit = sysd.path("/root/.config/systemd/user/bankllm.service").read_text()
        assert "DynamicUser" not in unit and "WantedBy=default.target" in unit
        key = sysd.path("/root/.config/bankllm/credentials/first-api-key").read_text().strip()
        chat = sysd.run([sys.executable, "-c", CHAT, key], net_only=True, timeout=180).stdout.splitlines()
        assert chat[0].strip() and chat[-1] == "AUTH-REQUIRED", chat
        # The user unit reloads too (`systemctl --user reload`, its runtime directory under $XDG_RUNTIME_DIR).
        keys_file = "/root/.config/bankllm/credentials/api-keys"
        for args in (["create", "--name", "user-reload"], ["revoke", "user-reload"]):
            proc = sysd.run([BANKLLM, "keys", *args, "--keys-file", keys_file], timeout=120, check=False, env=env)
            assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
            assert "the running service (bankllm.service, pid" in proc.stdout + proc.stderr, proc.stderr
            if args[0] == "create":
                user_key = proc.stdout.strip()
                assert sysd.run([sys.executable, "-c", CHAT, user_key], net_only=True, timeout=180).stdout.strip()
        chat = sysd.run([sys.executable, "-c", CHAT, user_key], net_only=True, timeout=180, check=False)
        assert chat.returncode != 0 and "AuthenticationError" in chat.stderr, chat  # revoked, without a restart
        status = json.loads(sysd.run([BANKLLM, "status", "--user", "--json"], timeout=60, env=env).stdout)
        assert status["unit"]["is-active"] == "active" and status["ready"] == 200, status
        assert status["model"]["build_id"] == "smollm2-a"
        sysd.run([BANKLLM, "uninstall", "--user"], timeout=120, env=env)
        state = sysd.run(["systemctl", "--user", "is-active", "bankllm"], check=False, env=env).stdout.strip()
        assert state in ("inactive", "unknown"), state
        assert not sysd.path("/root/.config/systemd/user/bankllm.service").exists()
    except BaseException:
        print(sysd.run(["journalctl", "-n", "60", "--no-pager"], check=False).stdout if sysd.pid else "(no systemd)")
        raise
    finally:
        sysd.kill()
