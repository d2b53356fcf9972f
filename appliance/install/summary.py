"""What the operator reads at the end of an install: endpoint, key, a curl line that works, the ollama line."""

from __future__ import annotations

import typing
import urllib.parse
from pathlib import Path

from .. import __version__
from ..artifacts import MODELFILE_FILE
from ..service.privileges import SERVICE_USER
from ..service.tls import names_of
from ..settings import Settings
from . import systemd as sd
from .steps import tls_credentials
from .layout import SYSTEM, Layout

if typing.TYPE_CHECKING:
    from .installer import InstallResult


def foreground_argv(layout: Layout) -> list[str]:
    """`bankllm serve` for machines without systemd: a system install's is run by root and drops to the service user
    (as the unit's DynamicUser=), after handing it the keys and TLS files (as the unit's LoadCredential=)."""
    argv = [str(layout.bankllm_exe), "serve", "--config", str(layout.config_file), "--keys-file", str(layout.keys_file)]
    return argv + (["--as-user", SERVICE_USER] if layout.mode == SYSTEM else [])


def foreground_command(layout: Layout) -> str:
    return " ".join(foreground_argv(layout))


def curl_tls(result: "InstallResult", settings: Settings) -> tuple[str, str]:
    """(base URL, curl's TLS options ending in a space) that reach the service: plain HTTP gives (endpoint, "").

    curl trusts the installed certificate itself (--cacert; curl accepts a CA-issued certificate as the anchor), and
    connects by a name the certificate holds: where it does not hold the endpoint's address, --resolve maps its
    first DNS name to that address.
    """
    lay = result.layout
    cert = tls_credentials(lay).get("tls-cert")
    if cert is None:
        return result.endpoint, ""
    parts = urllib.parse.urlsplit(result.endpoint)
    host, port, url, args = parts.hostname, parts.port, result.endpoint, []
    dns, ips = names_of(lay.host(cert))
    if host not in ips and host not in dns and dns:
        url = f"https://{dns[0]}:{port}"
        args += ["--resolve", f"{dns[0]}:{port}:{f'[{host}]' if ':' in host else host}"]
    args += ["--cacert", str(cert)]
    if settings.require_client_cert:
        args += ["--cert", "CLIENT.pem", "--key", "CLIENT.key"]
    return url, " ".join(args) + " "


def summary(result: "InstallResult", settings: Settings) -> list[str]:
    """The closing lines: endpoint, key, a curl line that works, the ollama line."""
    lay = result.layout
    key_ref = f"$(cat {lay.first_key_file})" if result.first_key else "$BANKLLM_KEY"
    lines = [f"bankllm {__version__}: build {result.build_id} installed ({lay.mode} layout"
             f"{'' if lay.root == Path('/') else ' under ' + str(lay.root)})"
             + (f"; changed: {', '.join(result.changed)}" if result.changed else "; nothing changed")]
    if result.started:
        lines.append(f"service: {sd.UNIT_NAME} running under systemd, ready at {result.endpoint}")
    elif lay.is_live and not result.systemd:
        lines.append("systemd is not running on this machine (PID 1 is not systemd): the service was NOT started.")
        lines.append(f"run it in the foreground instead (or rerun with --foreground):  {foreground_command(lay)}")
    elif not lay.is_live:
        lines.append(f"staged under {lay.root}: {sd.UNIT_NAME} is enabled there and starts when that system boots")
    lines.append(f"endpoint: {result.endpoint}/v1 (OpenAI-compatible)")
    lines.append(f"API key: {lay.first_key_file}" if result.first_key else
                 f"API keys: hashes in {lay.keys_file}; add one with `bankllm keys create --name NAME "
                 f"--keys-file {lay.keys_file}` (the running service reloads its keys)")
    body = '{"model":"%s","messages":[{"role":"user","content":"What is an IBAN?"}],"max_tokens":64}' % settings.model_name
    url, tls_args = curl_tls(result, settings)
    if settings.require_client_cert:
        lines.append(f"mutual TLS: every client needs a certificate signed by {settings.tls_client_ca}; "
                     "put yours in place of CLIENT.pem / CLIENT.key below")
    lines.append(f"try: curl -s {tls_args}{url}/v1/chat/completions -H \"Authorization: Bearer {key_ref}\" "
                 f"-H 'Content-Type: application/json' -d '{body}'")
    lines.append(f"ollama: ollama create {settings.model_name} -f {lay.current}/{MODELFILE_FILE}")
    return lines
