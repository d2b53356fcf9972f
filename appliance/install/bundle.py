"""The air-gap bundle: one tar with a wheelhouse, a build directory and a manifest of every file's sha256."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .. import signing
from ..archive import ArchiveLimits, extract_archive
from ..artifacts import MODEL_FILE, SIGNATURE_FILE
from ..errors import ChecksumError, InputError, InstallError, SignatureError
from ..fsutil import CHUNK, atomic_path, require_free_disk, sha256_bytes, sha256_file
from .store import build_report
from .venv import python_tag

SCHEMA = "bankllm-bundle/1"
MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"  # an ed25519 signature over manifest.json's exact bytes (appliance/signing.py)
WHEELHOUSE, MODEL = "wheelhouse", "model"
_MAX_HEAD_BYTES = 16 << 20  # manifest.json / manifest.sig are read into memory: a bound before they are read


@dataclass
class OpenedBundle:
    """A verified, unpacked bundle in a temporary directory."""

    root: Path
    manifest: dict

    @property
    def wheelhouse(self) -> Path:
        return self.root / WHEELHOUSE

    @property
    def build_dir(self) -> Path:
        return self.root / MODEL


def make_wheelhouse(dest: Path, python: Path, project: Path, timeout: float = 1800) -> Path:
    """`pip wheel` the project and every dependency for `python` (needs the index; run on a connected machine)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not (Path(project) / "pyproject.toml").is_file():
        raise InstallError(f"{project} is not a bankllm source tree (no pyproject.toml)",
                           "run `bankllm bundle` from a checkout, or pass --wheelhouse DIR")
    cmd = [str(python), "-m", "pip", "wheel", "--wheel-dir", str(dest), str(project)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise InstallError(f"`pip wheel` took longer than {timeout:.0f} s", "rerun; built wheels are cached") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise InstallError(f"could not build the wheelhouse: {tail}", "check the package index is reachable")
    return dest


def make_bundle(out: Path, build_dir: Path, wheelhouse: Path, python: Path, sign_key: Path | None = None) -> dict:
    """Write the bundle tar atomically; return its manifest. With `sign_key` (the bank's ed25519 private key) the
    build directory is signed (model/bankllm-build.sig) and so is the manifest (manifest.sig)."""
    build_dir, wheelhouse = Path(build_dir), Path(wheelhouse)
    if not (build_dir / MODEL_FILE).is_file():
        raise InputError(f"{build_dir} has no {MODEL_FILE}", "pass a directory made by `bankllm build`")
    private_key = signing.load_private_key(sign_key) if sign_key is not None else None
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not any(w.name.startswith("bankllm-") for w in wheels):
        raise InputError(f"wheelhouse {wheelhouse} has no bankllm wheel", "rebuild it with `bankllm bundle`")
    files: dict[str, Path] = {f"{WHEELHOUSE}/{w.name}": w for w in wheels}
    for p in sorted(build_dir.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            files[f"{MODEL}/{p.name}"] = p
    generated: dict[str, bytes] = {}
    if private_key is not None:
        # Signed here, in memory: the build directory (perhaps a cached build) is not written to.
        files.pop(f"{MODEL}/{SIGNATURE_FILE}", None)
        generated[f"{MODEL}/{SIGNATURE_FILE}"] = signing.build_signature(build_dir, private_key)
    tag, machine = python_tag(python)
    report = build_report(build_dir)
    digests = {name: sha256_file(path) for name, path in files.items()}
    digests.update({name: sha256_bytes(data) for name, data in generated.items()})
    manifest = {
        "schema": SCHEMA, "bankllm_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python_tag": tag, "machine": machine, "build_id": report.get("build_id") if report else None,
        "files": dict(sorted(digests.items())),
    }
    require_free_disk(Path(out).parent, sum(p.stat().st_size for p in files.values()) + (1 << 20), "the bundle")
    data = signing.canonical_json(manifest)  # the exact bytes manifest.sig covers
    head = {MANIFEST: data}
    if private_key is not None:
        head[MANIFEST_SIG] = signing.sign_bundle_manifest(private_key, data)
    with atomic_path(Path(out)) as tmp:
        with tarfile.open(tmp, "w") as tar:
            for name, blob in [*head.items(), *generated.items()]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(blob), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(blob))
            for name, path in files.items():
                tar.add(path, arcname=name, recursive=False, filter=_normalize)
    return manifest


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o644
    return info


# Run on the server before bankllm exists there (so with nothing but python3's standard library, tar and openssl): the
# wheelhouse that bootstraps the installer must be checked before pip installs it, or the verifier could be replaced.
_CHECK_WHEELHOUSE = (
    "python3 -c 'import hashlib,json,os,sys;f=json.load(open(\"manifest.json\"))[\"files\"];"
    "w={\"wheelhouse/\"+n for n in os.listdir(\"wheelhouse\")};"
    "sys.exit(\"wheelhouse differs from manifest.json\") if w!={n for n in f if n.startswith(\"wheelhouse/\")} else 0;"
    "[sys.exit(n+\": sha256 differs from manifest.json\") for n in sorted(w) "
    "if hashlib.sha256(open(n,\"rb\").read()).hexdigest()!=f[n]];print(\"wheelhouse matches manifest.json\")'")


def bootstrap_lines(bundle_name: str, digest: str, signed: bool, pubkey: str = "bankllm-signing.pub") -> list[str]:
    """The shell lines that bring a bundle's installer onto an air-gapped server, each checked before it is used:
    the whole file's sha256 (unsigned), or the manifest's signature with openssl and then every wheel (signed)."""
    if signed:
        check = [
            f"mkdir -p boot && tar -xf {bundle_name} -C boot {MANIFEST} {MANIFEST_SIG} && cd boot",
            "python3 -c 'import base64,json;open(\"sig.bin\",\"wb\").write(base64.b64decode(json.load("
            f"open(\"{MANIFEST_SIG}\"))[\"signature\"]));open(\"signed.bin\",\"wb\").write("
            f"b\"{signing.BUNDLE_CONTEXT}\\0\"+open(\"{MANIFEST}\",\"rb\").read())'",
            f"openssl pkeyutl -verify -pubin -inkey ../{pubkey} -rawin -in signed.bin -sigfile sig.bin",
            f"tar -xf ../{bundle_name} wheelhouse && {_CHECK_WHEELHOUSE} && cd ..",
        ]
        verify = f"--trust {pubkey}"
    else:
        check = [f"echo '{digest}  {bundle_name}' | sha256sum -c",
                 f"mkdir -p boot && tar -xf {bundle_name} -C boot wheelhouse"]
        verify = f"--bundle-sha256 {digest}"
    return [*check,
            "python3 -m venv boot/venv && boot/venv/bin/pip install --no-index --find-links boot/wheelhouse bankllm",
            f"sudo boot/venv/bin/bankllm install --bundle {bundle_name} {verify}"]


class _HashingReader:
    """A file read front to back once, every byte also going into a sha256 (tarfile's stream mode never seeks)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        return data


def _check_pin(bundle_sha256: str | None) -> str | None:
    if bundle_sha256 is None:
        return None
    pin = bundle_sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", pin):
        raise InputError(f"--bundle-sha256 {bundle_sha256!r} is not a sha256 (64 hex digits)",
                         "pass the sha256 that `bankllm bundle` printed, or `sha256sum` of the file")
    return pin


def bundle_limits(settings=None) -> ArchiveLimits:
    """The caps on a bundle's unpacked size and entry count (the settings' defaults without settings)."""
    if settings is None:
        from ..settings import Settings

        defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
        return ArchiveLimits(defaults["bundle_max_bytes"], defaults["bundle_max_members"], "bundle_max_bytes",
                             "bundle_max_members")
    return ArchiveLimits(settings.bundle_max_bytes, settings.bundle_max_members, "bundle_max_bytes",
                         "bundle_max_members")


def authenticate_bundle(path: Path, trust: Path | None = None, bundle_sha256: str | None = None) -> dict:
    """Decide whether the bundle may be unpacked at all; nothing is written. One front-to-back read gives the whole
    file's sha256, its entry names and the bytes of manifest.json and manifest.sig (all from the same bytes, so a
    file swapped afterwards cannot slip in another manifest); then the signature is checked with the `trust`ed
    public key and/or the file against `bundle_sha256`. Returns the manifest those checks vouched for."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"bundle {path} does not exist", "pass the file made by `bankllm bundle --out`")
    pin = _check_pin(bundle_sha256)
    if trust is None and pin is None:
        raise SignatureError(f"bundle {path} needs --trust PUBKEY or --bundle-sha256 HEX (a bundle that only agrees "
                             "with itself could have had a wheel and its hash replaced)",
                             "pass --trust with the bank's public key (for a bundle made with `bankllm bundle --sign "
                             "KEY`), or --bundle-sha256 with the sha256 `bankllm bundle` printed")
    public_key = signing.load_public_key(trust) if trust is not None else None
    head: dict[str, bytes] = {}
    seen: set[str] = set()
    damaged = "copy the bundle again and compare its sha256 with the one `bankllm bundle` printed"
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for m in tar:
                    name = Path(m.name).as_posix()
                    if name in seen:
                        # Two entries of one name: which one counts would depend on the order of unpacking.
                        raise ChecksumError(f"bundle {path} holds two entries named {name!r}",
                                            "rebuild the bundle with `bankllm bundle`; do not repack it by hand")
                    seen.add(name)
                    if name in (MANIFEST, MANIFEST_SIG):
                        if not m.isfile() or m.size > _MAX_HEAD_BYTES:
                            raise ChecksumError(f"bundle {path}: {name} is not a plain file of at most "
                                                f"{_MAX_HEAD_BYTES >> 20} MiB", "rebuild the bundle with `bankllm bundle`")
                        head[name] = tar.extractfile(m).read()
            while reader.read(CHUNK):  # the end-of-archive padding belongs to the file's sha256 too
                pass
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ChecksumError(f"bundle {path} is damaged or not a bankllm bundle ({exc})", damaged) from None
    if pin is not None and reader.sha256.hexdigest() != pin:
        raise ChecksumError(f"bundle {path} has sha256 {reader.sha256.hexdigest()}, not the {pin} given",
                            damaged)
    if MANIFEST not in head:
        raise ChecksumError(f"bundle {path} has no {MANIFEST}", "rebuild the bundle with `bankllm bundle`")
    if public_key is not None:
        if MANIFEST_SIG not in head:
            raise SignatureError(f"bundle {path} is not signed (no {MANIFEST_SIG}), but a trusted key is set "
                                 f"({trust})", "make the bundle with `bankllm bundle --sign KEY`; once the bank "
                                               "trusts a key (--trust, or trust_key), unsigned bundles are refused")
        signing.verify_bundle_manifest(public_key, head[MANIFEST], head[MANIFEST_SIG],
                                       f"the signature of bundle {path}")
    try:
        manifest = json.loads(head[MANIFEST])
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or not isinstance(manifest.get("files"), dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in manifest["files"].items()):
        raise ChecksumError(f"bundle {path} has no valid {MANIFEST}", "rebuild the bundle with `bankllm bundle`")
    return manifest


