"""The artifact readers and writers (labels, task, build report, build and adapter directories): fast, no model."""

from __future__ import annotations

import json

import pytest

from appliance.artifacts import (DEFAULT_SYSTEM_PROMPT, LABELS_FILE, MODEL_FILE, REPORT_FILE, TASK_FILE,
                                 AdapterDir, BuildDir, Calibration, Task, read_labels, read_report, read_task,
                                 write_labels, write_report, write_task)
from appliance.errors import DataError, InputError, LabelsError, format_error
from appliance.resources import default_adapter_dir, default_dir

pytestmark = pytest.mark.fast


def write(path, text):
    path.write_text(text)
    return path


def test_labels_round_trip_and_forms(tmp_path):
    write_labels(tmp_path / LABELS_FILE, ["card_arrival", "top_up"])
    assert read_labels(tmp_path / LABELS_FILE) == ["card_arrival", "top_up"]
    assert read_labels(write(tmp_path / "o.json", '{"labels": ["a", "b"], "note": "x"}')) == ["a", "b"]
    assert read_labels(write(tmp_path / "l.txt", "a\n b \n\n")) == ["a", "b"]
    assert read_labels(write(tmp_path / "j.txt", '["a", "b"]')) == ["a", "b"]
    assert len(read_labels(default_dir() / LABELS_FILE)) == 77


@pytest.mark.parametrize("name, text, message", [
    ("dup.json", '["a", "b", "a"]', "lists a label twice (a)"),
    ("empty.json", "[]", "non-empty list of non-empty strings"),
    ("blank.json", '["a", " "]', "non-empty list of non-empty strings"),
    ("nums.json", "[1, 2]", "non-empty list of non-empty strings"),
    ("obj.json", '{"names": ["a"]}', "non-empty list of non-empty strings"),
    ("bad.json", "[not json", "is not valid JSON"),
    ("plain.json", "a\nb\n", "is not valid JSON"),  # a .json file is JSON, not one label per line
    ("dup.txt", "a\na\n", "lists a label twice"),
    ("empty.txt", "\n\n", "non-empty list"),
])
def test_bad_labels_are_refused_naming_the_file(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(LabelsError) as info:
        read_labels(path)
    line = format_error(info.value)
    assert message in line and str(path) in line and "-- fix:" in line and "\n" not in line
    # An input to build and serve, data to training: both callers' error types catch it.
    assert isinstance(info.value, InputError) and isinstance(info.value, DataError)


def test_missing_labels_file(tmp_path):
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "none.json")


def test_task_round_trip(tmp_path):
    task = Task(system_prompt="Classify.", labels=LABELS_FILE, calibration=Calibration(1.7), threshold=0.8)
    write_task(tmp_path / TASK_FILE, task)
    assert read_task(tmp_path / TASK_FILE) == task
    plain = Task(system_prompt="Chat.", labels=None)
    write_task(tmp_path / TASK_FILE, plain)
    assert json.loads((tmp_path / TASK_FILE).read_text()) == {"system_prompt": "Chat.", "labels": None}
    assert read_task(tmp_path / TASK_FILE) == plain


def test_task_tolerates_missing_and_unknown_fields(tmp_path):
    path = write(tmp_path / TASK_FILE, json.dumps({"system_prompt": "Classify.", "labels": "labels.json",
                                                   "calibration": {"temperature": 2, "fitted_on": "val"},
                                                   "answers": "answers.toml", "schema": 2}))
    task = read_task(path)
    assert task.calibration.temperature == 2.0 and task.threshold is None
    assert task.extra == {"answers": "answers.toml", "schema": 2}
    write_task(tmp_path / "again.json", task)  # what a newer bankllm wrote survives a rewrite
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text())
    minimal = read_task(write(tmp_path / "m.json", '{"system_prompt": "Classify."}'))
    assert minimal.labels is None and minimal.calibration is None and minimal.threshold is None


def test_shipped_adapter_task_file():
    adapter = AdapterDir(default_adapter_dir())
    task = adapter.task()
    assert task == Task(system_prompt=DEFAULT_SYSTEM_PROMPT, labels=LABELS_FILE)
    # Banking77's 77 intents, and the reserved label the assistant stage trained for what the bank has no answer for
    assert adapter.labels() == read_labels(default_dir() / LABELS_FILE) + ["out_of_scope"]
    assert adapter.config()["peft_type"] == "LORA"


