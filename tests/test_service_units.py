"""The service's small parts (masking, keys, rate limit, conversations, model resolution) and its CLI edges."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from appliance.errors import ConfigError, InputError
from appliance.service.audit import luhn_ok, mask
from appliance.service.conversations import Conversations
from appliance.service.keys import KeyStore, create_key, load_records, revoke_key
from appliance.service.limits import RateLimiter
from appliance.service.model import resolve_model
from appliance.settings import Settings
from tests._service_util import REPO, default_gguf


def test_mask_customer_identifiers():
    text = ("pay 4111-1111-1111-1111 from GB82 WEST 1234 5698 7654 32 or GB82WEST12345698765432, "
            "write to j.doe@bank.co.uk, call +1 (555) 010-9999, acct 9876543210")
    out = mask(text)
    assert out == ("pay [CARD] from [IBAN] or [IBAN], write to [EMAIL], call [PHONE], acct [ACCOUNT]")


def test_card_masking_requires_luhn():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert "[CARD]" not in mask("order 4111 1111 1111 1112")


def test_keys_create_verify_revoke(tmp_path):
    path = tmp_path / "keys"
    record, key = create_key(path, "crm")
    assert key not in path.read_text() and record.id in key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store = KeyStore(path)
    assert store.verify(key).id == record.id
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.verify("garbage") is None
    with pytest.raises(InputError):
        create_key(path, "crm")  # one active key per name
    revoke_key(path, "crm")
    assert store.verify(key) is None  # the store reloads the changed file
    assert load_records(path)[0].revoked


def test_corrupt_key_file_is_a_clear_error(tmp_path):
    path = tmp_path / "keys"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid"):
        KeyStore(path)


def test_rate_limiter_refills():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.check("a") == 0 and limiter.check("a") == 0
    wait = limiter.check("a")
    assert 29 < wait <= 30
    assert limiter.check("b") == 0  # per key
    now[0] += 30
    assert limiter.check("a") == 0
    assert RateLimiter(0).check("a") == 0


def test_conversations_bounded_expiring_and_scoped():
    now = [0.0]
    convs = Conversations(max_turns=2, ttl_s=10, clock=lambda: now[0])
    conv = convs.new("k1")
    for i in range(3):
        convs.add_turn(conv, f"q{i}", f"a{i}")
    assert [q for q, _ in conv.turns] == ["q1", "q2"]
    assert convs.get(conv.id, "k2") is None
    assert convs.get(conv.id, "k1") is conv
    now[0] += 11
    assert convs.get(conv.id, "k1") is None


def test_resolve_model(tmp_path):
    with pytest.raises(ConfigError):
        resolve_model(None)
    with pytest.raises(InputError, match="does not exist"):
        resolve_model(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a GGUF"):
        resolve_model(tmp_path / "junk.gguf")
    with pytest.raises(InputError, match="no model.gguf"):
        resolve_model(tmp_path)
    files = resolve_model(default_gguf())
    assert len(files.labels) == 77  # Banking77 from build/default/labels.json
    (tmp_path / "model.gguf").symlink_to(default_gguf())
    (tmp_path / "labels.json").write_text(json.dumps({"labels": ["a", "b"]}))
    assert resolve_model(tmp_path).labels == ["a", "b"]


def test_default_labels_are_banking77():
    from appliance.resources import default_dir

    labels = json.loads((default_dir() / "labels.json").read_text())
    assert len(labels) == len(set(labels)) == 77 and "card_arrival" in labels


def test_classify_prompt_comes_from_the_task_file(tmp_path):
    """The service classifies with the prompt the adapter was trained with: the build's task file, else the default."""
    from appliance.artifacts import TASK_FILE, Task, write_task
    from appliance.service.prompting import classify_messages
    from appliance.training.data import CLASSIFY_SYSTEM_PROMPT

    bare = resolve_model(default_gguf())
    assert bare.task is None and bare.system_prompt == CLASSIFY_SYSTEM_PROMPT
    (tmp_path / "model.gguf").symlink_to(default_gguf())
    write_task(tmp_path / TASK_FILE, Task(system_prompt="Name the customer's intent.", labels=None))
    files = resolve_model(tmp_path)
    assert files.system_prompt == "Name the customer's intent."
    assert classify_messages("lost card", files.system_prompt)[0] == {"role": "system",
                                                                      "content": "Name the customer's intent."}
    assert len(files.labels) == 77  # a task without labels keeps the shipped Banking77 set, as before


def test_keys_file_from_systemd_credentials(tmp_path):
    s = Settings.load(env={})
    assert s.resolved_keys_file({"CREDENTIALS_DIRECTORY": str(tmp_path)}) == tmp_path / "api-keys"
    assert Settings.load(env={}, keys_file=tmp_path / "k").resolved_keys_file({}) == tmp_path / "k"


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "appliance", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, **(env or {})), timeout=120)


def test_keys_cli_prints_key_once(tmp_path):
    env = {"BANKLLM_KEYS_FILE": str(tmp_path / "keys")}
    made = _cli("keys", "create", "--name", "teller app", env=env)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("bk_")
    listed = _cli("keys", "list", env=env)
    assert "teller app" in listed.stdout and key not in listed.stdout + listed.stderr
    bad = _cli("keys", "create", "--name", "x;rm -rf", env=env)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "fix:" in bad.stderr
    gone = _cli("keys", "revoke", "nobody", env=env)
    assert gone.returncode != 0 and "keys list" in gone.stderr


def test_serve_refuses_without_keys_or_model(tmp_path):
    env = {"BANKLLM_KEYS_FILE": str(tmp_path / "keys")}
    no_model = _cli("serve", "--model", tmp_path / "none.gguf", env=env)
    assert no_model.returncode != 0 and "does not exist" in no_model.stderr
    assert len(no_model.stderr.strip().splitlines()) == 1
    no_keys = _cli("serve", "--model", default_gguf(), env=env)
    assert no_keys.returncode != 0 and "keys create" in no_keys.stderr


def test_service_imports_without_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        import appliance.service.app, appliance.service.engine, appliance.cli.serve_cmd, appliance.cli.keys_cmd
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_serves_with_no_network(tmp_path):
    """The whole service, client included, inside a network namespace that has only loopback."""
    if os.geteuid() != 0:
        pytest.fail("needs root for unshare --net (the test machine runs as root)")
    script = tmp_path / "offline.py"
    script.write_text(textwrap.dedent(f"""
        import sys, pathlib
        sys.path.insert(0, {str(REPO)!r})
        from tests._service_util import running_server
        with running_server(pathlib.Path({str(tmp_path / 'srv')!r})) as srv:
            r = srv.client().chat.completions.create(model="bankllm", max_tokens=3,
                                                     messages=[{{"role": "user", "content": "hi"}}])
            print("answer:", bool(r.choices[0].message.content))
    """))
    cmd = ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {sys.executable} {script}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and "answer: True" in proc.stdout, proc.stderr[-2000:]
