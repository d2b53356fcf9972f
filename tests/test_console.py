"""Library output inside a capture goes to the log, not the terminal; bankllm's own lines go to both;
BANKLLM_DEBUG=1 also shows the library output live. Fast: a child process, no model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]

# A child process, so the real warnings machinery runs (pytest records warnings itself) and fds 1/2 are its own.
SCRIPT = r"""
import logging, os, sys, warnings
from pathlib import Path

import click
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from appliance import console
from appliance.pipeline.progress import Progress

with console.captured(Path(sys.argv[1])):
    warnings.warn("marker-python-warning")
    hf_logging.get_logger("transformers.test").warning("marker-transformers-log")
    for _ in tqdm(range(3), desc="marker-tqdm-bar"):
        pass
    print("marker-library-print")
    os.write(2, b"marker-c-level-stderr\n")
    logging.getLogger("bankllm.test").info("ours-logger-line")
    with Progress().stage("ours-stage"):
        pass
    click.echo("ours-echo-err", err=True)
    click.echo("ours-echo-out")
print("after-capture")
"""

LIBRARY = ["marker-python-warning", "marker-transformers-log", "marker-tqdm-bar", "marker-library-print",
           "marker-c-level-stderr"]
OURS = ["ours-logger-line", "ours-stage ...", "ours-stage done in", "ours-echo-err"]


def _run(tmp_path: Path, debug: bool) -> tuple[subprocess.CompletedProcess, str]:
    env = {k: v for k, v in os.environ.items() if k != "BANKLLM_DEBUG"}
    env.update(PYTHONPATH=str(REPO), TRANSFORMERS_VERBOSITY="warning", **({"BANKLLM_DEBUG": "1"} if debug else {}))
    log = tmp_path / "logs" / "job.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc, log.read_text()


def test_library_output_goes_to_the_log_not_the_terminal(tmp_path):
    proc, log = _run(tmp_path, debug=False)
    for marker in LIBRARY:
        assert marker in log, marker
        assert marker not in proc.stderr and marker not in proc.stdout, marker
    for ours in OURS:
        assert ours in proc.stderr, ours
        assert ours in log, ours  # the log is a transcript: our lines between the libraries'
    assert proc.stdout.splitlines() == ["ours-echo-out", "after-capture"]
    # Off a terminal every line of ours is plain text, one per line (tests and log collectors read them).
    assert all(ln.startswith("[bankllm] ") or ln.startswith("ours-") for ln in proc.stderr.splitlines()), proc.stderr


def test_debug_shows_library_output_live_and_still_logs_it(tmp_path):
    proc, log = _run(tmp_path, debug=True)
    for marker in LIBRARY:
        assert marker in log, marker
        assert marker in proc.stderr, marker  # debug: the captured fds are teed to the terminal's stderr
    for ours in OURS:
        assert ours in proc.stderr, ours


def test_release_is_idempotent_and_restores_the_descriptors(tmp_path):
    from appliance import console

    before = os.fstat(2).st_ino
    with console.captured(tmp_path / "x.log", show=False):
        assert os.fstat(2).st_ino == (tmp_path / "x.log").stat().st_ino
        console.release()
        assert os.fstat(2).st_ino == before
    console.release()
    assert os.fstat(2).st_ino == before and console.log_path() is None


@pytest.mark.parametrize("failing", [False, True])
def test_job_closes_with_time_and_log_only_when_work_ran(tmp_path, monkeypatch, failing):
    """A job that fails its input checks prints only its error (one line); one that ran a stage points at the log."""
    code = ("import sys\nfrom appliance import console\nfrom appliance.pipeline.progress import Progress\n"
            "@console.job('demo')\ndef run(config=None):\n"
            f"    if {failing}: raise SystemExit(3)\n"
            "    with Progress().stage('work'): pass\n"
            "run()\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), BANKLLM_DATA_DIR=str(tmp_path / "data"))
    env.pop("BANKLLM_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    logs = list((tmp_path / "data" / "logs").glob("demo-*.log"))
    assert len(logs) == 1
    if failing:
        assert proc.returncode == 3 and proc.stderr == ""
    else:
        assert proc.returncode == 0
        assert f"[bankllm] demo finished in" in proc.stderr and str(logs[0]) in proc.stderr