@pytest.mark.parametrize("data, message", [
    ([], "is not a JSON object"),
    ({"labels": "labels.json"}, "system_prompt must be a non-empty string"),
    ({"system_prompt": "  "}, "system_prompt must be a non-empty string"),
    ({"system_prompt": "x", "labels": "../labels.json"}, "labels must be a file name in the same directory"),
    ({"system_prompt": "x", "labels": 3}, "labels must be a file name"),
    ({"system_prompt": "x", "calibration": {"temperature": 0}}, "calibration must be an object"),
    ({"system_prompt": "x", "calibration": {"temperature": "hot"}}, "calibration must be an object"),
    ({"system_prompt": "x", "calibration": 1.5}, "calibration must be an object"),
    ({"system_prompt": "x", "threshold": 1.5}, "threshold must be a number from 0 to 1"),
    ({"system_prompt": "x", "threshold": True}, "threshold must be a number from 0 to 1"),
    ({"system_prompt": "x", "threshold": "0.8"}, "threshold must be a number from 0 to 1"),
])
def test_bad_task_files_are_refused_in_one_line(tmp_path, data, message):
    path = write(tmp_path / TASK_FILE, json.dumps(data))
    with pytest.raises(InputError) as info:
        read_task(path)
    line = format_error(info.value)
    assert message in line and str(path) in line and "-- fix:" in line and "\n" not in line


def test_task_file_not_json(tmp_path):
    with pytest.raises(InputError, match="is not valid JSON"):
        read_task(write(tmp_path / TASK_FILE, "{"))


def test_build_dir_without_task_file(tmp_path):
    build = BuildDir(tmp_path)
    assert build.model == tmp_path / MODEL_FILE and build.report_file == tmp_path / REPORT_FILE
    assert build.task() is None and build.labels() is None and build.system_prompt() == DEFAULT_SYSTEM_PROMPT
    assert build.contract_digests() == {}
    write_labels(tmp_path / LABELS_FILE, ["a", "b"])
    assert build.labels() == ["a", "b"] and set(build.contract_digests()) == {LABELS_FILE}
    with pytest.raises(InputError, match="not a finished build"):
        build.report()


def test_build_dir_with_task_file(tmp_path):
    build = BuildDir(tmp_path)
    write_task(tmp_path / TASK_FILE, Task(system_prompt="Say the intent.", labels="classes.json", threshold=0.9))
    with pytest.raises(LabelsError, match="classes.json does not exist"):  # the task names it: it must be there
        build.labels()
    write_labels(tmp_path / "classes.json", ["x", "y"])
    write_labels(tmp_path / LABELS_FILE, ["ignored"])
    assert build.labels() == ["x", "y"] and build.labels_file == tmp_path / "classes.json"
    assert build.system_prompt() == "Say the intent." and build.task().threshold == 0.9
    assert set(build.contract_digests()) == {TASK_FILE, "classes.json"}
    write_task(tmp_path / TASK_FILE, Task(system_prompt="Chat.", labels=None))
    assert build.labels() is None and build.labels_file is None


def test_build_report_round_trip_and_checks(tmp_path):
    report = {"schema": 1, "build_id": "abc", "inputs_digest": "d", "base": {}, "adapter": None, "steps": [],
              "gate": {}, "chosen": {}, "verdict": "ship", "versions": {}}
    write_report(tmp_path, report)
    assert BuildDir(tmp_path).report() == report == read_report(tmp_path / REPORT_FILE)
    write(tmp_path / REPORT_FILE, json.dumps({**report, "schema": 9}))
    with pytest.raises(InputError, match="schema 9 is not 1"):
        BuildDir(tmp_path).report()
    write(tmp_path / REPORT_FILE, json.dumps({"build_id": "abc"}))
    with pytest.raises(InputError, match="lacks schema"):
        BuildDir(tmp_path).report()
    write(tmp_path / REPORT_FILE, "{")
    with pytest.raises(InputError, match="is not valid JSON"):
        BuildDir(tmp_path).report()


def test_adapter_config_checks(tmp_path):
    adapter = AdapterDir(tmp_path)
    with pytest.raises(InputError, match="has no adapter_config.json"):
        adapter.config()
    write(tmp_path / "adapter_config.json", json.dumps({"peft_type": "IA3"}))
    with pytest.raises(InputError, match="'IA3' adapter, not LoRA"):
        adapter.config()
    write(tmp_path / "adapter_config.json", "[")
    with pytest.raises(InputError, match="is not valid JSON"):
        adapter.config()
    write(tmp_path / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 8}))
    assert adapter.config()["r"] == 8 and adapter.labels() is None and adapter.task() is None
