"""Signed bundles and build directories (issue 11, finding 4): keys, signatures, the bundle's trust decision before
anything is unpacked, and `bankllm serve` refusing a build that changed since it was signed. Fast: no model, no venv."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from appliance import signing
from appliance.artifacts import ANSWERS_FILE, LABELS_FILE, MODEL_FILE, MODELFILE_FILE, REPORT_FILE, SIGNATURE_FILE, \
    TASK_FILE
from appliance.errors import BankllmError, ChecksumError, InputError, SignatureError
from appliance.fsutil import sha256_file
from appliance.install.bundle import MANIFEST, MANIFEST_SIG, authenticate_bundle, make_bundle, open_bundle
from appliance.install.installer import install
from appliance.install.layout import system_layout
from appliance.settings import Settings
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.fast
PYTHON = Path("/usr/bin/python3")
LABELS = json.loads((REPO / "build" / "default" / "labels.json").read_text())


# --- fixtures: a key pair, a small build directory, a wheelhouse of stand-in wheels ------------------------------

@pytest.fixture
def keys(tmp_path):
    return signing.generate_keys(tmp_path / "keys")


@pytest.fixture
def other_keys(tmp_path):
    return signing.generate_keys(tmp_path / "other-keys")


def make_build(dest: Path) -> Path:
    """A build directory with every kind of file a real one has (the model is a stand-in: only its magic is read)."""
    dest.mkdir(parents=True)
    (dest / MODEL_FILE).write_bytes(b"GGUF" + os.urandom(4096))
    (dest / MODELFILE_FILE).write_text("FROM ./model.gguf\nPARAMETER temperature 0\n")
    (dest / LABELS_FILE).write_text(json.dumps(LABELS))
    (dest / TASK_FILE).write_text(json.dumps({"system_prompt": "Classify the banking intent.", "labels": LABELS_FILE,
                                              "threshold": 0.9}))
    shutil.copyfile(REPO / "build" / "default" / "answers.toml", dest / ANSWERS_FILE)
    (dest / REPORT_FILE).write_text(json.dumps({
        "schema": 1, "build_id": "signed-build", "inputs_digest": "x", "base": {}, "adapter": {}, "steps": [],
        "gate": {}, "versions": {}, "verdict": "ship", "chosen": {"quant": "Q4_1", "ppl_increase": 0.0}}))
    return dest


@pytest.fixture
def build(tmp_path):
    return make_build(tmp_path / "build")


@pytest.fixture
def wheels(tmp_path):
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "bankllm-0.1.0-py3-none-any.whl").write_bytes(b"PK the real installer" + os.urandom(256))
    (dest / "dep-1.0-py3-none-any.whl").write_bytes(b"PK a dependency" + os.urandom(256))
    return dest


def tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            m = tarfile.TarInfo(m.name) if not isinstance(m, tarfile.TarInfo) else m
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return path


def swap_wheel(bundle: Path, out: Path, *, drop_sig: bool = False, resign_with=None, sig_doc=None) -> Path:
    """The attack of finding 4: replace the bankllm wheel and update its hash in manifest.json."""
    evil = b"PK evil installer that runs as root"
    members, manifest = [], None
    for m, data in tar_members(bundle):
        if m.name.startswith("wheelhouse/bankllm-"):
            data = evil
        members.append((m, data))
    for i, (m, data) in enumerate(members):
        if m.name == MANIFEST:
            manifest = json.loads(data)
            wheel = next(n for n in manifest["files"] if n.startswith("wheelhouse/bankllm-"))
            manifest["files"][wheel] = hashlib.sha256(evil).hexdigest()
            members[i] = (m, signing.canonical_json(manifest))
    new_manifest = signing.canonical_json(manifest)
    out_members = []
    for m, data in members:
        if m.name == MANIFEST_SIG:
            if drop_sig:
                continue
            if resign_with is not None:
                data = signing.sign_bundle_manifest(resign_with, new_manifest)
            if sig_doc is not None:
                data = json.dumps(sig_doc(new_manifest)).encode()
        out_members.append((m, data))
    return write_tar(out, out_members)


# --- keys -----------------------------------------------------------------------------------------------------------

def test_keygen_writes_a_private_key_0600_and_never_overwrites(tmp_path, keys):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    key = signing.load_private_key(private)
    assert signing.key_id(key.public_key()) == signing.key_id(signing.load_public_key(public))
    before = private.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        signing.generate_keys(private.parent)
    assert private.read_bytes() == before and sorted(p.name for p in private.parent.iterdir()) == sorted(
        [signing.PRIVATE_KEY_FILE, signing.PUBLIC_KEY_FILE])  # no temp file left behind
    # The CLI: one line per key, and a refusal as one line.
    proc = run_cli("sign", "keygen", "--out", tmp_path / "cli-keys")
    assert proc.returncode == 0, proc.stderr
    assert "0600" in proc.stdout and signing.key_id(signing.load_public_key(tmp_path / "cli-keys" / signing.PUBLIC_KEY_FILE)) \
        in proc.stdout
    again = run_cli("sign", "keygen", "--out", tmp_path / "cli-keys")
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_keys_are_checked_for_kind_and_permissions(tmp_path, keys):
    private, public = keys
    with pytest.raises(InputError, match="is a private key"):
        signing.load_public_key(private)
    with pytest.raises(InputError, match="not a private key"):
        signing.load_private_key(public)
    loose = tmp_path / "loose.key"
    shutil.copyfile(private, loose)
    os.chmod(loose, 0o644)
    with pytest.raises(InputError, match="can be read by other users"):
        signing.load_private_key(loose)
    # The raw 32-byte form of the public key is accepted too.
    raw = tmp_path / "raw.pub"
    from cryptography.hazmat.primitives import serialization

    raw.write_bytes(signing.load_public_key(public).public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw))
    assert signing.key_id(signing.load_public_key(raw)) == signing.key_id(signing.load_public_key(public))
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(InputError, match="cannot be loaded"):
        signing.load_public_key(tmp_path / "junk.pub")


# --- signatures over bytes ------------------------------------------------------------------------------------------

def test_round_trip_tamper_wrong_key_and_context_replay(keys, other_keys):
    key, pub = signing.load_private_key(keys[0]), signing.load_public_key(keys[1])
    payload = signing.canonical_json({"files": {"a": "1" * 64}})
    doc = signing.signature_document(key, signing.BUNDLE_CONTEXT, payload)
    signing.verify_document(pub, signing.BUNDLE_CONTEXT, payload, doc, "x")
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify_document(pub, signing.BUNDLE_CONTEXT, payload.replace(b"1", b"2", 1), doc, "x")
    with pytest.raises(SignatureError, match="not the trusted key"):
        signing.verify_document(signing.load_public_key(other_keys[1]), signing.BUNDLE_CONTEXT, payload, doc, "x")
    # A key id rewritten to the trusted one does not help a signature by another key.
    forged = signing.signature_document(signing.load_private_key(other_keys[0]), signing.BUNDLE_CONTEXT, payload)
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify_document(pub, signing.BUNDLE_CONTEXT, payload, {**forged, "key_id": doc["key_id"]}, "x")
    # A build signature is never a bundle signature, whether its label is left alone or rewritten.
    build_doc = signing.signature_document(key, signing.BUILD_CONTEXT, payload)
    with pytest.raises(SignatureError, match="made for 'bankllm-build-v1'"):
        signing.verify_document(pub, signing.BUNDLE_CONTEXT, payload, build_doc, "x")
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify_document(pub, signing.BUNDLE_CONTEXT, payload, {**build_doc, "context": "bankllm-bundle-v1"}, "x")
    # And the signature is plain ed25519 over context NUL payload: OpenSSL verifies it without bankllm.
    assert base64.b64decode(doc["signature"]) and len(base64.b64decode(doc["signature"])) == 64


def test_openssl_verifies_a_bundle_signature_without_bankllm(tmp_path, keys):
    """The operator can check a bundle before bootstrapping bankllm from it (the recipe `bankllm bundle` prints)."""
    payload = signing.canonical_json({"schema": "x"})
    doc = json.loads(signing.sign_bundle_manifest(signing.load_private_key(keys[0]), payload))
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(doc["signature"]))
    (tmp_path / "signed.bin").write_bytes(b"bankllm-bundle-v1\0" + payload)
    cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(keys[1]), "-rawin", "-in",
           str(tmp_path / "signed.bin"), "-sigfile", str(tmp_path / "sig.bin")]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    (tmp_path / "signed.bin").write_bytes(b"bankllm-build-v1\0" + payload)
    assert subprocess.run(cmd, capture_output=True).returncode != 0


# --- build directories ----------------------------------------------------------------------------------------------

def test_build_signature_round_trip_and_cli(build, keys):
    path = signing.sign_build(build, signing.load_private_key(keys[0]))
    assert path == build / SIGNATURE_FILE
    manifest = signing.verify_build(build, signing.load_public_key(keys[1]))
    assert sorted(manifest["files"]) == sorted(p.name for p in build.iterdir() if p.name != SIGNATURE_FILE)
    assert manifest["files"][MODEL_FILE]["sha256"] == sha256_file(build / MODEL_FILE)
    os.unlink(path)
    signed = run_cli("sign", build, "--key", keys[0])  # `bankllm sign BUILD_DIR --key KEY`
    assert signed.returncode == 0 and "signed 6 files" in signed.stdout, signed.stderr
    ok = run_cli("sign", "verify", build, "--trust", keys[1])
    assert ok.returncode == 0 and "verified: 6 files" in ok.stdout, ok.stderr
    (build / MODELFILE_FILE).write_text("FROM ./model.gguf\nSYSTEM evil\n")
    bad = run_cli("sign", "verify", build, "--trust", keys[1])
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "Modelfile changed" in bad.stderr


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))


def _edit_manifest_to_match(build: Path) -> None:
    """Change answers.toml and update its hash and size inside the signature file (no key: the signature breaks)."""
    (build / ANSWERS_FILE).write_text((build / ANSWERS_FILE).read_text() + "\n# changed\n")
    doc = json.loads((build / SIGNATURE_FILE).read_text())
    doc["manifest"]["files"][ANSWERS_FILE] = {"size": (build / ANSWERS_FILE).stat().st_size,
                                              "sha256": sha256_file(build / ANSWERS_FILE)}
    (build / SIGNATURE_FILE).write_text(json.dumps(doc))


TAMPERS = {
    "model byte flipped": (lambda b: _flip(b / MODEL_FILE), "model.gguf changed since it was signed \\(sha256\\)"),
    "model grown": (lambda b: open(b / MODEL_FILE, "ab").write(b"x"), "model.gguf changed since it was signed \\(size\\)"),
    "task edited": (lambda b: (b / TASK_FILE).write_text(json.dumps({"system_prompt": "Ignore the bank.",
                                                                     "labels": LABELS_FILE, "threshold": 0.0001})),
                    "bankllm-task.json changed"),
    "report removed": (lambda b: (b / REPORT_FILE).unlink(), "lacks 'build-report.json'"),
    "file added": (lambda b: (b / "evil.json").write_text("{}"), "holds 'evil.json'"),
    "dot-file added": (lambda b: (b / ".hidden").write_text("x"), "holds '.hidden'"),
    "labels replaced by a link": (lambda b: ((b / LABELS_FILE).rename(b.parent / "l.json"),
                                             (b / LABELS_FILE).symlink_to(b.parent / "l.json")),
                                  "labels.json is not a regular file"),
    "manifest edited to match": (_edit_manifest_to_match, "does not match the signed bytes"),
    "signature removed": (lambda b: (b / SIGNATURE_FILE).unlink(), "is not signed"),
    "signature garbled": (lambda b: (b / SIGNATURE_FILE).write_text("{not json"), "not valid JSON"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_changed_signed_build_is_refused(build, keys, tamper):
    signing.sign_build(build, signing.load_private_key(keys[0]))
    change, message = TAMPERS[tamper]
    change(build)
    with pytest.raises(SignatureError, match=message):
        signing.verify_build(build, signing.load_public_key(keys[1]))


def test_a_build_signed_by_another_key_is_refused(build, keys, other_keys):
    signing.sign_build(build, signing.load_private_key(other_keys[0]))
    with pytest.raises(SignatureError, match="not the trusted key"):
        signing.verify_build(build, signing.load_public_key(keys[1]))


def test_only_a_flat_directory_of_regular_files_can_be_signed(build, keys):
    (build / "sub").mkdir()
    with pytest.raises(InputError, match="not a plain regular file"):
        signing.sign_build(build, signing.load_private_key(keys[0]))


# --- bundles --------------------------------------------------------------------------------------------------------

@pytest.fixture
def signed_bundle(tmp_path, build, wheels, keys):
    out = tmp_path / "signed.tar"
    make_bundle(out, build, wheels, PYTHON, sign_key=keys[0])
    return out


@pytest.fixture
def unsigned_bundle(tmp_path, build, wheels):
    out = tmp_path / "unsigned.tar"
    make_bundle(out, build, wheels, PYTHON)
    return out


def test_signed_bundle_opens_under_trust_and_carries_a_signed_build(tmp_path, signed_bundle, build, keys):
    names = [m.name for m, _ in tar_members(signed_bundle)]
    assert names[:2] == [MANIFEST, MANIFEST_SIG] and f"model/{SIGNATURE_FILE}" in names
    assert not (build / SIGNATURE_FILE).exists()  # the build directory itself is not written to
    opened = open_bundle(signed_bundle, tmp_path / "out", python=PYTHON, trust=keys[1])
    assert (opened.wheelhouse / "bankllm-0.1.0-py3-none-any.whl").is_file()
    signing.verify_build(opened.build_dir, signing.load_public_key(keys[1]))


@pytest.mark.parametrize("attack", ["hash updated", "signature dropped", "re-signed by another key",
                                    "build signature replayed", "build signature relabelled"])
def test_swapped_wheel_with_updated_manifest_is_refused_under_trust(tmp_path, signed_bundle, keys, other_keys,
                                                                     attack):
    key = signing.load_private_key(keys[0])
    kwargs = {"hash updated": {}, "signature dropped": {"drop_sig": True},
              "re-signed by another key": {"resign_with": signing.load_private_key(other_keys[0])},
              # What a signer's build signature (same key, other context) would give the attacker: nothing.
              "build signature replayed": {"sig_doc": lambda m: signing.signature_document(key, signing.BUILD_CONTEXT, m)},
              "build signature relabelled": {"sig_doc": lambda m: {
                  **signing.signature_document(key, signing.BUILD_CONTEXT, m), "context": signing.BUNDLE_CONTEXT}},
              }[attack]
    evil = swap_wheel(signed_bundle, tmp_path / "evil.tar", **kwargs)
    with pytest.raises(SignatureError):
        open_bundle(evil, tmp_path / "out", trust=keys[1])
    assert not (tmp_path / "out").exists()  # refused before anything was unpacked


def test_a_second_manifest_appended_is_refused(tmp_path, signed_bundle, keys):
    members = tar_members(signed_bundle)
    manifest = json.loads(members[0][1])
    manifest["files"]["wheelhouse/extra-1.0-py3-none-any.whl"] = "0" * 64
    members.append((tarfile.TarInfo("./manifest.json"), signing.canonical_json(manifest)))
    evil = write_tar(tmp_path / "evil.tar", members)
    with pytest.raises(ChecksumError, match="two entries named 'manifest.json'"):
        open_bundle(evil, tmp_path / "out", trust=keys[1])
    assert not (tmp_path / "out").exists()


def test_unsigned_bundle_needs_its_sha256(tmp_path, unsigned_bundle, keys):
    with pytest.raises(SignatureError, match="needs --trust PUBKEY or --bundle-sha256 HEX"):
        open_bundle(unsigned_bundle, tmp_path / "out")
    with pytest.raises(ChecksumError, match="not the 0000"):
        open_bundle(unsigned_bundle, tmp_path / "out", bundle_sha256="0" * 64)
    with pytest.raises(InputError, match="not a sha256"):
        open_bundle(unsigned_bundle, tmp_path / "out", bundle_sha256="abc")
    with pytest.raises(SignatureError, match="is not signed"):
        open_bundle(unsigned_bundle, tmp_path / "out", trust=keys[1])
    assert not (tmp_path / "out").exists()
    opened = open_bundle(unsigned_bundle, tmp_path / "out", bundle_sha256=sha256_file(unsigned_bundle).upper())
    assert (opened.build_dir / MODEL_FILE).is_file()
    # The swapped wheel: its own sha256 is not the one the operator was given.
    evil = swap_wheel(unsigned_bundle, tmp_path / "evil.tar")
    with pytest.raises(ChecksumError, match="has sha256"):
        authenticate_bundle(evil, bundle_sha256=sha256_file(unsigned_bundle))


def test_install_refuses_before_writing_anything(tmp_path, signed_bundle, unsigned_bundle, keys):
    settings = Settings.load(env={}, install_python=PYTHON)
    target = system_layout(tmp_path / "root")
    evil = swap_wheel(signed_bundle, tmp_path / "evil.tar")
    scratch = set(Path("/var/tmp").glob(f"bankllm-install-{os.getpid()}-*"))
    for kwargs, message in [({"bundle": evil, "trust": keys[1]}, "does not match the signed bytes"),
                            ({"bundle": unsigned_bundle}, "--bundle-sha256"),
                            ({"bundle": unsigned_bundle, "bundle_sha256": "f" * 64}, "has sha256")]:
        with pytest.raises(BankllmError, match=message):
            install(settings, target, log=lambda m: None, **kwargs)
        assert not (tmp_path / "root").exists()
    assert set(Path("/var/tmp").glob(f"bankllm-install-{os.getpid()}-*")) == scratch  # scratch removed too
    # The CLI: one line naming both options, nothing written.
    proc = run_cli("install", "--root", tmp_path / "root", "--bundle", unsigned_bundle)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--trust" in proc.stderr and "--bundle-sha256" in proc.stderr
    proc = run_cli("install", "--root", tmp_path / "root", "--bundle", evil, "--trust", keys[1])
    assert proc.returncode != 0 and "signature" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "root").exists()


def test_install_with_trust_refuses_an_unsigned_or_changed_build(tmp_path, build, wheels, keys):
    """`--trust` with a build directory (or a trust_key already configured): verified before anything is written."""
    target = system_layout(tmp_path / "root")
    settings = Settings.load(env={}, install_python=PYTHON)
    with pytest.raises(SignatureError, match="is not signed"):
        install(settings, target, build_dir=build, wheelhouse=wheels, trust=keys[1], log=lambda m: None)
    signing.sign_build(build, signing.load_private_key(keys[0]))
    _flip(build / MODEL_FILE)
    configured = Settings.load(env={}, install_python=PYTHON, trust_key=keys[1])
    with pytest.raises(SignatureError, match="model.gguf changed"):
        install(configured, target, build_dir=build, wheelhouse=wheels, log=lambda m: None)
    assert not (tmp_path / "root").exists()


# --- serve ----------------------------------------------------------------------------------------------------------

def _service(build: Path, pub: Path):
    from appliance.service.app import create_app
    from appliance.service.engine.fake import FakeEngine

    settings = Settings.load(env={}, model=build, require_keys=False, trust_key=pub)
    return create_app(settings, engine_factory=lambda _s, _g: FakeEngine(n_slots=2))


def test_serve_verifies_the_build_at_start(tmp_path, build, keys):
    from litestar.testing import TestClient

    signing.sign_build(build, signing.load_private_key(keys[0]))
    with TestClient(_service(build, keys[1])) as client:
        assert client.get("/health").status_code == 200
    (build / ANSWERS_FILE).write_text((build / ANSWERS_FILE).read_text().replace("card", "crad", 1))
    with pytest.raises(SignatureError, match="answers.toml changed"):
        _service(build, keys[1])
    # `bankllm serve` itself: one line, non-zero, before any model is loaded or port bound.
    env = {**os.environ, "BANKLLM_TRUST_KEY": str(keys[1]), "BANKLLM_REQUIRE_KEYS": "false"}
    proc = run_cli("serve", "--model", build, "--port", "1", env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "answers.toml changed since it was signed" in proc.stderr
    # A bare .gguf cannot carry a signature: refused while trust_key is set.
    proc = run_cli("serve", "--model", build / MODEL_FILE, "--port", "1", env=env, timeout=120)
    assert proc.returncode == 2 and "not a build directory" in proc.stderr, proc.stderr


# --- bootstrapping the installer from the bundle (before bankllm exists on the server) ------------------------------

def _run_checks(lines: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script = "set -e\n" + "\n".join(lines[:-2])  # every check; not the pip install and the install themselves
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})


def test_bootstrap_lines_check_the_wheelhouse_before_pip_sees_it(tmp_path, signed_bundle, unsigned_bundle, keys):
    from appliance.install.bundle import bootstrap_lines

    def site(name: str, bundle: Path) -> Path:
        d = tmp_path / name
        d.mkdir()
        shutil.copyfile(bundle, d / "b.tar")
        shutil.copyfile(keys[1], d / "bankllm-signing.pub")
        return d

    signed = bootstrap_lines("b.tar", sha256_file(signed_bundle), signed=True)
    assert signed[-1] == "sudo boot/venv/bin/bankllm install --bundle b.tar --trust bankllm-signing.pub"
    ok = _run_checks(signed, site("ok", signed_bundle))
    assert ok.returncode == 0 and "wheelhouse matches manifest.json" in ok.stdout, ok.stderr
    evil = _run_checks(signed, site("evil", swap_wheel(signed_bundle, tmp_path / "evil.tar")))
    assert evil.returncode != 0 and "wheelhouse matches" not in evil.stdout
    # A wheel added beside the listed ones (pip would pick the highest version): refused here and by the installer.
    members = tar_members(signed_bundle) + [(tarfile.TarInfo("wheelhouse/bankllm-9.9-py3-none-any.whl"), b"PK evil")]
    extra = write_tar(tmp_path / "extra.tar", members)
    added = _run_checks(signed, site("extra", extra))
    assert added.returncode != 0 and "wheelhouse differs from manifest.json" in added.stderr
    with pytest.raises(ChecksumError, match="missing or extra"):
        open_bundle(extra, tmp_path / "out", trust=keys[1])

    unsigned = bootstrap_lines("b.tar", sha256_file(unsigned_bundle), signed=False)
    assert unsigned[-1].endswith(f"--bundle-sha256 {sha256_file(unsigned_bundle)}")
    assert _run_checks(unsigned, site("plain", unsigned_bundle)).returncode == 0
    swapped = site("plain-evil", swap_wheel(unsigned_bundle, tmp_path / "evil2.tar"))
    assert _run_checks(unsigned, swapped).returncode != 0 and not (swapped / "boot").exists()


def test_the_store_copies_a_build_again_once_it_is_signed(tmp_path, build, keys):
    """The installer's copy of a build carries its signature: a build signed after it was installed is copied again."""
    from appliance.install.store import store_build

    lay = system_layout(tmp_path / "root")
    assert store_build(lay, build, "b1") and not store_build(lay, build, "b1")
    signing.sign_build(build, signing.load_private_key(keys[0]))
    assert store_build(lay, build, "b1")
    stored = lay.host(lay.models_dir) / "b1"
    assert signing.verify_build(stored, signing.load_public_key(keys[1]))["files"].keys() == \
        {p.name for p in build.iterdir() if p.name != SIGNATURE_FILE}


def test_build_and_bundle_refuse_a_bad_signing_key_before_any_work(tmp_path, keys):
    for cmd in (["build", "--sign", tmp_path / "missing.key", "--out", tmp_path / "b"],
                ["bundle", "--sign", keys[1], "--out", tmp_path / "b.tar"]):
        proc = run_cli(*cmd, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert ("does not exist" in proc.stderr) if cmd[0] == "build" else ("not a private key" in proc.stderr)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.tar").exists()
