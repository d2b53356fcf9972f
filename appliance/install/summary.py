"""What the operator reads at the end of an install: endpoint, key, a curl line that works, the ollama line."""

from __future__ import annotations

import typing
from pathlib import Path

from .. import __version__
from ..artifacts import MODELFILE_FILE
from ..settings import Settings
from . import systemd as sd
from .layout import Layout

if typing.TYPE_CHECKING:
    from .installer import InstallResult


def foreground_argv(layout: Layout) -> list[str]:
    """`bankllm serve` as the unit runs it, for machines without systemd (keys read from the credentials dir)."""
    return [str(layout.bankllm_exe), "serve", "--config", str(layout.config_file), "--keys-file", str(layout.keys_file)]


def foreground_command(layout: Layout) -> str:
    return " ".join(foreground_argv(layout))


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
    lines.append(f"try: curl -s {result.endpoint}/v1/chat/completions -H \"Authorization: Bearer {key_ref}\" "
                 f"-H 'Content-Type: application/json' -d '{body}'")
    lines.append(f"ollama: ollama create {settings.model_name} -f {lay.current}/{MODELFILE_FILE}")
    return lines
