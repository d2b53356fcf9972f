"""`bankllm install`, `bundle`, `status`, `doctor`, `rollback`, `uninstall`."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from ..settings import Settings
from .options import PATH, adapter_options, compose, config_option, json_option, layout_options, pop_prefixed, \
    train_options

_TRAIN = "train_"  # install's train flags arrive as train_<TrainConfig field>

build_options = compose(
    click.option("--build", "build_dir", type=PATH, help="An existing build directory (skips the build)."),
    click.option("--wheelhouse", type=PATH, help="Wheels to install the service's environment from (no index)."),
    click.option("--base", type=PATH, help="16-bit Hugging Face checkpoint (default: the embedded base)."),
    adapter_options,
    train_options(["data", "labels", "epochs", "max_steps", "lr"], param_prefix=_TRAIN, flag_prefix="train-",
                  help_prefix="With --train: ", required=False, spell={
                      "data": ("--train", "Fine-tune an adapter on this text,category CSV or chat JSONL first "
                                          "(instead of --adapter)."),
                      "labels": ("--labels", "With --train: the allowed labels (default: the CSV's categories).")}),
    click.option("--quant", default="auto", show_default=True, help="Quantization, or auto (gated)."),
    config_option,
)


def _log(message: str) -> None:
    click.echo(message, err=True)


def _prepare(settings, train: dict, **sources):
    """The wheelhouse and the build to install or bundle: the library trains and builds what was not given."""
    from ..install.source import prepare

    if train.get("data") is not None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")  # the trainer's progress lines
    return prepare(settings, train=train, log=_log, **sources)


@click.command()
@layout_options
@build_options
@click.option("--bundle", type=PATH, help="Install from a bundle made by `bankllm bundle` (offline, verified).")
@click.option("--trust", type=PATH, help="The bank's public key (bankllm-signing.pub): the bundle's and the build's "
                                          "signatures must verify with it; the service then checks the build at "
                                          "every start.")
@click.option("--bundle-sha256", help="sha256 of the whole bundle file (what `bankllm bundle` printed): required for "
                                      "an unsigned bundle, checked before anything is unpacked.")
@click.option("--host", help="Address the service binds to (default 127.0.0.1).")
@click.option("--port", type=int, help="TCP port of the service (default 8080).")
@click.option("--allow", "allow", multiple=True, help="Client network allowed to connect (CIDR; repeatable).")
@click.option("--no-start", is_flag=True, help="Lay everything out but do not start the service.")
@click.option("--foreground", is_flag=True, help="Where systemd is not running, then serve in the foreground "
              "(as the service user, not as root).")
@click.option("--tls-cert", type=PATH, help="Serve HTTPS with this PEM certificate (copied into the credentials).")
@click.option("--tls-key", type=PATH, help="The certificate's PEM private key (copied 0600 into the credentials).")
@click.option("--tls-client-ca", type=PATH, help="PEM CA that signs the bank's client certificates.")
@click.option("--require-client-cert", is_flag=True, default=None,
              help="Mutual TLS: refuse clients without a certificate signed by --tls-client-ca.")
def install(user, root, build_dir, wheelhouse, base, adapter, adapter_sha256, quant, config, bundle, trust,
            bundle_sha256, host, port, allow, no_start, foreground, tls_cert, tls_key, tls_client_ca,
            require_client_cert, **train):
    """Install the appliance: code, model, config, API key and hardened unit; start it and wait for /ready."""
    from ..errors import InstallError
    from ..install.installer import foreground_argv, install as do_install, settings_for_install, summary
    from ..install.layout import choose_layout
    from ..install.source import check_sources

    train = pop_prefixed(train, _TRAIN)
    if bundle is not None and any((build_dir, wheelhouse, base, adapter, train["data"])):
        raise InstallError("--bundle carries its own model and wheels",
                           "drop --build, --wheelhouse, --base, --adapter and --train")
    if bundle_sha256 is not None and bundle is None:
        raise InstallError("--bundle-sha256 pins a bundle file", "add --bundle FILE, or drop --bundle-sha256")
    check_sources(build_dir, adapter, adapter_sha256, train)
    layout = choose_layout(user=user, root=root)
    settings = settings_for_install(layout, config, host=host, port=port,
                                    allowed_networks=list(allow) if allow else None, tls_cert=tls_cert,
                                    tls_key=tls_key, tls_client_ca=tls_client_ca,
                                    require_client_cert=require_client_cert)
    if bundle is None:
        wheelhouse, build_dir = _prepare(settings, train, build_dir=build_dir, wheelhouse=wheelhouse, base=base,
                                         adapter=adapter, adapter_sha256=adapter_sha256, quant=quant)
    result = do_install(settings, layout, build_dir=build_dir, bundle=bundle, wheelhouse=wheelhouse,
                        start=not no_start, log=_log, trust=trust, bundle_sha256=bundle_sha256)
    for line in summary(result, settings):
        click.echo(line)
    if foreground and layout.is_live and not no_start and not result.systemd:
        from ..console import release

        argv = foreground_argv(layout)
        click.echo(f"serving in the foreground: {' '.join(argv)}", err=True)
        sys.stdout.flush()
        release()  # the service's own output goes to the terminal, not to this install's log
        os.execv(argv[0], argv)


@click.command()
@build_options
@click.option("--out", required=True, type=PATH, help="The bundle file to write (a .tar).")
@click.option("--sign", "sign_key", type=PATH, help="The bank's ed25519 private key (`bankllm sign keygen`): signs the "
                                                    "build directory and the bundle's manifest.")
def bundle(build_dir, wheelhouse, base, adapter, adapter_sha256, quant, config, out, sign_key, **train):
    """Make the air-gap bundle: wheelhouse for this Python and platform, the built model, a sha256 manifest.

    For GPU offload (gpu_layers), build llama-cpp-python's wheel with a GPU backend on the bundling machine:
    CMAKE_ARGS="-DGGML_CUDA=on" bankllm bundle ... (it needs the CUDA toolkit there; the wheel carries libllama)."""
    from ..fsutil import sha256_file
    from ..install.bundle import bootstrap_lines, make_bundle

    train = pop_prefixed(train, _TRAIN)
    settings = Settings.load(config=config)
    if sign_key is not None:
        from ..signing import load_private_key

        load_private_key(sign_key)  # a wrong key is refused before the wheelhouse and the build are made
    wheelhouse, build_dir = _prepare(settings, train, build_dir=build_dir, wheelhouse=wheelhouse, base=base,
                                     adapter=adapter, adapter_sha256=adapter_sha256, quant=quant)
    manifest = make_bundle(out, build_dir, wheelhouse, Path(settings.install_python), sign_key=sign_key)
    digest = sha256_file(out)
    click.echo(f"bundle {out}: {len(manifest['files'])} files for {manifest['python_tag']} {manifest['machine']}, "
               f"build {manifest['build_id']}; sha256 {digest}" + ("; signed" if sign_key else ""))
    click.echo("on the air-gapped server (no bankllm there yet: the bundle's wheelhouse bootstraps the installer, "
               "checked first):")
    for line in bootstrap_lines(out.name, digest, signed=sign_key is not None):
        click.echo(f"  {line}")


def _readonly_layout(user, root):
    from ..install.layout import choose_layout

    return choose_layout(user=user, root=root, euid=0)  # reading needs no root


@click.command()
@layout_options
@json_option
def status(user, root, as_json):
    """Unit state, installed model and its gate verdict, endpoint health."""
    from ..install.installer import settings_for_install
    from ..install.lifecycle import status as get_status

    layout = _readonly_layout(user, root)
    info = get_status(settings_for_install(layout), layout)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    unit, model = info["unit"], info["model"]
    click.echo(f"unit: {'not installed' if not unit.get('installed') else unit.get('is-active', 'systemd not running')}"
               f" ({unit.get('is-enabled', '-')})")
    click.echo(f"model: {model['build_id']} {model.get('quant') or ''} verdict={model.get('verdict')}" if model
               else "model: none installed")
    for name, a in (model or {}).get("adapters", {}).items():
        click.echo(f"  adapter {name}: verdict={a['verdict']} ppl_ratio={a['ppl_ratio']} mean_kld={a['mean_kld']} "
                   f"top1_agreement={a['top1_agreement']}")
    if (model or {}).get("adapters"):
        click.echo("  (adapters added at run time: `bankllm adapters list`)")
    if info["previous"]:
        click.echo(f"previous: {info['previous']['build_id']} (bankllm rollback returns to it)")
    click.echo(f"endpoint: {info['endpoint']} health={info['health']} ready={info['ready']}")


@click.command()
@layout_options
def doctor(user, root):
    """Check CPU, RAM, disk, systemd, port and permissions; print each finding with its fix."""
    from ..install.installer import settings_for_install
    from ..install.lifecycle import doctor as run_doctor

    layout = _readonly_layout(user, root)
    findings = run_doctor(settings_for_install(layout), layout)
    for f in findings:
        click.echo(f"[{f.level:4}] {f.what}" + (f" -- fix: {f.fix}" if f.fix else ""))
    if any(f.level == "fail" for f in findings):
        sys.exit(1)


@click.command()
@layout_options
def rollback(user, root):
    """Switch back to the previous model and restart the service."""
    from ..install.installer import settings_for_install
    from ..install.layout import choose_layout
    from ..install.lifecycle import rollback as do_rollback

    layout = choose_layout(user=user, root=root)
    old, new = do_rollback(settings_for_install(layout), layout, log=_log)
    click.echo(f"rolled back: {old} -> {new}")


@click.command()
@layout_options
@click.option("--purge", is_flag=True, help="Also delete models, configuration and API keys.")
def uninstall(user, root, purge):
    """Stop and remove the service and its code (models and keys stay unless --purge)."""
    from ..install.layout import choose_layout
    from ..install.lifecycle import uninstall as do_uninstall

    layout = choose_layout(user=user, root=root)
    removed = do_uninstall(layout, purge=purge, log=_log)
    click.echo("removed: " + (", ".join(removed) if removed else "nothing (not installed)"))
    if not purge:
        click.echo(f"kept: models in {layout.models_dir}, config and keys in {layout.config_dir} (--purge removes them)")


def register(cli: click.Group) -> None:
    for command in (install, bundle, status, doctor, rollback, uninstall):
        cli.add_command(command)
