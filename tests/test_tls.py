"""TLS and mutual TLS: the files checked at load, carried to the unit as credentials, and the REAL `bankllm serve`
over HTTPS with the `openai` client, clients without (or with a stranger's) certificate refused under mTLS, the
installer's probes and its printed curl line working over HTTPS. The PKI is made here with `cryptography`."""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from appliance.errors import ConfigError, format_error
from appliance.install import steps
from appliance.install import systemd as sd
from appliance.install.health import Pin, endpoint_of, handshake, pin_of, probe, reachable, wait_ready
from appliance.install.installer import InstallResult, settings_for_install
from appliance.install.layout import system_layout
from appliance.install.summary import summary
from appliance.service import tls
from appliance.settings import Settings
from tests._service_util import REPO, create_key, default_gguf, free_port
from tests._tls_util import NOW, make_pki

fast = pytest.mark.fast


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki, **extra) -> dict:
    return {"tls_cert": pki.server_cert, "tls_key": pki.server_key, **extra}


# --- settings: the files must exist, parse, match and be in date --------------------------------------------------

@fast
def test_good_files_load_and_map_to_uvicorn_options(pki):
    plain = Settings.load(env={})
    assert tls.uvicorn_options(plain) == {}
    only_tls = Settings.load(env={}, **_tls(pki))
    assert tls.uvicorn_options(only_tls) == {"ssl_certfile": str(pki.server_cert), "ssl_keyfile": str(pki.server_key)}
    optional = tls.uvicorn_options(Settings.load(env={}, **_tls(pki, tls_client_ca=pki.ca.path)))
    assert optional["ssl_cert_reqs"] == ssl.CERT_OPTIONAL and optional["ssl_ca_certs"] == str(pki.ca.path)
    required = tls.uvicorn_options(Settings.load(env={}, **_tls(pki, tls_client_ca=pki.ca.path,
                                                                require_client_cert=True)))
    assert required["ssl_cert_reqs"] == ssl.CERT_REQUIRED


@fast
def test_systemd_credentials_replace_the_configured_paths(pki, tmp_path):
    """Under the unit the configured (root-only) paths are unreadable: the credential copies are what is read."""
    creds = tmp_path / "creds"
    creds.mkdir()
    for name, src in (("tls-cert", pki.server_cert), ("tls-key", pki.server_key), ("tls-client-ca", pki.ca.path)):
        (creds / name).write_bytes(src.read_bytes())
    gone = tmp_path / "etc"  # the configured paths do not even exist in here
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    s = Settings.load(env=env, tls_cert=gone / "c.pem", tls_key=gone / "k.pem", tls_client_ca=gone / "ca.pem",
                      require_client_cert=True)
    assert s.resolved_tls_files(env) == {"tls_cert": creds / "tls-cert", "tls_key": creds / "tls-key",
                                         "tls_client_ca": creds / "tls-client-ca"}
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(env={}, tls_cert=gone / "c.pem", tls_key=gone / "k.pem")


def _expect(match: str, **kw):
    with pytest.raises(ConfigError) as err:
        Settings.load(env={}, **kw)
    line = format_error(err.value)
    assert match in err.value.message, line
    assert err.value.fix and "\n" not in line
    return err.value


