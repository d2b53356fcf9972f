"""The rendered unit: round trip, hardening directives, `systemd-analyze verify` and the exposure score."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import ConfigError
from appliance.install import systemd as sd
from appliance.install.layout import system_layout

EXPOSURE_TARGET = 1.5


def _render(**kw) -> str:
    lay = system_layout()
    args = dict(exec_start=[lay.bankllm_exe, "serve", "--config", lay.config_file], keys_file=lay.keys_file,
                port=8080, allowed_networks=["127.0.0.0/8", "::1/128", "10.20.0.0/16"])
    args.update(kw)
    return sd.render_unit(**args)


def _staged_root(tmp_path: Path, text: str, name: str = sd.UNIT_NAME) -> Path:
    """A root holding the unit and an executable at ExecStart's path (verify checks it exists)."""
    lay = system_layout(tmp_path)
    exe = lay.host(lay.bankllm_exe)
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = lay.host(lay.unit_dir) / name
    unit.parent.mkdir(parents=True)
    unit.write_text(text)
    return unit


def test_render_parse_round_trip():
    text = _render()
    unit = sd.parse_unit(text)
    svc = unit["Service"]
    assert svc["ExecStart"] == ["/opt/bankllm/venv/bin/bankllm serve --config /etc/bankllm/bankllm.toml"]
    assert svc["LoadCredential"] == ["api-keys:/etc/bankllm/credentials/api-keys"]
    assert svc["IPAddressDeny"] == ["any"]
    # Loopback is always allowed (installer and status probe /ready); loopback CIDRs are folded into it.
    assert svc["IPAddressAllow"] == ["localhost 10.20.0.0/16"]
    assert svc["SocketBindAllow"] == ["tcp:8080"]
    assert svc["SystemCallFilter"] == ["@system-service", "~@privileged"]
    for key, value in {"DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "PrivateDevices": "yes", "PrivateUsers": "yes", "NoNewPrivileges": "yes",
                       "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes", "Restart": "on-failure"}.items():
        assert svc[key] == [value], key
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert "@" not in "".join(line for line in text.splitlines() if not line.startswith("#")).replace("~@", "").replace("=@", "")
    # Rendering is deterministic: the same inputs give the same bytes (the installer relies on it for idempotence).
    assert _render() == text


def test_bad_network_and_privileged_port_are_refused():
    with pytest.raises(ConfigError, match="not an IP network"):
        _render(allowed_networks=["10.0.0.0/33"])
    with pytest.raises(ConfigError, match="privileged"):
        _render(port=443)
    with pytest.raises(ConfigError, match="newline"):
        _render(keys_file=Path("/etc/x\nExecStartPre=/bin/sh"))


def test_systemd_analyze_verify_is_clean(tmp_path):
    unit = _staged_root(tmp_path, _render())
    assert sd.verify_unit(unit, root=tmp_path) == []


def test_user_unit_verifies(tmp_path):
    text = _render(user=True)
    assert "DynamicUser" not in text and "WantedBy=default.target" in text and "ProtectHome=read-only" in text
    # A user manager has no BPF filters: the socket and IP filter lines are left out, everything else stays.
    assert not any(k in text for k in ("IPAddressDeny", "IPAddressAllow", "SocketBindDeny", "SocketBindAllow"))
    assert "@" not in "".join(l for l in text.splitlines() if not l.startswith("#")).replace("~@", "").replace("=@", "")
    unit = _staged_root(tmp_path, text)
    assert sd.verify_unit(unit, root=tmp_path) == []


def test_verify_catches_a_broken_unit(tmp_path):
    unit = _staged_root(tmp_path, _render().replace("ProtectSystem=strict", "ProtectSystem=sometimes"))
    complaints = sd.verify_unit(unit, root=tmp_path)
    assert any("sometimes" in line for line in complaints), complaints
    (tmp_path / "opt/bankllm/venv/bin/bankllm").unlink()
    unit.write_text(_render())
    assert any("bankllm" in line and "executable" in line.lower() for line in sd.verify_unit(unit, root=tmp_path))


def test_exposure_within_target(tmp_path):
    unit = tmp_path / sd.UNIT_NAME
    unit.write_text(_render())
    exposure, report = sd.security_exposure(unit)
    print(f"systemd-analyze security --offline=yes exposure: {exposure}")
    assert exposure <= EXPOSURE_TARGET, report
