"""Training-data loading and validation: every bad input is refused with its line numbers before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.errors import DataError, InputError
from appliance.training.data import (load_examples, load_labels, require_chat_template, require_valid,
                                     stratified_split, validate)

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_banking77_loads_clean():
    examples, report = load_examples(BANKING77 / "train.csv")
    labels = load_labels(BANKING77 / "categories.json")
    kept = validate(examples, report, labels=labels)
    require_valid(report)
    assert len(kept) == 10003 and report.rows == 10003
    d = report.as_dict()
    assert d["classes"] == 77 and d["class_min"] == 35 and d["class_max"] == 187
    assert any("imbalance" in w for w in report.warnings)
    assert examples[0].messages[-1] == {"role": "assistant", "content": "card_arrival"}
    assert examples[0].messages[0]["role"] == "system"


def test_malformed_csv_lists_lines(tmp_path):
    f = write(tmp_path / "d.csv", "text,category\nhello,card_arrival\nthree,fields,here\n,card_arrival\nok,top_up\n")
    examples, report = load_examples(f)
    validate(examples, report)
    assert any("wrong number of fields" in e and ": 3" in e for e in report.errors)
    assert any("empty" in e and ": 4" in e for e in report.errors)
    with pytest.raises(DataError, match="failed validation"):
        require_valid(report)


def test_unknown_columns_refused(tmp_path):
    f = write(tmp_path / "d.csv", "text,intent\nhello,card_arrival\n")
    with pytest.raises(DataError, match=r"unknown \['intent'\].*missing \['category'\]"):
        load_examples(f)


def test_not_utf8_refused(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b"text,category\n\xff\xfe bad,card_arrival\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(f)


def test_malformed_jsonl_lists_lines(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "card_arrival"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
             json.dumps({**good, "extra": 1}), json.dumps({"messages": [{"role": "robot", "content": "x"},
                                                                        {"role": "assistant", "content": "y"}]})]
    f = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    examples, report = load_examples(f)
    validate(examples, report)
    assert len(examples) == 1
    text = " | ".join(report.errors)
    assert "invalid JSON on 1 line(s): 2" in text
    assert "unknown keys" in text and ": 4" in text
    assert "ending with a user then an assistant turn on 2 line(s): 3, 5" in text


def test_labels_outside_label_set(tmp_path):
    f = write(tmp_path / "d.csv", "text,category\nhello,card_arrival\nbye,not_a_label\n")
    labels = write(tmp_path / "labels.json", json.dumps(["card_arrival", "top_up"]))
    examples, report = load_examples(f)
    validate(examples, report, labels=load_labels(labels))
    assert report.errors == ["labels outside --labels (not_a_label) on 1 line(s): 3"]


def test_empty_data_set(tmp_path):
    f = write(tmp_path / "d.csv", "text,category\n")
    examples, report = load_examples(f)
    validate(examples, report)
    assert report.errors == ["the data set has no samples"]
    with pytest.raises(DataError):
        require_valid(report)
    with pytest.raises(DataError, match="is empty"):
        load_examples(write(tmp_path / "e.csv", ""))


def test_duplicates_warn_and_conflicts_fail(tmp_path):
    f = write(tmp_path / "d.csv", "text,category\nWhere is my card?,card_arrival\nWhere is my card?,card_arrival\n"
                                  "where is my card,card_arrival\nTop up failed,top_up_failed\nTop up failed,top_up_reverted\n")
    examples, report = load_examples(f)
    validate(examples, report)
    assert report.exact_duplicates == 1 and report.near_duplicates == 1
    assert any("exact duplicate" in w for w in report.warnings)
    assert report.errors == ["the same text with conflicting labels on 2 line(s): 5, 6"]


def test_over_long_samples_are_left_out(tmp_path, base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    long_text = "my card " * 200
    f = write(tmp_path / "d.csv", f"text,category\nshort one,card_arrival\n{long_text},card_arrival\n")
    examples, report = load_examples(f)
    kept = validate(examples, report, tokenizer=tok, max_seq_len=64)
    assert [e.line for e in kept] == [2]
    assert report.over_long == 1 and any("longer than --max-seq-len 64" in w and "lines 3" in w for w in report.warnings)
    assert report.token_lengths["max"] > 64


def test_base_without_chat_template(tmp_path, base_dir):
    from transformers import AutoTokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "config.json"):
        shutil.copy2(base_dir / name, bare / name)
    cfg = json.loads((base_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(bare)
    with pytest.raises(InputError, match="has no chat template"):
        require_chat_template(tok, bare)
    require_chat_template(AutoTokenizer.from_pretrained(base_dir), base_dir)


def test_stratified_split_is_fixed_and_disjoint():
    examples, _ = load_examples(BANKING77 / "train.csv")
    train_a, val_a = stratified_split(examples, 0.1, seed=42)
    train_b, val_b = stratified_split(examples, 0.1, seed=42)
    assert [e.line for e in val_a] == [e.line for e in val_b]
    assert not {e.line for e in train_a} & {e.line for e in val_a}
    assert len(train_a) + len(val_a) == len(examples)
    per_label = {}
    for e in val_a:
        per_label[e.label] = per_label.get(e.label, 0) + 1
    assert len(per_label) == 77 and min(per_label.values()) >= 3
    assert abs(len(val_a) - 1000) < 20
    _, val_c = stratified_split(examples, 0.1, seed=7)
    assert [e.line for e in val_c] != [e.line for e in val_a]


def test_labels_file_forms(tmp_path):
    assert load_labels(write(tmp_path / "a.json", '["x", "y"]')) == ["x", "y"]
    assert load_labels(write(tmp_path / "a.txt", "x\ny\n\n")) == ["x", "y"]
    with pytest.raises(DataError, match="twice"):
        load_labels(write(tmp_path / "b.json", '["x", "x"]'))
    with pytest.raises(DataError):
        load_labels(write(tmp_path / "c.json", "[]"))