@fast
def test_bad_tls_settings_are_refused_with_one_line(pki, tmp_path, monkeypatch):
    other_cert, other_key = pki.ca.issue(tmp_path, "other-server", server=True, ips=["127.0.0.1"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem file\n")
    _expect("does not exist", **_tls(pki, tls_cert=tmp_path / "missing.pem"))
    _expect("does not exist", **_tls(pki, tls_key=tmp_path / "missing.key"))
    _expect("is a directory", **_tls(pki, tls_cert=tmp_path))
    _expect("holds no PEM certificate", **_tls(pki, tls_cert=garbage))
    _expect("holds no PEM certificate", **_tls(pki, tls_cert=pki.server_key))
    _expect("is not a PEM private key", **_tls(pki, tls_key=garbage))
    _expect("is not a PEM private key", **_tls(pki, tls_key=pki.server_cert))
    err = _expect("is not the private key of tls_cert", **_tls(pki, tls_key=other_key))
    assert "tls_key" in err.fix
    _expect("is not the private key of tls_cert", tls_cert=other_cert, tls_key=pki.server_key)
    _, locked = pki.ca.issue(tmp_path, "locked", server=True, password=b"secret")
    locked_cert = tmp_path / "locked.pem"
    assert "openssl pkey" in _expect("is encrypted", tls_cert=locked_cert, tls_key=locked).fix
    expired = pki.ca.issue(tmp_path, "expired", server=True, not_before=NOW - datetime.timedelta(days=60),
                           not_after=NOW - datetime.timedelta(days=1))
    assert "renew" in _expect("expired on", tls_cert=expired[0], tls_key=expired[1]).fix
    future = pki.ca.issue(tmp_path, "future", server=True, not_before=NOW + datetime.timedelta(days=2))
    _expect("is valid only from", tls_cert=future[0], tls_key=future[1])
    _expect("holds no PEM certificate", **_tls(pki, tls_client_ca=garbage))
    _expect("tls_cert is set but tls_key is not", tls_cert=pki.server_cert)
    _expect("tls_key is set but tls_cert is not", tls_key=pki.server_key)
    _expect("tls_client_ca is set but tls_cert is not", tls_client_ca=pki.ca.path)
    _expect("require_client_cert is set but tls_cert is not", require_client_cert=True)
    assert "tls_client_ca" in _expect("require_client_cert = true needs tls_client_ca",
                                      **_tls(pki, require_client_cert=True)).fix
    # Unreadable (root reads everything, so the denial is simulated where the file is read).
    real_read = Path.read_bytes

    def deny(self):
        if self == pki.server_key:
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    _expect("is not readable by this user", **_tls(pki))


# --- install: credentials, the unit, the config, the summary -----------------------------------------------------

@fast
def test_unit_hands_the_tls_files_over_as_credentials(pki, tmp_path):
    lay = system_layout()
    base = dict(exec_start=[lay.bankllm_exe, "serve", "--config", lay.config_file], keys_file=lay.keys_file,
                port=8443, allowed_networks=["10.20.0.0/16"])
    plain = sd.parse_unit(sd.render_unit(**base))["Service"]["LoadCredential"]
    assert plain == [f"api-keys:{lay.keys_file}"]
    files = {"tls-cert": lay.credentials_dir / "tls-cert", "tls-key": lay.credentials_dir / "tls-key"}
    text = sd.render_unit(**base, tls_files=files)
    assert not [l for l in text.splitlines() if l.startswith("@") or "@TLS" in l]  # no marker or placeholder left
    assert sd.parse_unit(text)["Service"]["LoadCredential"] == [
        f"api-keys:{lay.keys_file}", "tls-cert:/etc/bankllm/credentials/tls-cert",
        "tls-key:/etc/bankllm/credentials/tls-key"]
    mtls = sd.render_unit(**base, tls_files={**files, "tls-client-ca": lay.credentials_dir / "tls-client-ca"})
    assert sd.parse_unit(mtls)["Service"]["LoadCredential"][-1] == "tls-client-ca:/etc/bankllm/credentials/tls-client-ca"
    user = sd.render_unit(**base, tls_files=files, user=True)
    assert "tls-key:/etc/bankllm/credentials/tls-key" in user and "DynamicUser" not in user
    from tests.test_systemd_unit import _staged_root

    unit = _staged_root(tmp_path, mtls)
    assert [l for l in sd.verify_unit(unit, root=tmp_path) if "bankllm" in l] == []


@fast
def test_install_copies_the_tls_files_0600_and_the_config_points_at_the_copies(pki, tmp_path):
    lay = system_layout(tmp_path / "img")
    settings = Settings.load(env={}, **_tls(pki, tls_client_ca=pki.ca.path, require_client_cert=True))
    changed: list[str] = []
    installed = steps.install_tls(settings, lay, changed)
    assert changed == ["tls-cert", "tls-key", "tls-client-ca"]
    creds = lay.host(lay.credentials_dir)
    for name, src in (("tls-cert", pki.server_cert), ("tls-key", pki.server_key), ("tls-client-ca", pki.ca.path)):
        assert (creds / name).read_bytes() == src.read_bytes()
        assert (creds / name).stat().st_mode & 0o777 == 0o600
    assert creds.stat().st_mode & 0o777 == 0o700
    assert installed.tls_key == Path("/etc/bankllm/credentials/tls-key") and installed.require_client_cert
    steps.write_config(installed, lay, changed)
    text = lay.host(lay.config_file).read_text()
    assert 'tls_key = "/etc/bankllm/credentials/tls-key"' in text and "require_client_cert = true" in text
    assert 'tls_client_ca = "/etc/bankllm/credentials/tls-client-ca"' in text
    # The staged config names target paths; the installer reads them where they are staged now.
    again = settings_for_install(lay)
    assert again.tls_key == lay.host(lay.credentials_dir / "tls-key") and again.require_client_cert
    changed = []
    assert steps.install_tls(again, lay, changed).tls_key == Path("/etc/bankllm/credentials/tls-key")
    assert changed == []
    assert set(steps.tls_credentials(lay)) == {"tls-cert", "tls-key", "tls-client-ca"}
    # TLS turned off: the copies go, and so do the unit's credential lines.
    steps.install_tls(Settings.load(env={}), lay, changed)
    assert changed == ["tls-cert removed", "tls-key removed", "tls-client-ca removed"]
    assert steps.tls_credentials(lay) == {}


def _install_result(lay, endpoint) -> InstallResult:
    return InstallResult(lay, "smollm2-a", endpoint, [], started=True, systemd=True,
                         first_key=lay.first_key_file)


@fast
def test_summary_prints_an_https_curl_line(pki, tmp_path):
    lay = system_layout(tmp_path / "img")
    s = Settings.load(env={}, port=8443, **_tls(pki))
    steps.install_tls(s, lay, [])
    assert endpoint_of(s) == "https://127.0.0.1:8443"
    line = next(l for l in summary(_install_result(lay, endpoint_of(s)), s) if l.startswith("try: curl"))
    assert "curl -s --cacert /etc/bankllm/credentials/tls-cert https://127.0.0.1:8443/v1/chat/completions" in line
    assert "--resolve" not in line and "--cert" not in line
    # A certificate without the endpoint's address: curl connects by its DNS name, resolved to that address.
    dns_cert, dns_key = pki.ca.issue(tmp_path, "named", server=True, dns=["llm.bank.test"])
    s = Settings.load(env={}, port=8443, tls_cert=dns_cert, tls_key=dns_key, tls_client_ca=pki.ca.path,
                      require_client_cert=True)
    steps.install_tls(s, lay, [])
    lines = summary(_install_result(lay, endpoint_of(s)), s)
    line = next(l for l in lines if l.startswith("try: curl"))
    assert ("--resolve llm.bank.test:8443:127.0.0.1 --cacert /etc/bankllm/credentials/tls-cert "
            "--cert CLIENT.pem --key CLIENT.key https://llm.bank.test:8443/v1/chat/completions") in line
    assert any(l.startswith("mutual TLS: every client needs a certificate signed by") for l in lines)
    plain = Settings.load(env={})
    steps.install_tls(plain, lay, [])
    line = next(l for l in summary(_install_result(lay, endpoint_of(plain)), plain) if l.startswith("try: curl"))
    assert "curl -s http://127.0.0.1:8080/v1/chat/completions" in line


# --- the real server over HTTPS ----------------------------------------------------------------------------------

def _context(pki, cert=None, key=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca.path))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


@contextlib.contextmanager
def tls_server(tmp: Path, env: dict, context: ssl.SSLContext, host: str = "127.0.0.1", startup_s: float = 120):
    """The real `bankllm serve` (the default GGUF) with TLS settings from the environment; (base URL, key, port)."""
    tmp.mkdir(parents=True, exist_ok=True)
    keys_file = tmp / "api-keys"
    key = create_key(keys_file, "tls-tests")
    port = free_port()
    full_env = dict(os.environ, BANKLLM_KEYS_FILE=str(keys_file), BANKLLM_PORT=str(port), BANKLLM_THREADS="1",
                    BANKLLM_UNSAFE_SERVE_AS_ROOT="1", BANKLLM_AUDIT_LOG=str(tmp / "audit.jsonl"),
                    **{k: str(v) for k, v in env.items()})
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--model", str(default_gguf())],
                                stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    url = f"https://{host}:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            assert proc.poll() is None, f"serve exited {proc.returncode}: {log.read_text()[-2000:]}"
            try:
                with httpx.Client(verify=context, timeout=5) as c:
                    if c.get(url + "/health").status_code == 200:
                        break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
        assert "on https://" in log.read_text()
        yield url, key, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def mtls(pki, tmp_path_factory):
    """One real server requiring client certificates signed by the bank CA."""
    env = {"BANKLLM_TLS_CERT": pki.server_cert, "BANKLLM_TLS_KEY": pki.server_key,
           "BANKLLM_TLS_CLIENT_CA": pki.ca.path, "BANKLLM_REQUIRE_CLIENT_CERT": "true"}
    with tls_server(tmp_path_factory.mktemp("mtls"), env, _context(pki, pki.client_cert, pki.client_key)) as srv:
        yield srv


def _openai(url, key, context) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(verify=context, timeout=60))


