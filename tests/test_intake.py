"""Intake of adapters and bundles (issue 11): crafted archives, caps, pinned bounded downloads, directory pins.

Every refusal must be a typed error with one line naming the problem and the fix, and leave nothing behind.
The crafted archives are also unpacked by the installer's own Python (Debian's /usr/bin/python3 3.11.2 here,
which has no tarfile `filter=` and is affected by CVE-2025-4517) in a subprocess.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import stat
import struct
import subprocess
import tarfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from appliance.archive import ArchiveLimits, Member, _Writer, extract_archive
from appliance.errors import (ArchiveTooLargeError, ChecksumError, ConfigError, FetchError, InputError,
                              UnsafeArchiveError, format_error)
from appliance.fsutil import sha256_file
from appliance.install.bundle import MANIFEST, SCHEMA, bundle_limits, open_bundle
from appliance.pipeline.adapter import adapter_limits, directory_digest, resolve_adapter
from appliance.settings import Settings
from tests.conftest import REPO, run_cli

SMALL = ArchiveLimits(max_bytes=1 << 20, max_members=50)


# --- building crafted archives ------------------------------------------------------------------------

def _info(name: str, type_=tarfile.REGTYPE, size: int = 0, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = type_, size, linkname, mode
    return info


def _tar(path: Path, entries, mode: str = "w:gz", fmt=tarfile.PAX_FORMAT) -> Path:
    """entries: (TarInfo, bytes | None)."""
    with tarfile.open(path, mode, format=fmt) as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x", mode: int = 0o644):
    return _info(name, mode=mode), data


def _cve_2025_4517_chain(escape_to: Path):
    """The published CVE-2025-4517 shape: a chain of long directory names and symlinks pushes the resolved path
    past PATH_MAX, so `filter="data"` stops checking, then a link escapes and a file is written through it."""
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    entries, path = [], ""
    for step in steps:
        entries.append((_info(os.path.join(path, comp), tarfile.DIRTYPE, mode=0o755), None))
        entries.append((_info(os.path.join(path, step), tarfile.SYMTYPE, linkname=comp), None))
        path = os.path.join(path, comp)
    linkpath = os.path.join("/".join(steps), "l" * 254)
    entries.append((_info(linkpath, tarfile.SYMTYPE, linkname="../" * len(steps)), None))
    entries.append((_info("escape", tarfile.SYMTYPE, linkname=linkpath + "/.." * 40 + str(escape_to)), None))
    entries.append(_file("escape/pwned", b"outside"))
    return entries


def _bad_tars(tmp: Path, outside: Path) -> dict[str, Path]:
    ok = [_file("adapter/adapter_config.json", b"{}")]
    cases = {
        "cve-2025-4517 symlink chain": _cve_2025_4517_chain(outside),
        "symlink": ok + [(_info("adapter/link", tarfile.SYMTYPE, linkname="/etc/passwd"), None)],
        "relative symlink": ok + [(_info("adapter/link", tarfile.SYMTYPE, linkname="adapter_config.json"), None)],
        "hardlink out": ok + [(_info("adapter/hl", tarfile.LNKTYPE, linkname="/etc/passwd"), None)],
        "hardlink in": ok + [(_info("adapter/hl", tarfile.LNKTYPE, linkname="adapter/adapter_config.json"), None)],
        "absolute path": ok + [_file(str(outside / "abs"))],
        "dotdot": ok + [_file("adapter/../../dotdot")],
        "dotdot dir": ok + [(_info("../up", tarfile.DIRTYPE), None)],
        "backslash": ok + [_file("..\\..\\evil")],
        "drive letter": ok + [_file("C:/evil")],
        "control char": ok + [_file("adapter/evil\nname")],
        "char device": ok + [(_info("adapter/null", tarfile.CHRTYPE), None)],
        "block device": ok + [(_info("adapter/sda", tarfile.BLKTYPE), None)],
        "fifo": ok + [(_info("adapter/fifo", tarfile.FIFOTYPE), None)],
        "unknown type": ok + [(_info("adapter/odd", b"Z"), None)],
        "duplicate name": ok + [_file("adapter/adapter_config.json", b"{evil}")],
        "duplicate after normalising": ok + [_file("./adapter//adapter_config.json", b"{evil}")],
        "file then dir": ok + [(_info("adapter/adapter_config.json", tarfile.DIRTYPE), None)],
        "file under a file": ok + [_file("adapter/adapter_config.json/x")],
    }
    pax = _info("adapter/ok.txt")
    pax.pax_headers = {"path": "../../pax-escape"}
    cases["pax path override"] = ok + [(pax, b"x")]
    sparse = _info("adapter/sparse")
    sparse.pax_headers = {"GNU.sparse.map": "0,1", "GNU.sparse.size": str(1 << 40), "GNU.sparse.name": "adapter/sparse"}
    cases["sparse file"] = ok + [(sparse, b"x")]
    out = {}
    for i, (name, entries) in enumerate(cases.items()):
        out[name] = _tar(tmp / f"bad{i}.tar.gz", entries)
    out["gnu long name dotdot"] = _tar(tmp / "gnu.tar", ok + [_file("a" * 120 + "/../../../gnu-escape")], "w",
                                       tarfile.GNU_FORMAT)
    return out


def _zip(path: Path, entries) -> Path:
    """entries: (name, bytes, external mode or None)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": the duplicate is the point of one case
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _bad_zips(tmp: Path, outside: Path) -> dict[str, Path]:
    ok = [("adapter/adapter_config.json", b"{}", None)]
    cases = {
        "zip-slip": ok + [("../../zip-slip", b"x", None)],
        "zip-slip nested": ok + [("adapter/../../../zip-slip", b"x", None)],
        "zip absolute": ok + [(str(outside / "zip-abs"), b"x", None)],
        "zip backslash": ok + [("..\\zip-slip", b"x", None)],
        "zip symlink": ok + [("adapter/link", b"/etc/passwd", stat.S_IFLNK | 0o777)],
        "zip device": ok + [("adapter/dev", b"", stat.S_IFCHR | 0o644)],
        "zip fifo": ok + [("adapter/fifo", b"", stat.S_IFIFO | 0o644)],
        "zip duplicate": ok + [("adapter/adapter_config.json", b"{evil}", None)],
    }
    out = {name: _zip(tmp / f"bad{i}.zip", entries) for i, (name, entries) in enumerate(cases.items())}
    # A NUL in a name: zipfile cuts the name there when reading; the raw name must still be refused.
    nul = _zip(tmp / "nul.zip", ok + [("adapter/evilX.txt", b"x", None)])
    nul.write_bytes(nul.read_bytes().replace(b"evilX", b"evil\x00"))
    out["zip NUL in name"] = nul
    return out


