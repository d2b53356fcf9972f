"""`bankllm adapters add|remove|list`: the adapters a running service serves, changed hot through its admin routes
(issue 13). Registered onto the `adapters` group (appliance/cli/adapters_cmd.py holds `build`)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from pathlib import Path

import click

from .options import PATH, config_option, json_option, layout_options

KEY_HELP = "File holding an admin-scoped API key (`bankllm keys create --scope admin`); else $BANKLLM_ADMIN_KEY."


def _settings(config, user, root):
    from ..install.installer import settings_for_install
    from ..install.layout import choose_layout
    from ..settings import Settings

    if config is not None:
        return Settings.load(config=config)
    return settings_for_install(choose_layout(user=user, root=root, euid=0))


def _admin_key(key_file: Path | None, env_key: str | None) -> str:
    from ..errors import ConfigError

    if key_file is not None:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the admin key file {key_file} ({exc.strerror})",
                              "pass --key-file a file holding an admin-scoped key") from None
    else:
        key = (env_key or "").strip()
    if not key:
        raise ConfigError("no admin key", "pass --key-file FILE or set BANKLLM_ADMIN_KEY to an admin-scoped key "
                          "(`bankllm keys create --name ops --scope admin`)")
    return key


def call(settings, key: str, method: str, path: str, body: dict | None = None, timeout: float = 300) -> dict:
    """One admin request to the running service (HTTPS pinned to its configured certificate); its JSON body, or a
    one-line error with the service's own message."""
    from ..errors import InputError, ServiceError
    from ..install.health import _pinned_context, endpoint_of, pin_of

    url = endpoint_of(settings)
    parts = urllib.parse.urlsplit(url)
    pin = pin_of(settings)
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=_pinned_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        conn.connect()
        if pin is not None and conn.sock.getpeercert(binary_form=True) != pin.cert_der:
            raise ServiceError(f"the service at {url} does not present the configured certificate",
                               "check tls_cert in the settings")
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        status, raw = resp.status, resp.read()
    except OSError as exc:
        raise ServiceError(f"the service at {url} does not answer ({exc})",
                           "start it (`systemctl start bankllm`) or check host/port in the settings") from None
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = {}
    if status >= 400:
        err = (data.get("error") or {}) if isinstance(data, dict) else {}
        message = err.get("message") or raw[:200].decode(errors="replace")
        raise InputError(f"the service refused: {message} (HTTP {status})",
                         "see the message; the service keeps serving what it served")
    return data


def _line(a: dict) -> str:
    g = a.get("gate") or {}
    figs = " ".join(f"{k}={g[k]}" for k in ("ppl_ratio", "mean_kld", "top1_agreement") if g.get(k) is not None)
    return (f"{a['name']:<20} {a.get('origin', '-'):<6} verdict={a.get('verdict')} {figs} labels={a.get('labels', 0)}"
            f" threshold={a.get('threshold')}")


admin_options = [config_option, layout_options, click.option("--key-file", type=PATH, help=KEY_HELP),
                 click.option("--admin-key", envvar="BANKLLM_ADMIN_KEY", hidden=True)]


def _with_admin(f):
    for option in reversed(admin_options):
        f = option(f)
    return f


@click.command("add")
@click.argument("name")
@click.argument("src", type=PATH)
@click.option("--sha256", "pin", help="Manifest sha256 the adapter.NAME.* files in SRC must have: sha256 over the "
              "sorted lines '<sha256>  <file>\\n' of those files (a wrong pin prints the actual one).")
@_with_admin
def add(name, src, pin, config, user, root, key_file, admin_key):
    """Serve adapter NAME from SRC (a directory with adapter.NAME.* files, e.g. `bankllm adapters build --out`)
    without a restart; the service checks it against its base, keeps a copy and loads it hot."""
    from ..artifacts import check_adapter_name, read_adapter_report
    from ..errors import ChecksumError, InputError
    from ..service.adapters import SERVED_VERDICTS, manifest_sha256

    check_adapter_name(name)
    src = Path(src).resolve()
    if not src.is_dir():
        raise InputError(f"{src} is not a directory", "pass the directory holding the adapter.NAME.* files")
    report = read_adapter_report(src, name)  # a missing or broken report is said here, before the service is asked
    if report.get("verdict") not in SERVED_VERDICTS:
        raise InputError(f"adapter {name} failed its gate (verdict {report.get('verdict')!r})",
                         "retrain or rebuild it; only ship/warn adapters are served")
    manifest = manifest_sha256(src, name)
    if pin is not None and pin.lower() != manifest:
        raise ChecksumError(f"the adapter.{name}.* files in {src} have manifest sha256 {manifest}, not {pin}",
                            "check you copied the adapter you meant to, or pin the sha256 printed here")
    settings = _settings(config, user, root)
    # The manifest goes with the request: the service refuses files changed since this check.
    out = call(settings, _admin_key(key_file, admin_key), "POST", "/admin/adapters",
               {"name": name, "path": str(src), "sha256": manifest})
    click.echo(f"added: {_line(out['adapter'])}; manifest sha256 {manifest}")


@click.command("remove")
@click.argument("name")
@_with_admin
def remove(name, config, user, root, key_file, admin_key):
    """Stop serving adapter NAME: new requests get 404, those in flight finish; the set is kept across restarts."""
    out = call(_settings(config, user, root), _admin_key(key_file, admin_key), "DELETE",
               f"/admin/adapters/{urllib.parse.quote(name, safe='')}")
    click.echo(f"removed {name}; served: {', '.join(out['served'])}")


@click.command("list")
@json_option
@_with_admin
def list_(as_json, config, user, root, key_file, admin_key):
    """The running service's base model and adapters, with each adapter's gate figures."""
    out = call(_settings(config, user, root), _admin_key(key_file, admin_key), "GET", "/admin/adapters")
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"base: {out['base']['name']} ({out['base']['model']})")
    for a in out["adapters"]:
        click.echo(_line(a))
    if not out["adapters"]:
        click.echo("no adapters")


COMMANDS = (add, remove, list_)


def register(cli: click.Group) -> None:
    """Add add/remove/list to the `adapters` group (made here when adapters_cmd has not registered it yet)."""
    group = cli.commands.get("adapters")
    if group is None:
        group = click.Group("adapters", help="LoRA adapters served per request on one base (each gated on the "
                            "shipped model).")
        cli.add_command(group)
    for command in COMMANDS:
        group.add_command(command)