def test_openai_client_over_mtls_with_the_bank_s_client_certificate(pki, mtls):
    url, key, _ = mtls
    # Clients are closed: an open keep-alive connection holds uvicorn's graceful shutdown for its full 10 s.
    with _openai(url, key, _context(pki, pki.client_cert, pki.client_key)) as client:
        reply = client.chat.completions.create(model="bankllm", max_tokens=4,
                                               messages=[{"role": "user", "content": "Hello"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
        assert [m.id for m in client.models.list().data] == ["bankllm"]
    with pytest.raises(openai.AuthenticationError):  # TLS does not replace the API key
        with _openai(url, "bk_wrong", _context(pki, pki.client_cert, pki.client_key)) as client:
            client.models.list()


def test_mtls_refuses_no_certificate_and_a_stranger_s_certificate(pki, mtls):
    url, key, _ = mtls
    for context in (_context(pki), _context(pki, pki.stranger_cert, pki.stranger_key)):
        with pytest.raises(openai.APIConnectionError), _openai(url, key, context) as client:
            client.models.list()
        with pytest.raises(httpx.TransportError):
            with httpx.Client(verify=context, timeout=10) as c:
                c.get(url + "/health")  # not even the open route


def test_plain_http_to_the_tls_port_gets_no_answer(mtls):
    url, key, _ = mtls
    with pytest.raises(httpx.TransportError):
        with httpx.Client(timeout=10) as c:
            c.get(url.replace("https://", "http://") + "/health", headers={"Authorization": f"Bearer {key}"})


def test_a_client_that_does_not_trust_the_bank_ca_refuses_the_server(pki, mtls):
    url, key, _ = mtls
    stranger_trust = ssl.create_default_context(cafile=str(pki.other_ca.path))
    stranger_trust.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    with pytest.raises(openai.APIConnectionError), _openai(url, key, stranger_trust) as client:
        client.models.list()


def test_installer_probes_see_the_mtls_service_by_its_pinned_certificate(pki, mtls, tmp_path):
    url, key, port = mtls
    s = Settings.load(env={}, port=port, **_tls(pki, tls_client_ca=pki.ca.path, require_client_cert=True))
    pin = pin_of(s)
    assert endpoint_of(s) == url and pin.client_cert_required
    assert handshake(url, pin) and reachable(url, key, pin) and wait_ready(url, key, 10, pin=pin)
    other_cert, _ = pki.ca.issue(tmp_path, "impostor", server=True, ips=["127.0.0.1"])
    impostor = Pin(tls.leaf_der(other_cert), True)
    assert not handshake(url, impostor) and not wait_ready(url, key, 2, pin=impostor)
    from appliance.install.lifecycle import status

    info = status(s, system_layout(tmp_path / "img"))
    assert info["endpoint"] == url and info["health"] == info["ready"] == "TLS handshake ok (client certificate required)"
    closed = f"https://127.0.0.1:{free_port()}"
    assert not handshake(closed, pin) and probe(closed, key, pin=pin) == (0, "")


def test_optional_client_certificates_probe_and_curl_line(pki, tmp_path):
    """A client CA without require_client_cert: no certificate is fine, a stranger's is refused; the installer's
    /ready probe works over HTTPS; the summary's curl line (with --resolve for a DNS-only certificate) answers."""
    dns_cert, dns_key = pki.ca.issue(tmp_path, "named", server=True, dns=["llm.bank.test"])
    env = {"BANKLLM_TLS_CERT": dns_cert, "BANKLLM_TLS_KEY": dns_key, "BANKLLM_TLS_CLIENT_CA": pki.ca.path}
    pinned = ssl.create_default_context(cafile=str(pki.ca.path))
    pinned.check_hostname = False  # the certificate names llm.bank.test; the test connects to 127.0.0.1
    with tls_server(tmp_path / "srv", env, pinned) as (url, key, port):
        s = Settings.load(env={}, port=port, tls_cert=dns_cert, tls_key=dns_key, tls_client_ca=pki.ca.path)
        pin = pin_of(s)
        assert not pin.client_cert_required
        status, body = probe(url + "/ready", key, pin=pin)
        assert status == 200 and '"ready"' in body
        assert probe(url + "/ready", None, pin=pin)[0] == 401 and wait_ready(url, key, 10, pin=pin)
        stranger = ssl.create_default_context(cafile=str(pki.ca.path))
        stranger.check_hostname = False
        stranger.load_cert_chain(str(pki.stranger_cert), str(pki.stranger_key))
        with pytest.raises(httpx.TransportError):
            with httpx.Client(verify=stranger, timeout=10) as c:
                c.get(url + "/health")
        # The summary's curl line, run as printed (the key file and the certificate copy staged under a root).
        lay = system_layout(tmp_path / "img")
        steps.install_tls(s, lay, [])
        line = next(l for l in summary(_install_result(lay, url), s) if l.startswith("try: curl"))
        assert f"--resolve llm.bank.test:{port}:127.0.0.1" in line
        argv = shlex.split(line.removeprefix("try: "))
        argv = [a.replace("/etc/bankllm/credentials/tls-cert", str(lay.host(lay.credentials_dir / "tls-cert")))
                .replace(f"$(cat {lay.first_key_file})", key) for a in argv]
        curl = subprocess.run(argv + ["-w", "\n%{http_code}"], capture_output=True, text=True, timeout=120)
        assert curl.returncode == 0 and curl.stdout.rstrip().endswith("200"), curl.stderr + curl.stdout
        assert '"chat.completion"' in curl.stdout