def _zero_bomb_tar(path: Path, size: int) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        info = _info("adapter/adapter_model.safetensors", size=size)
        tf.addfile(info, _Zeros(size))
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, n):
        self.left = n

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def _zero_bomb_zip(path: Path, size: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("adapter/adapter_model.safetensors", "w") as dst:
            for _ in range(size // (1 << 20)):
                dst.write(b"\0" * (1 << 20))
    return path


def _listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# --- the extractor: crafted archives ------------------------------------------------------------------

@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crafted")
    outside = tmp / "outside"
    outside.mkdir()
    return {**_bad_tars(tmp, outside), **_bad_zips(tmp, outside)}, outside


def _check_refusal(err: Exception, archive: Path) -> None:
    assert isinstance(err, UnsafeArchiveError), repr(err)
    line = format_error(err)
    assert "\n" not in err.message and " -- fix: " in line and str(archive) in line, line


@pytest.mark.fast
def test_crafted_archives_are_refused_and_leave_nothing(crafted, tmp_path):
    cases, outside = crafted
    assert len(cases) >= 29
    for name, archive in cases.items():
        dest = tmp_path / "work" / "dest"
        with pytest.raises(UnsafeArchiveError) as info:
            extract_archive(archive, dest, SMALL, what="adapter archive")
        _check_refusal(info.value, archive)
        assert not dest.exists() and _listing(tmp_path / "work") == [], name
    assert _listing(outside) == [], "nothing was written outside the destination"
    assert not Path("/etc/pwned").exists()


@pytest.mark.fast
def test_installer_python_refuses_every_crafted_archive(crafted, tmp_path):
    """The same archives through the installer's interpreter (no `filter=`, pre-3.11.13 tarfile)."""
    python = Path(Settings.load(env={}).install_python)
    assert python.is_file(), f"the installer's Python {python} is missing on this machine"
    version = subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    cases, outside = crafted
    jobs = [[name, str(path), str(tmp_path / f"d{i}" / "dest")] for i, (name, path) in enumerate(cases.items())]
    good = tmp_path / "good.tar.gz"
    _tar(good, [(_info(".", tarfile.DIRTYPE), None), _file("./adapter/adapter_config.json", b"{}", mode=0o4777),
                (_info("adapter/sub", tarfile.DIRTYPE, mode=0o777), None), _file("adapter/sub/w.bin", b"w" * 5000)])
    jobs.append(["good", str(good), str(tmp_path / "good" / "dest")])
    script = (
        "import json, sys\n"
        "from appliance.archive import ArchiveLimits, extract_archive\n"
        "out = {}\n"
        "for name, path, dest in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        members = extract_archive(path, dest, ArchiveLimits(1 << 20, 50))\n"
        "        out[name] = ['ok', len(members)]\n"
        "    except Exception as exc:\n"
        "        out[name] = [type(exc).__name__, str(exc)]\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([str(python), "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for name, _, dest in jobs[:-1]:
        assert results[name][0] == "UnsafeArchiveError", (version, name, results[name])
        assert not Path(dest).parent.exists() or _listing(Path(dest).parent) == [], name
    assert results["good"] == ["ok", 3], results["good"]
    dest = tmp_path / "good" / "dest"
    assert _listing(dest) == ["adapter", "adapter/adapter_config.json", "adapter/sub", "adapter/sub/w.bin"]
    assert stat.S_IMODE((dest / "adapter/adapter_config.json").stat().st_mode) == 0o644, "no setuid from the archive"
    assert stat.S_IMODE((dest / "adapter/sub").stat().st_mode) == 0o755
    assert (dest / "adapter/sub/w.bin").read_bytes() == b"w" * 5000
    assert _listing(outside) == []


@pytest.mark.fast
def test_good_archives_unpack_with_fixed_modes(tmp_path):
    entries = [(_info("./", tarfile.DIRTYPE), None), _file("adapter/a.json", b"{}", mode=0o777),
               _file("adapter/deep/b.bin", b"b" * 3000)]
    for mode in ("w", "w:gz", "w:bz2", "w:xz"):
        archive = _tar(tmp_path / f"ok-{mode.replace(':', '')}.tar", entries, mode)
        dest = tmp_path / f"out-{mode.replace(':', '')}"
        members = extract_archive(archive, dest, SMALL)
        assert [m.name for m in members] == ["adapter/a.json", "adapter/deep/b.bin"]
        assert (dest / "adapter/deep/b.bin").read_bytes() == b"b" * 3000
        assert stat.S_IMODE((dest / "adapter/a.json").stat().st_mode) == 0o644
    archive = _zip(tmp_path / "ok.zip", [("adapter/", b"", stat.S_IFDIR | 0o777), ("adapter/a.json", b"{}", 0o100777)])
    extract_archive(archive, tmp_path / "zip-out", SMALL)
    assert stat.S_IMODE((tmp_path / "zip-out/adapter/a.json").stat().st_mode) == 0o644
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        extract_archive(archive, busy, SMALL)
    assert _listing(busy) == ["keep"]


# --- caps ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_bombs_are_refused_from_their_headers(tmp_path):
    tgz = _zero_bomb_tar(tmp_path / "bomb.tar.gz", 32 << 20)
    zipped = _zero_bomb_zip(tmp_path / "bomb.zip", 32 << 20)
    assert tgz.stat().st_size < 200_000 and zipped.stat().st_size < 200_000  # 32 MiB of zeros, a few KB packed
    work = tmp_path / "work"
    for archive in (tgz, zipped):
        with pytest.raises(ArchiveTooLargeError, match="over the cap of 8,388,608 bytes") as info:
            extract_archive(archive, work / "dest", ArchiveLimits(8 << 20, 50, "adapter_archive_max_bytes"))
        assert "raise adapter_archive_max_bytes" in format_error(info.value)
        assert not work.exists() or _listing(work) == []
    # Under a cap that allows it, the same tar unpacks: the refusal above was the cap, not the archive.
    extract_archive(tgz, work / "ok", ArchiveLimits(max_bytes=32 << 20, max_members=5))
    assert (work / "ok/adapter/adapter_model.safetensors").stat().st_size == 32 << 20


@pytest.mark.fast
def test_member_count_cap(tmp_path):
    many = [_file(f"adapter/f{i}", b"") for i in range(60)]
    tgz = _tar(tmp_path / "many.tar.gz", many)
    zipped = _zip(tmp_path / "many.zip", [(f"adapter/f{i}", b"", None) for i in range(60)])
    for archive in (tgz, zipped):
        with pytest.raises(ArchiveTooLargeError, match="members"):
            extract_archive(archive, tmp_path / "dest", SMALL)
        assert not (tmp_path / "dest").exists()


@pytest.mark.fast
def test_headers_and_data_that_lie_are_refused(tmp_path):
    # A pax header of 20 MiB (tarfile would read it whole into memory) compresses to a few KB.
    big = _info("adapter/x")
    big.pax_headers = {"comment": "z" * (20 << 20)}
    archive = _tar(tmp_path / "pax-bomb.tar.gz", [(big, b"x")])
    with pytest.raises(UnsafeArchiveError, match="header or record"):
        extract_archive(archive, tmp_path / "d1", SMALL)
    # Headers under the per-read limit that still add up past the cap: refused while reading, not after.
    many = []
    for i in range(3):
        info = _info(f"adapter/x{i}")
        info.pax_headers = {"comment": "z" * (10 << 20)}
        many.append((info, b"x"))
    archive = _tar(tmp_path / "pax-many.tar.gz", many)
    with pytest.raises(ArchiveTooLargeError, match="expands beyond the cap"):
        extract_archive(archive, tmp_path / "d1", SMALL)
    # A tar cut short: its last member declares more data than the file holds.
    whole = _tar(tmp_path / "whole.tar", [_file("adapter/a.bin", b"a" * 100_000)], "w")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:50_000])
    whole.unlink()
    with pytest.raises(InputError, match="corrupt|declares"):
        extract_archive(cut, tmp_path / "d1", SMALL)
    # A zip whose central directory declares 10 bytes for a member that inflates to 2 MiB.
    zipped = _zero_bomb_zip(tmp_path / "liar.zip", 2 << 20)
    data = bytearray(zipped.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, 10)
    zipped.write_bytes(bytes(data))
    with pytest.raises(InputError):
        extract_archive(zipped, tmp_path / "d2", SMALL)
    assert _listing(tmp_path) == ["cut.tar", "liar.zip", "pax-bomb.tar.gz", "pax-many.tar.gz"]


@pytest.mark.fast
def test_bytes_are_counted_as_written(tmp_path):
    """The streaming guard itself: a member source that yields more than its header says, and a total past the cap."""
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        writer = _Writer(root, "archive t", ArchiveLimits(max_bytes=3 << 20, max_members=10), "raise the cap")
        with pytest.raises(ArchiveTooLargeError, match="more than the 10 bytes its header declares"):
            writer.write(Member("a", False, 10), io.BytesIO(b"y" * 5000))
        writer.write(Member("b", False, 2 << 20), io.BytesIO(b"y" * (2 << 20)))
        with pytest.raises(ArchiveTooLargeError, match="expands beyond the cap"):
            writer.write(Member("c", False, 2 << 20), io.BytesIO(b"y" * (2 << 20)))
        with pytest.raises(FileExistsError):  # O_EXCL: nothing is ever overwritten
            writer.write(Member("b", False, 1), io.BytesIO(b"z"))
    finally:
        os.close(root)
    assert (tmp_path / "b").read_bytes() == b"y" * (2 << 20)


# --- bundles ------------------------------------------------------------------------------------------

class _Caps:
    def __init__(self, max_bytes: int, max_members: int):
        self.bundle_max_bytes, self.bundle_max_members = max_bytes, max_members


def _bundle(path: Path, extra=(), files=None) -> Path:
    files = files or {"model/model.gguf": b"GGUF" + b"\0" * 1000, "wheelhouse/bankllm-0.1.0-py3-none-any.whl": b"w"}
    manifest = {"schema": SCHEMA, "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
                "python_tag": "cp311", "machine": "x86_64"}
    entries = [(_info(MANIFEST), json.dumps(manifest).encode())] + [(_info(n), d) for n, d in files.items()]
    return _tar(path, entries + list(extra), "w", tarfile.GNU_FORMAT)


def _pinned(bundle: Path) -> dict:
    """The whole-file pin an unsigned bundle needs (the signature checks are tested in test_signing.py)."""
    return {"bundle_sha256": hashlib.sha256(bundle.read_bytes()).hexdigest()}


@pytest.mark.fast
def test_bundle_uses_the_same_extractor(tmp_path):
    ok = _bundle(tmp_path / "ok.tar")
    opened = open_bundle(ok, tmp_path / "ok", **_pinned(ok))
    assert (opened.build_dir / "model.gguf").is_file()
    bad = {
        "symlink": _bundle(tmp_path / "sym.tar", [(_info("model/link", tarfile.SYMTYPE, linkname="/etc/shadow"), None)]),
        "hardlink": _bundle(tmp_path / "hl.tar", [(_info("model/hl", tarfile.LNKTYPE, linkname="model/model.gguf"),
                                                    None)]),
        "dotdot": _bundle(tmp_path / "dd.tar", [_file("model/../../escape")]),
        "too deep": _bundle(tmp_path / "deep.tar", [_file("model/a/b")]),
    }
    for name, bundle in bad.items():
        with pytest.raises(UnsafeArchiveError) as info:
            open_bundle(bundle, tmp_path / "x" / "b", **_pinned(bundle))
        _check_refusal(info.value, bundle)
        assert not (tmp_path / "x").exists() or _listing(tmp_path / "x") == [], name
    with pytest.raises(ArchiveTooLargeError, match="over the cap of 500 bytes") as info:
        ok2 = _bundle(tmp_path / "ok2.tar")
        open_bundle(ok2, tmp_path / "y" / "b", limits=bundle_limits(_Caps(500, 100)), **_pinned(ok2))
    assert "fix: raise bundle_max_bytes" in format_error(info.value)
    with pytest.raises(ArchiveTooLargeError, match="members") as info:
        ok3 = _bundle(tmp_path / "ok3.tar")
        open_bundle(ok3, tmp_path / "y" / "b", limits=bundle_limits(_Caps(1 << 20, 2)), **_pinned(ok3))
    assert "fix: raise bundle_max_members" in format_error(info.value)
    assert _listing(tmp_path / "y") == []


@pytest.mark.fast
def test_install_refuses_a_bundle_with_a_link_in_one_line(tmp_path):
    bundle = _bundle(tmp_path / "sym.tar", [(_info("model/link", tarfile.SYMTYPE, linkname="/etc/shadow"), None)])
    root = tmp_path / "root"
    proc = run_cli("install", "--root", root, "--bundle", bundle, "--bundle-sha256",
                   _pinned(bundle)["bundle_sha256"], timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: bundle") and "symbolic link" in lines[-1] and "-- fix:" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not root.exists() or not any(p.is_file() for p in root.rglob("*"))


# --- URL downloads ------------------------------------------------------------------------------------

def _adapter_tgz(tmp: Path) -> Path:
    return _tar(tmp / "adapter.tar.gz", [_file("adapter/adapter_config.json", b'{"peft_type": "LORA", "r": 8}'),
                                        _file("adapter/adapter_model.safetensors", b"\0" * 64)])


class _Server:
    """A real HTTP server on loopback with routes for redirects, big bodies and a trickle."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        self.root = root
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                base = f"http://127.0.0.1:{outer.port}"
                redirects = {"/same": "/adapter.tar.gz", "/same-abs": f"{base}/adapter.tar.gz",
                             "/other-host": f"http://localhost:{outer.port}/adapter.tar.gz",
                             "/other-port": f"http://127.0.0.1:{outer.port + 1}/adapter.tar.gz",
                             "/to-https": f"https://127.0.0.1:{outer.port}/adapter.tar.gz",
                             "/ftp": "ftp://127.0.0.1/adapter.tar.gz", "/file": "file:///etc/passwd",
                             "/loop": "/loop"}
                name = self.path.split("?")[0].rsplit("/", 1)[0] or self.path.split("?")[0]
                if name in redirects:
                    self.send_response(302)
                    self.send_header("Location", redirects[name])
                    self.end_headers()
                    return
                if self.path.startswith("/big"):  # 64 MiB, announced or not
                    self.send_response(200)
                    if self.path.startswith("/big-length"):
                        self.send_header("Content-Length", str(64 << 20))
                    self.end_headers()
                    try:
                        for _ in range(64):
                            self.wfile.write(b"\0" * (1 << 20))
                    except OSError:
                        pass
                    return
                if self.path.startswith("/slow-headers"):  # the status line only after 10 s
                    time.sleep(10)
                    return
                if self.path.startswith("/trickle"):
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:
                        pass
                    return
                path = outer.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    _adapter_tgz(root)
    srv = _Server(root)
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _no_leftovers(cache: Path) -> None:
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == [], leftovers


@pytest.mark.fast
def test_url_needs_a_pin_and_same_origin_redirects(server, tmp_path):
    digest = sha256_file(server.root / "adapter.tar.gz")
    cache = tmp_path / "cache"
    got = resolve_adapter(server.url("/adapter.tar.gz"), digest, cache)
    assert got.kind == "url" and got.pin_sha256 == digest and json.loads((got.path / "adapter_config.json").read_text())
    assert resolve_adapter(server.url("/same/x.tar.gz"), digest, tmp_path / "c2").sha256 == digest
    assert resolve_adapter(server.url("/same-abs/x.tar.gz"), digest, tmp_path / "c3").sha256 == digest

    before = len(server.requests)
    with pytest.raises(ChecksumError, match="has no --adapter-sha256") as info:
        resolve_adapter(server.url("/adapter.tar.gz"), None, tmp_path / "c4")
    assert "pass --adapter-sha256" in format_error(info.value)
    assert len(server.requests) == before, "nothing is fetched without a pin"
    for route, why in [("/other-host", "leaves http://127.0.0.1"), ("/other-port", "leaves"),
                       ("/to-https", "leaves"), ("/ftp", "leaves"), ("/file", "leaves"),
                       ("/loop", "more than 5 redirects")]:
        with pytest.raises(FetchError, match=why) as info:
            resolve_adapter(server.url(f"{route}/a.tar.gz"), digest, tmp_path / "c5")
        assert "\n" not in info.value.message and info.value.fix
    assert not any(r.startswith("/adapter") for r in server.requests[before:]), "no cross-origin request followed"
    for scheme_url in ("ftp://127.0.0.1/a.tar.gz", "file:///etc/a.tar.gz"):
        with pytest.raises(InputError, match="not http"):
            resolve_adapter(scheme_url, digest, tmp_path / "c5")
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64}, got {digest}") as info:
        resolve_adapter(server.url("/adapter.tar.gz"), "0" * 64, tmp_path / "c6")
    assert f"--adapter-sha256 {digest}" in format_error(info.value), "the actual digest is printed to pin"
    for cache_dir in ("c4", "c5", "c6"):
        _no_leftovers(tmp_path / cache_dir)
    before = len(server.requests)
    assert resolve_adapter(server.url("/adapter.tar.gz"), digest, cache).sha256 == digest
    assert len(server.requests) == before, "a verified download is reused, not fetched again"


@pytest.mark.fast
def test_url_size_cap_and_overall_deadline(server, tmp_path):
    pin = "a" * 64
    for route in ("/big-length/a.tar.gz", "/big/a.tar.gz"):
        started = time.monotonic()
        with pytest.raises(FetchError, match="cap of 1,048,576 bytes"):
            resolve_adapter(server.url(route), pin, tmp_path / "c", max_download_bytes=1 << 20)
        assert time.monotonic() - started < 10
    started = time.monotonic()
    with pytest.raises(FetchError, match="did not finish within 1 s") as info:
        resolve_adapter(server.url("/trickle/a.tar.gz"), pin, tmp_path / "c", timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.5, f"refused after {elapsed:.1f} s, not at the 1 s deadline"  # the body takes 10 s
    assert "fetch_timeout_s" in format_error(info.value)
    started = time.monotonic()
    with pytest.raises(FetchError, match="did not finish within 1 s"):
        resolve_adapter(server.url("/slow-headers/a.tar.gz"), pin, tmp_path / "c", timeout_s=1.0)
    assert time.monotonic() - started < 2.5
    _no_leftovers(tmp_path / "c")


def test_cli_refuses_an_unpinned_url_in_one_line(server, base_dir, tmp_path):
    env = dict(os.environ, BANKLLM_DATA_DIR=str(tmp_path / "data"))
    proc = run_cli("build", "--base", base_dir, "--adapter", server.url("/adapter.tar.gz"), "--out", tmp_path / "out",
                   env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no --adapter-sha256" in errors[0] and "-- fix:" in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path / "data" / "cache")


# --- directory pins -----------------------------------------------------------------------------------

def _adapter_dir(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(256))
    (path / "labels.json").write_text(json.dumps(["card_arrival", "top_up"]))
    (path / "bankllm-task.json").write_text(json.dumps({"system_prompt": "Classify.", "labels": "labels.json"}))
    (path / "validation.csv").write_text("text,category\nwhere is my card,card_arrival\n")
    (path / "sub" / "notes.txt").write_text("n")
    (path / "a.txt").write_text("sorted before a/ as text, after it as path parts")
    return path


@pytest.mark.fast
def test_directory_pin_covers_every_file(tmp_path):
    adapter = _adapter_dir(tmp_path / "adapter")
    digest = directory_digest(adapter)
    shell = subprocess.run(
        ["bash", "-c", "find . -type f -printf '%P\\0' | LC_ALL=C sort -z | while IFS= read -r -d '' f; do "
                       "printf '%s\\0%s\\n' \"$f\" \"$(sha256sum < \"$f\" | cut -c1-64)\"; done | sha256sum"],
        cwd=adapter, capture_output=True, text=True, check=True).stdout.split()[0]
    assert digest == shell, "the documented shell recipe gives the same digest"
    got = resolve_adapter(str(adapter), digest, tmp_path / "cache")
    assert got.kind == "dir" and got.pin_sha256 == digest
    assert resolve_adapter(str(adapter), None, tmp_path / "cache").pin_sha256 == digest  # a local dir may go unpinned

    weights_only = sha256_file(adapter / "adapter_model.safetensors")
    with pytest.raises(ChecksumError, match="alone, which leaves the config and labels unpinned"):
        resolve_adapter(str(adapter), weights_only, tmp_path / "cache")
    for name, text in [("labels.json", '["card_arrival", "refund"]'), ("adapter_config.json", '{"peft_type": "LORA"}'),
                       ("bankllm-task.json", '{"system_prompt": "Obey."}'), ("validation.csv", "text,category\n"),
                       ("sub/notes.txt", "changed")]:
        original = (adapter / name).read_text()
        (adapter / name).write_text(text)
        changed = directory_digest(adapter)
        with pytest.raises(ChecksumError) as info:
            resolve_adapter(str(adapter), digest, tmp_path / "cache")
        line = format_error(info.value)
        assert f"expected manifest digest {digest}, got {changed}" in line and f"--adapter-sha256 {changed}" in line
        (adapter / name).write_text(original)
    (adapter / "extra.bin").write_bytes(b"new file")
    with pytest.raises(ChecksumError):
        resolve_adapter(str(adapter), digest, tmp_path / "cache")
    (adapter / "extra.bin").unlink()
    (adapter / "link.json").symlink_to(adapter / "labels.json")
    with pytest.raises(InputError, match="symbolic link 'link.json'"):
        resolve_adapter(str(adapter), digest, tmp_path / "cache")


@pytest.mark.fast
def test_shipped_adapter_resolves_unpinned_and_pinned(tmp_path):
    from appliance.resources import default_adapter_dir

    shipped = default_adapter_dir()
    assert shipped is not None
    digest = resolve_adapter(str(shipped), None, tmp_path).pin_sha256
    assert resolve_adapter(str(shipped), digest, tmp_path).sha256 == sha256_file(shipped / "adapter_model.safetensors")


@pytest.mark.fast
def test_archive_pin_and_cached_unpacking(tmp_path):
    archive = _adapter_tgz(tmp_path)
    digest = sha256_file(archive)
    cache = tmp_path / "cache"
    first = resolve_adapter(str(archive), digest, cache)
    assert first.pin_sha256 == digest and first.path.name == "adapter"
    (first.path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64}')  # tampered cache
    again = resolve_adapter(str(archive), digest, cache)
    assert again.config["r"] == 8, "a cached unpacking that changed is unpacked again"
    with pytest.raises(ChecksumError, match=f"got {digest}"):
        resolve_adapter(str(archive), "b" * 64, tmp_path / "c2")
    assert not (tmp_path / "c2").exists()
    bomb = _zero_bomb_tar(tmp_path / "bomb.tar.gz", 16 << 20)
    with pytest.raises(ArchiveTooLargeError, match="over the cap of 1,048,576 bytes") as info:
        resolve_adapter(str(bomb), None, tmp_path / "c3", limits=adapter_limits(Settings.load(
            env={"BANKLLM_ADAPTER_ARCHIVE_MAX_BYTES": str(1 << 20)})))
    assert "fix: raise adapter_archive_max_bytes" in format_error(info.value)
    _no_leftovers(tmp_path / "c3")


@pytest.mark.fast
def test_settings_for_limits_are_validated():
    settings = Settings.load(env={"BANKLLM_ADAPTER_ARCHIVE_MAX_BYTES": "1000", "BANKLLM_BUNDLE_MAX_MEMBERS": "7"})
    assert settings.adapter_archive_max_bytes == 1000 and settings.bundle_max_members == 7
    with pytest.raises(ConfigError, match="fetch_max_bytes=0 must be positive"):
        Settings.load(env={"BANKLLM_FETCH_MAX_BYTES": "0"})

