"""`bankllm install`, `bundle`, `status`, `doctor`, `rollback`, `uninstall`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..settings import Settings

_PATH = click.Path(path_type=Path)


def _layout_options(f):
    f = click.option("--root", "root", type=_PATH, help="Stage everything under DIR instead of the live system.")(f)
    f = click.option("--user", "user", is_flag=True, help="Per-user install (platformdirs paths, user unit).")(f)
    return f


def _build_options(f):
    for opt in reversed([
        click.option("--build", "build_dir", type=_PATH, help="An existing build directory (skips the build)."),
        click.option("--wheelhouse", type=_PATH, help="Wheels to install the service's environment from (no index)."),
        click.option("--base", type=_PATH, help="16-bit Hugging Face checkpoint (default: the embedded base)."),
        click.option("--adapter", help="PEFT LoRA directory, archive or URL (default: the shipped adapter)."),
        click.option("--adapter-sha256", help="Expected sha256 of the adapter."),
        click.option("--train", "train_data", type=_PATH,
                     help="Fine-tune an adapter on this text,category CSV or chat JSONL first (instead of --adapter)."),
        click.option("--labels", type=_PATH, help="With --train: the allowed labels (default: the CSV's categories)."),
        click.option("--train-epochs", type=float, default=1.0, show_default=True, help="With --train: epochs."),
        click.option("--train-max-steps", type=int, help="With --train: stop after this many steps (smoke runs)."),
        click.option("--train-lr", type=float, default=2e-4, show_default=True, help="With --train: learning rate."),
        click.option("--quant", default="auto", show_default=True, help="Quantization, or auto (gated)."),
        click.option("--config", type=_PATH, help="bankllm TOML settings file."),
    ]):
        f = opt(f)
    return f


def _wheelhouse(settings: Settings, wheelhouse: Path | None) -> Path:
    """The given wheelhouse, or one made now from this checkout (needs the package index)."""
    if wheelhouse is not None:
        return wheelhouse
    from ..install.bundle import make_wheelhouse
    from ..resources import _REPO

    click.echo(f"wheelhouse: pip wheel of {_REPO} for {settings.install_python} (needs the package index)", err=True)
    return make_wheelhouse(Path(settings.data_dir) / "wheelhouse", Path(settings.install_python), _REPO)


def _build(settings, build_dir, base, adapter, adapter_sha256, quant, train_data=None, labels=None,
           train_epochs=1.0, train_max_steps=None, train_lr=2e-4) -> Path:
    if build_dir is not None:
        return build_dir
    from ..pipeline.build import run_build

    if train_data is not None:
        adapter = str(_train(settings, base, train_data, labels, train_epochs, train_max_steps, train_lr))
    return run_build(settings, base=base, adapter=adapter, adapter_sha256=adapter_sha256, quant=quant).out_dir


def _train(settings, base, data, labels, epochs, max_steps, lr) -> Path:
    """Stage 1 with --train: a LoRA adapter from the operator's data, with `bankllm train`'s defaults."""
    import logging

    from ..pipeline.base import DEFAULT_BASE_NAME, ensure_default_base
    from ..training.train import TrainConfig, train_or_reuse

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base_name = "" if base else DEFAULT_BASE_NAME
    base = Path(base) if base else ensure_default_base(settings.data_dir)
    # out: the adapter lands in a keyed directory under it (train_or_reuse).
    cfg = TrainConfig(data=data, out=Path(settings.data_dir) / "adapters", base=base, base_name=base_name,
                      labels=labels, epochs=epochs, max_steps=max_steps, lr=lr, threads=settings.resolved_threads(),
                      cache_dir=Path(settings.data_dir) / "cache")
    return train_or_reuse(cfg, log_fn=lambda m: click.echo(m, err=True))


def _check_sources(build_dir, adapter, adapter_sha256, train_data, labels) -> None:
    from ..errors import InputError

    if train_data is not None and (adapter or adapter_sha256 or build_dir):
        raise InputError("--train makes the adapter, so it cannot be combined with --adapter or --build",
                         "drop --adapter/--adapter-sha256/--build, or drop --train")
    if labels is not None and train_data is None:
        raise InputError("--labels only applies with --train", "add --train DATA or drop --labels")


@click.command()
@_layout_options
@_build_options
@click.option("--bundle", type=_PATH, help="Install from a bundle made by `bankllm bundle` (offline, verified).")
@click.option("--host", help="Address the service binds to (default 127.0.0.1).")
@click.option("--port", type=int, help="TCP port of the service (default 8080).")
@click.option("--allow", "allow", multiple=True, help="Client network allowed to connect (CIDR; repeatable).")
@click.option("--no-start", is_flag=True, help="Lay everything out but do not start the service.")
@click.option("--foreground", is_flag=True, help="Where systemd is not running, then serve in the foreground.")
def install(user, root, build_dir, wheelhouse, base, adapter, adapter_sha256, train_data, labels, train_epochs,
            train_max_steps, train_lr, quant, config, bundle, host, port, allow, no_start, foreground):
    """Install the appliance: code, model, config, API key and hardened unit; start it and wait for /ready."""
    from ..install.installer import install as do_install, settings_for_install, summary
    from ..install.layout import choose_layout

    if bundle is not None and any((build_dir, wheelhouse, base, adapter, train_data)):
        from ..errors import InstallError

        raise InstallError("--bundle carries its own model and wheels",
                           "drop --build, --wheelhouse, --base, --adapter and --train")
    _check_sources(build_dir, adapter, adapter_sha256, train_data, labels)
    layout = choose_layout(user=user, root=root)
    settings = settings_for_install(layout, config, host=host, port=port,
                                    allowed_networks=list(allow) if allow else None)
    if bundle is None:
        wheelhouse = _wheelhouse(settings, wheelhouse)
        build_dir = _build(settings, build_dir, base, adapter, adapter_sha256, quant, train_data, labels,
                           train_epochs, train_max_steps, train_lr)
    result = do_install(settings, layout, build_dir=build_dir, bundle=bundle, wheelhouse=wheelhouse,
                        start=not no_start, log=lambda m: click.echo(m, err=True))
    for line in summary(result, settings):
        click.echo(line)
    if foreground and layout.is_live and not no_start and not result.systemd:
        import os

        from ..console import release
        from ..install.installer import foreground_argv

        argv = foreground_argv(layout)
        click.echo(f"serving in the foreground: {' '.join(argv)}", err=True)
        sys.stdout.flush()
        release()  # the service's own output goes to the terminal, not to this install's log
        os.execv(argv[0], argv)


@click.command()
@_build_options
@click.option("--out", required=True, type=_PATH, help="The bundle file to write (a .tar).")
def bundle(build_dir, wheelhouse, base, adapter, adapter_sha256, train_data, labels, train_epochs, train_max_steps,
           train_lr, quant, config, out):
    """Make the air-gap bundle: wheelhouse for this Python and platform, the built model, a sha256 manifest."""
    from ..fsutil import sha256_file
    from ..install.bundle import make_bundle

    _check_sources(build_dir, adapter, adapter_sha256, train_data, labels)
    settings = Settings.load(config=config)
    wheelhouse = _wheelhouse(settings, wheelhouse)
    build_dir = _build(settings, build_dir, base, adapter, adapter_sha256, quant, train_data, labels,
                       train_epochs, train_max_steps, train_lr)
    manifest = make_bundle(out, build_dir, wheelhouse, Path(settings.install_python))
    click.echo(f"bundle {out}: {len(manifest['files'])} files for {manifest['python_tag']} {manifest['machine']}, "
               f"build {manifest['build_id']}; sha256 {sha256_file(out)}")
    click.echo("on the air-gapped server (no bankllm there yet: the bundle's wheelhouse bootstraps the installer):")
    click.echo(f"  mkdir -p boot && tar -xf {out.name} -C boot wheelhouse && python3 -m venv boot/venv && "
               f"boot/venv/bin/pip install --no-index --find-links boot/wheelhouse bankllm")
    click.echo(f"  sudo boot/venv/bin/bankllm install --bundle {out.name}")


def _readonly_layout(user, root):
    from ..install.layout import choose_layout

    return choose_layout(user=user, root=root, euid=0)  # reading needs no root


@click.command()
@_layout_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
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
    if info["previous"]:
        click.echo(f"previous: {info['previous']['build_id']} (bankllm rollback returns to it)")
    click.echo(f"endpoint: {info['endpoint']} health={info['health']} ready={info['ready']}")


@click.command()
@_layout_options
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
@_layout_options
def rollback(user, root):
    """Switch back to the previous model and restart the service."""
    from ..install.installer import settings_for_install
    from ..install.layout import choose_layout
    from ..install.lifecycle import rollback as do_rollback

    layout = choose_layout(user=user, root=root)
    old, new = do_rollback(settings_for_install(layout), layout, log=lambda m: click.echo(m, err=True))
    click.echo(f"rolled back: {old} -> {new}")


@click.command()
@_layout_options
@click.option("--purge", is_flag=True, help="Also delete models, configuration and API keys.")
def uninstall(user, root, purge):
    """Stop and remove the service and its code (models and keys stay unless --purge)."""
    from ..install.layout import choose_layout
    from ..install.lifecycle import uninstall as do_uninstall

    layout = choose_layout(user=user, root=root)
    removed = do_uninstall(layout, purge=purge, log=lambda m: click.echo(m, err=True))
    click.echo("removed: " + (", ".join(removed) if removed else "nothing (not installed)"))
    if not purge:
        click.echo(f"kept: models in {layout.models_dir}, config and keys in {layout.config_dir} (--purge removes them)")


def register(cli: click.Group) -> None:
    for command in (install, bundle, status, doctor, rollback, uninstall):
        cli.add_command(command)
