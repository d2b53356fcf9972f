"""What an install or a bundle ships: a build (given, or built now, from an adapter trained first with --train)
and a wheelhouse (given, or made now from this checkout)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..settings import Settings


def check_sources(build_dir: Path | None, adapter: str | None, adapter_sha256: str | None,
                  train: dict | None) -> None:
    """Refuse combinations that contradict each other before any work starts."""
    train = train or {}
    if train.get("data") is not None and (adapter or adapter_sha256 or build_dir):
        raise InputError("--train makes the adapter, so it cannot be combined with --adapter or --build",
                         "drop --adapter/--adapter-sha256/--build, or drop --train")
    if train.get("labels") is not None and train.get("data") is None:
        raise InputError("--labels only applies with --train", "add --train DATA or drop --labels")


def ensure_wheelhouse(settings: Settings, wheelhouse: Path | None, log=print) -> Path:
    """The given wheelhouse, or one made now from this checkout (needs the package index)."""
    if wheelhouse is not None:
        return wheelhouse
    from ..resources import _REPO
    from .bundle import make_wheelhouse

    log(f"wheelhouse: pip wheel of {_REPO} for {settings.install_python} (needs the package index)")
    return make_wheelhouse(Path(settings.data_dir) / "wheelhouse", Path(settings.install_python), _REPO)


def train_config(settings: Settings, *, base: Path | None = None, **fields):
    """A TrainConfig with the settings' threads and cache, on `base` or else the embedded default base."""
    from ..pipeline.base import DEFAULT_BASE_NAME, ensure_default_base
    from ..training.train import TrainConfig

    # None means "not given": the field's own default applies.
    fields = {k: v for k, v in fields.items() if v is not None}
    base_name = "" if base else DEFAULT_BASE_NAME
    base = Path(base) if base else ensure_default_base(settings.data_dir)
    return TrainConfig(base=base, base_name=base_name, threads=settings.resolved_threads(),
                       cache_dir=Path(settings.data_dir) / "cache", **fields)


def train_adapter(settings: Settings, base: Path | None, train: dict, log=print) -> Path:
    """Stage 1 with --train: a LoRA adapter from the operator's data, with `bankllm train`'s defaults."""
    from ..training.train import train_or_reuse

    # out: the adapter lands in a keyed directory under it (train_or_reuse).
    cfg = train_config(settings, base=base, **{**train, "out": Path(settings.data_dir) / "adapters"})
    return train_or_reuse(cfg, log_fn=log)


def ensure_build(settings: Settings, build_dir: Path | None = None, *, base: Path | None = None,
                 adapter: str | None = None, adapter_sha256: str | None = None, quant: str = "auto",
                 train: dict | None = None, log=print) -> Path:
    """The given build directory, or one built now (training its adapter first when `train` names data)."""
    if build_dir is not None:
        return build_dir
    from ..pipeline.build import run_build

    if train and train.get("data") is not None:
        adapter = str(train_adapter(settings, base, train, log))
    return run_build(settings, base=base, adapter=adapter, adapter_sha256=adapter_sha256, quant=quant).out_dir


def prepare(settings: Settings, *, build_dir: Path | None = None, wheelhouse: Path | None = None,
            base: Path | None = None, adapter: str | None = None, adapter_sha256: str | None = None,
            quant: str = "auto", train: dict | None = None, log=print) -> tuple[Path, Path]:
    """(wheelhouse, build directory) for an install or a bundle: each the given one, else made now."""
    check_sources(build_dir, adapter, adapter_sha256, train)
    wheelhouse = ensure_wheelhouse(settings, wheelhouse, log=log)
    return wheelhouse, ensure_build(settings, build_dir, base=base, adapter=adapter, adapter_sha256=adapter_sha256,
                                    quant=quant, train=train, log=log)
