"""Two builds of the same inputs share <data dir>/work/<build id>: the second waits for the first (build.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from appliance.pipeline import build as build_mod
from appliance.pipeline.progress import Progress
from appliance.settings import Settings

pytestmark = pytest.mark.fast


class Recorder(Progress):
    def __init__(self):
        super().__init__(quiet=True)
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def _open_in_thread(settings, inputs, progress, events):
    def run():
        with build_mod._open_build(settings, inputs, None, progress) as opened:
            events.append(("second opened", opened[1]))
    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_second_build_of_the_same_inputs_waits_for_the_first(tmp_path):
    settings = Settings.load(env={}, data_dir=tmp_path)
    inputs = {"kind": "test", "n": 1}
    second, events = Recorder(), []
    with build_mod._open_build(settings, inputs, None, Recorder()) as (_, build_id, out_dir, reused):
        assert reused is None and out_dir == tmp_path / "builds" / build_id
        t = _open_in_thread(settings, inputs, second, events)
        time.sleep(0.5)
        assert events == [], "the second build went ahead while the first held the work dir"
        assert any("is running; waiting for it" in line for line in second.lines), second.lines
        events.append("first done")
    t.join(10)
    assert events == ["first done", ("second opened", build_id)]


def test_builds_of_other_inputs_do_not_wait(tmp_path):
    settings = Settings.load(env={}, data_dir=tmp_path)
    other, events = Recorder(), []
    with build_mod._open_build(settings, {"n": 1}, None, Recorder()):
        t = _open_in_thread(settings, {"n": 2}, other, events)
        t.join(10)
        assert len(events) == 1 and other.lines == []


def test_a_killed_build_releases_its_lock(tmp_path):
    settings = Settings.load(env={}, data_dir=tmp_path)
    inputs = {"n": 3}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path\n"
        "from appliance.pipeline import build as b\nfrom appliance.pipeline.progress import Progress\n"
        "from appliance.settings import Settings\n"
        f"s = Settings.load(env={{}}, data_dir=Path({str(tmp_path)!r}))\n"
        f"with b._open_build(s, {inputs!r}, None, Progress(quiet=True)):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiting, events = Recorder(), []
        t = _open_in_thread(settings, inputs, waiting, events)
        time.sleep(0.5)
        assert events == [] and waiting.lines
        holder.kill()
        t.join(10)
        assert len(events) == 1
    finally:
        holder.kill()
        holder.wait()
