"""`bankllm keys create/revoke` against a running foreground `bankllm serve` (real model): the CLI makes it reload
(SIGHUP), waits for its acknowledgement and says what happened; a bad key file on reload keeps the old keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from appliance.service.reload import apply_to_running, record_path
from appliance.settings import Settings
from tests._service_util import REPO, running_server


def keys_cli(*args, keys_file) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", "keys", *args, "--keys-file", str(keys_file)],
                          capture_output=True, text=True, env=dict(os.environ), cwd=REPO, timeout=60)


def wait_reloads(record, n: int, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = json.loads(record.read_text())
        if rec["reloads"] >= n:
            return rec
        time.sleep(0.1)
    raise AssertionError(f"no reload {n}: {record.read_text()}")


def test_keys_cli_reloads_a_foreground_server(tmp_path):
    run_dir = Settings.load().resolved_run_dir()  # the default, as both `serve` and `keys` resolve it here
    with running_server(tmp_path / "srv") as srv:
        record = record_path(run_dir, srv.proc.pid)
        assert json.loads(record.read_text())["keys_active"] == 1
        proc = keys_cli("create", "--name", "second", "--scope", "openai", keys_file=srv.keys_file)
        assert proc.returncode == 0, proc.stderr
        second = proc.stdout.strip()
        assert f"created; the running `bankllm serve` (pid {srv.proc.pid}) reloaded its keys" in proc.stderr
        with srv.http(key=second) as c:
            assert c.get("/v1/models").status_code == 200
            assert c.post("/api/v1/classify", json={"text": "hi"}).status_code == 403  # openai scope only

        proc = keys_cli("revoke", "second", keys_file=srv.keys_file)
        assert proc.returncode == 0, proc.stderr
        assert f"; the running `bankllm serve` (pid {srv.proc.pid}) reloaded its keys" in proc.stdout
        with srv.http(key=second) as c:
            assert c.get("/v1/models").status_code == 401

        # A key file broken on disk: SIGHUP keeps the keys in force and says why in the run record.
        good = srv.keys_file.read_bytes()
        srv.keys_file.write_text('{"keys": [')
        before = json.loads(record.read_text())["reloads"]
        os.kill(srv.proc.pid, signal.SIGHUP)
        rec = wait_reloads(record, before + 1)
        assert "not valid" in rec["keys_error"] and rec["keys_active"] == 1
        assert srv.alive()
        with srv.http() as c:
            assert c.get("/v1/models").status_code == 200
        srv.keys_file.write_bytes(good)
    assert not record.exists()  # removed when the server stopped
    proc = keys_cli("revoke", "tests", keys_file=srv.keys_file)
    assert proc.returncode == 0 and "no running service found: takes effect at next start" in proc.stdout, proc


@pytest.mark.fast
def test_stale_and_foreign_run_records_are_not_signalled(tmp_path):
    keys_file = tmp_path / "api-keys"
    keys_file.write_text('{"version": 1, "keys": []}')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):  # a dead process; a live one that is not `bankllm serve` (this test)
        record_path(tmp_path / "run", pid).parent.mkdir(exist_ok=True)
        record_path(tmp_path / "run", pid).write_text(json.dumps({"pid": pid, "keys_file": str(keys_file),
                                                                  "reloads": 0}))
    outcome = apply_to_running(keys_file, tmp_path / "run", timeout=1)
    assert outcome.ok and outcome.message == "no running service found: takes effect at next start"
    assert not record_path(tmp_path / "run", dead.pid).exists()  # the stale record is cleaned up


@pytest.mark.fast
def test_a_server_that_does_not_confirm_is_reported(tmp_path):
    keys_file = tmp_path / "api-keys"
    keys_file.write_text('{"version": 1, "keys": []}')
    # A live process whose command line says `serve` but that never acknowledges (it ignores SIGHUP).
    deaf = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                             "open(__import__('sys').argv[2], 'w').close(); time.sleep(60)", "serve", str(tmp_path / "up")])
    try:
        while not (tmp_path / "up").exists():
            time.sleep(0.05)
        record = record_path(tmp_path / "run", deaf.pid)
        record.parent.mkdir()
        record.write_text(json.dumps({"pid": deaf.pid, "keys_file": str(keys_file), "reloads": 0}))
        outcome = apply_to_running(keys_file, tmp_path / "run", timeout=1)
    finally:
        deaf.kill()
        deaf.wait()
    assert not outcome.ok
    assert outcome.message == f"the running `bankllm serve` (pid {deaf.pid}) did not confirm a reload within 1 s after SIGHUP"


@pytest.mark.fast
def test_keys_cli_scopes_rate_and_messages_without_a_service(tmp_path):
    keys_file = tmp_path / "api-keys"
    proc = keys_cli("create", "--name", "ops", "--scope", "admin", "--scope", "chat", "--rate", "5", keys_file=keys_file)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("bk_") and proc.stdout.count("\n") == 1  # only the key on stdout
    assert "scopes chat,admin; 5/min" in proc.stderr
    assert "created; no running service found: takes effect at next start" in proc.stderr
    proc = keys_cli("create", "--name", "app", keys_file=keys_file)
    assert "scopes classify,chat,openai; the service's rate limit" in proc.stderr
    listed = keys_cli("list", keys_file=keys_file).stdout.splitlines()
    assert [line.split("\t")[1:4] for line in listed] == [["ops", "chat,admin", "5/min"],
                                                           ["app", "classify,chat,openai", "default-rate"]]
    proc = keys_cli("create", "--name", "bad", "--scope", "root", keys_file=keys_file)
    assert proc.returncode == 2 and "'root' is not one of" in proc.stderr
    proc = keys_cli("revoke", "ops", keys_file=keys_file)
    assert proc.returncode == 0
    assert proc.stdout.strip().endswith("(ops); no running service found: takes effect at next start"), proc.stdout


def test_keys_cli_hands_the_change_to_a_server_that_dropped_root(tmp_path):
    """`serve --as-user` (what `install --foreground` runs) reads a copy root made at its start and can no longer read
    the original: the CLI copies the changed file over that copy before SIGHUP, so a revocation still takes effect."""
    import httpx

    from tests._service_util import default_gguf, free_port

    keys_file = tmp_path / "api-keys"
    proc = keys_cli("create", "--name", "first", "--scope", "openai", keys_file=keys_file)
    first = proc.stdout.strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "BANKLLM_UNSAFE_SERVE_AS_ROOT"}
    server = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--as-user", "nobody", "--keys-file",
                               str(keys_file), "--model", str(default_gguf()), "--port", str(port), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/v1/models"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url, headers={"Authorization": f"Bearer {first}"}, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the dropped server did not come up"
            time.sleep(0.3)
        proc = keys_cli("revoke", "first", keys_file=keys_file)
        assert proc.returncode == 0 and f"the running `bankllm serve` (pid {server.pid}) reloaded its keys" \
            in proc.stdout, (proc.stdout, proc.stderr)
        assert httpx.get(url, headers={"Authorization": f"Bearer {first}"}, timeout=5).status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=30)