def open_bundle(path: Path, dest: Path, python: Path | None = None, *, trust: Path | None = None,
                bundle_sha256: str | None = None, limits: ArchiveLimits | None = None) -> OpenedBundle:
    """Unpack into `dest` (a scratch directory) and verify every file against the manifest; nothing else is touched.

    Before anything is unpacked, the manifest must be vouched for: signed by the `trust`ed key, or the whole file
    pinned by `bundle_sha256` (a bundle that merely agrees with itself could have had a wheel and its hash swapped).
    """
    path, dest = Path(path), Path(dest)
    manifest = authenticate_bundle(path, trust, bundle_sha256)
    if python is not None:
        tag, machine = python_tag(python)
        if (tag, machine) != (manifest.get("python_tag"), manifest.get("machine")):
            raise InstallError(
                f"bundle is for {manifest.get('python_tag')} on {manifest.get('machine')}, "
                f"but {python} here is {tag} on {machine}",
                "make the bundle on a machine with the same Python version and CPU architecture")
    # The shared safe extractor (appliance/archive.py) checks and writes every member: regular files and
    # directories only, plain relative names at most two levels deep, caps on bytes and members.
    extract_archive(path, dest, limits or bundle_limits(), what="bundle", max_depth=2)
    # The manifest vouched for above is the one used; the copy unpacked beside the files is never read.
    listed = set(manifest["files"])
    present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {MANIFEST, MANIFEST_SIG}
    if listed != present:
        odd = sorted(listed ^ present)[:3]
        raise ChecksumError(f"bundle {path} does not match its manifest (files {odd} missing or extra)",
                            "copy the bundle again; it is incomplete or altered")
    for name, digest in sorted(manifest["files"].items()):
        if sha256_file(dest / name) != digest:
            raise ChecksumError(f"bundle {path}: {name} does not match its sha256 in the manifest",
                                "copy the bundle again; it was damaged in transit or altered")
    return OpenedBundle(dest, manifest)
