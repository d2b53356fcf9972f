"""TLS under the real systemd: `bankllm install --tls-cert ... --require-client-cert` against a booted systemd; the
hardened unit's dynamic user reads the certificate and key only through LoadCredential= (0600 copies), the
installer's readiness wait works over mTLS, and the `openai` client needs the bank's client certificate."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from tests._systemd_util import CACHE, REPO, BootedSystemd, build_dir, clean_env, wheelhouse
from tests._tls_util import make_pki

pytestmark = [pytest.mark.system, pytest.mark.slow]

BANKLLM = os.path.join(os.path.dirname(sys.executable), "bankllm")
CLIENT = """
import ssl, sys, httpx, openai
ca, key = sys.argv[1], sys.argv[2]
def client(cert=None):
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert + ".pem", cert + ".key")
    return openai.OpenAI(base_url="https://127.0.0.1:8443/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(verify=context, timeout=150))
with client(sys.argv[3]) as c:
    r = c.chat.completions.create(model="bankllm", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    print("answer:", bool(r.choices[0].message.content))
for name, cert in (("none", None), ("stranger", sys.argv[4])):
    try:
        with client(cert) as c:
            c.models.list()
        print(name, "ACCEPTED")
    except openai.APIConnectionError:
        print(name, "refused")
"""


def test_mtls_install_under_real_systemd():
    if os.geteuid() != 0:
        pytest.fail("the systemd system test needs root (unshare/nsenter/mount)")
    root = CACHE / f"tls-{os.getpid()}"  # not under /tmp: the booted namespace has its own /tmp
    sysd = BootedSystemd(root / "ns")
    try:
        wh, build = wheelhouse(root / "wheels"), build_dir(root / "build-a", "smollm2-a")
        pki = make_pki(root / "pki")
        sysd.start()
        proc = sysd.run([BANKLLM, "install", "--build", str(build), "--wheelhouse", str(wh), "--port", "8443",
                         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                         "--tls-client-ca", str(pki.ca.path), "--require-client-cert"], timeout=900, check=False,
                        # PYTHONPATH: this checkout's installer, whichever checkout the venv's `bankllm` came from.
                        env=clean_env(BANKLLM_DATA_DIR=root / "data", BANKLLM_INSTALL_READY_TIMEOUT_S=120,
                                      PYTHONPATH=REPO))
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{sysd.journal()}"
        assert "running under systemd, ready at https://127.0.0.1:8443" in proc.stdout, proc.stdout
        assert ("try: curl -s --cacert /etc/bankllm/credentials/tls-cert --cert CLIENT.pem --key CLIENT.key "
                "https://127.0.0.1:8443/v1/chat/completions") in proc.stdout
        for name in ("tls-cert", "tls-key", "tls-client-ca"):
            st = sysd.path(f"/etc/bankllm/credentials/{name}").stat()
            assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0), name
        unit = sysd.path("/etc/systemd/system/bankllm.service").read_text()
        assert "LoadCredential=tls-key:/etc/bankllm/credentials/tls-key" in unit and "DynamicUser=yes" in unit
        key = sysd.path("/etc/bankllm/credentials/first-api-key").read_text().strip()
        client = sysd.run([sys.executable, "-c", CLIENT, str(pki.ca.path), key, str(pki.client_cert)[:-4],
                           str(pki.stranger_cert)[:-4]], net_only=True, timeout=300, check=False)
        assert client.stdout.split("\n")[:3] == ["answer: True", "none refused", "stranger refused"], \
            client.stdout + client.stderr + sysd.journal()
    except BaseException:
        print(sysd.journal(lines=80) if sysd.pid else "(no systemd)")
        raise
    finally:
        sysd.kill()
        shutil.rmtree(root, ignore_errors=True)
