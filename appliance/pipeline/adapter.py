"""Get a PEFT LoRA adapter from a directory, an archive or a URL (sha256-pinned), and check it fits the base."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterDir, Task
from ..errors import AdapterMismatchError, ChecksumError, FetchError, InputError
from ..fsutil import atomic_dir, atomic_path, sha256_file
from .base import BaseInfo, check_safetensors

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


@dataclass
class Adapter:
    path: Path           # the unpacked PEFT directory
    source: str          # what the user passed
    kind: str            # dir | archive | url
    sha256: str          # of the archive/download bytes, or of adapter_model.safetensors for a directory
    config: dict

    @property
    def dir(self) -> AdapterDir:
        return AdapterDir(self.path)

    @property
    def labels(self) -> list[str] | None:
        return self.dir.labels()

    @property
    def task(self) -> Task | None:
        return self.dir.task()

    def as_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256, "path": str(self.path),
                "rank": self.config.get("r"), "alpha": self.config.get("lora_alpha"),
                "target_modules": self.config.get("target_modules"),
                "base_model_name_or_path": self.config.get("base_model_name_or_path")}


def resolve_adapter(src: str, expected_sha256: str | None, cache_dir: Path, timeout_s: float = 60.0) -> Adapter:
    """Verify the adapter's bytes against `expected_sha256` (if given) before unpacking or using them."""
    expected = _normalize_sha(expected_sha256)
    if re.match(r"^https?://", src):
        archive = _download(src, Path(cache_dir) / "downloads", timeout_s)
        return _from_archive(archive, src, "url", expected, cache_dir)
    path = Path(src).expanduser()
    if not path.exists():
        raise InputError(f"adapter {src} does not exist", "pass a PEFT adapter directory, a .tar.gz/.zip of one, or an http(s) URL")
    if path.is_dir():
        weights = AdapterDir(path).weights
        if not weights.is_file():
            raise InputError(f"adapter directory {path} has no {ADAPTER_WEIGHTS}",
                             "pass the directory that peft's save_pretrained wrote")
        digest = sha256_file(weights)
        _verify(digest, expected, f"{weights}")
        return Adapter(path=path, source=src, kind="dir", sha256=digest, config=AdapterDir(path).config())
    if path.name.endswith(ARCHIVE_SUFFIXES):
        return _from_archive(path, src, "archive", expected, cache_dir)
    raise InputError(f"adapter {src} is neither a directory nor a .tar/.tar.gz/.zip archive",
                     "pass a PEFT adapter directory or an archive of one")


def _normalize_sha(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise InputError(f"--adapter-sha256 {value!r} is not 64 hex digits", "pass the output of `sha256sum FILE`")
    return value


def _verify(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected:
        raise ChecksumError(f"sha256 mismatch for {what}: expected {expected}, got {actual}",
                            "fetch the adapter again from a trusted copy, or correct --adapter-sha256")


def _download(url: str, dest_dir: Path, timeout_s: float) -> Path:
    name = Path(urllib.request.urlparse(url).path).name or "adapter"
    if not name.endswith(ARCHIVE_SUFFIXES):
        raise InputError(f"adapter URL {url} does not name a .tar/.tar.gz/.zip archive",
                         "publish the adapter as an archive on the internal mirror")
    dest = dest_dir / name
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, atomic_path(dest) as tmp:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"fetching {url} failed: HTTP {exc.code}", "check the URL on the internal mirror") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"fetching {url} failed: {reason}", "check the URL and that the mirror is reachable") from None
    return dest


def _from_archive(archive: Path, source: str, kind: str, expected: str | None, cache_dir: Path) -> Adapter:
    digest = sha256_file(archive)
    _verify(digest, expected, str(archive))
    dest = Path(cache_dir) / "adapters" / digest[:16]
    if not (dest / ".complete").is_file():
        with atomic_dir(dest) as tmp:
            _safe_extract(archive, tmp)
            (tmp / ".complete").write_text(digest + "\n")
    root = _find_adapter_root(dest)
    return Adapter(path=root, source=source, kind=kind, sha256=digest, config=AdapterDir(root).config())


def _safe_extract(archive: Path, dest: Path) -> None:
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    target = (dest / info.filename).resolve()
                    if not target.is_relative_to(dest.resolve()):
                        raise InputError(f"archive {archive} has an unsafe path {info.filename!r}",
                                         "rebuild the archive with relative paths only")
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")  # refuses absolute paths, links out, devices
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise InputError(f"adapter archive {archive} is corrupt ({exc})", "fetch the archive again") from None


def _find_adapter_root(directory: Path) -> Path:
    hits = sorted(p.parent for p in directory.rglob(ADAPTER_CONFIG))
    if not hits:
        raise InputError(f"the adapter archive holds no {ADAPTER_CONFIG}",
                         "archive the directory that peft's save_pretrained wrote")
    return min(hits, key=lambda p: len(p.parts))


def _norm_name(name: str | None) -> str:
    """Compare base names by their last component, without a trailing content hash bankllm adds."""
    last = Path(str(name or "").rstrip("/")).name.lower()
    return re.sub(r"-[0-9a-f]{12}$", "", last)


def check_adapter_fits(adapter: Adapter, base: BaseInfo) -> None:
    """Refuse an adapter whose base name, target modules or tensor shapes do not fit `base`."""
    from safetensors import safe_open

    wanted = _norm_name(adapter.config.get("base_model_name_or_path"))
    known = {_norm_name(base.path.name), _norm_name(base.provenance.get("name"))}
    config_name = json.loads((base.path / "config.json").read_text()).get("_name_or_path")
    known.add(_norm_name(config_name))
    known.discard("")
    if wanted and wanted not in known:
        raise AdapterMismatchError(
            f"adapter was made for base {adapter.config.get('base_model_name_or_path')!r}, not {base.path.name!r}",
            "build with the --base the adapter was trained on, or use an adapter trained on this base")

    base_shapes: dict[str, tuple[int, ...]] = {}
    for path in check_safetensors(base.path):
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                base_shapes[key] = tuple(f.get_slice(key).get_shape())
    weights = adapter.dir.weights
    if not weights.is_file():
        raise InputError(f"adapter {adapter.path} has no {ADAPTER_WEIGHTS}", "pass the directory peft's save_pretrained wrote")
    check_safetensors(adapter.path)
    with safe_open(weights, framework="numpy") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    lora_keys = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys:
        raise AdapterMismatchError(f"adapter {adapter.path} holds no LoRA tensors", "pass a LoRA adapter")
    for key in lora_keys:
        module = key.split(".lora_")[0]
        module = module.removeprefix("base_model.model.")
        base_key = module + ".weight"
        if base_key not in base_shapes:
            raise AdapterMismatchError(f"adapter targets module {module!r}, which base {base.path.name} does not have",
                                       "use an adapter trained on this base")
        out_features, in_features = base_shapes[base_key][:2]
        shape = shapes[key]
        if ".lora_A." in key and shape[1] != in_features:
            raise AdapterMismatchError(
                f"adapter tensor {key} has shape {list(shape)}, base {base_key} needs {in_features} input features",
                "use an adapter trained on this base")
        if ".lora_B." in key and shape[0] != out_features:
            raise AdapterMismatchError(
                f"adapter tensor {key} has shape {list(shape)}, base {base_key} needs {out_features} output features",
                "use an adapter trained on this base")
