"""The approved-answer library: the default one is complete and bank-neutral, every bad library is refused with
one line naming the intent or placeholder, placeholders are filled, and `bankllm answers check` says so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.answers import AnswerLibrary, AnswerLibraryError, default_answers_file, read_library
from appliance.errors import InputError, format_error

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "build" / "default" / "answers.toml"
LABELS_FILE = REPO / "build" / "default" / "labels.json"
LABELS = json.loads(LABELS_FILE.read_text())
TEXT = DEFAULT.read_text()


def _without_table(text: str, header: str) -> str:
    """`text` with one [intents.X] table (header line up to the next blank line) removed."""
    start = text.index(header + "\n")
    end = text.index("\n\n", start)
    return text[:start] + text[end + 2:]


def _with_required_phone(text: str) -> str:
    text = text.replace("required = []", 'required = ["support_phone"]')
    return re.sub(r"^support_phone = .*\n", "", text, flags=re.M)


# Each bad library, and words its one-line error must contain (the intent or placeholder it names).
BAD = {
    "missing intent": (_without_table(TEXT, "[intents.card_arrival]"), ["'card_arrival'", "has no entry"]),
    "extra intent": (TEXT + '\n[intents.mortgage_rates]\ndescription = "a mortgage"\nanswer = "Ask us."\n',
                     ["'mortgage_rates'", "not a label of the model"]),
    "unknown placeholder": (TEXT.replace("in {app_name}. If it still hasn't arrived", "in {app_nmae}. If it still hasn't arrived"),
                            ["'card_arrival'", "{app_nmae}", "declare"]),
    "empty answer": (re.sub(r'(\[intents\.pin_blocked\]\ndescription = .*\n)answer = .*\n', r'\1answer = "  "\n', TEXT),
                     ["'pin_blocked'", "empty or missing answer"]),
    "empty description": (TEXT.replace('description = "a lost or stolen card"', 'description = ""'),
                          ["'lost_or_stolen_card'", "description"]),
    "bad TOML": (TEXT.replace("[intents.change_pin]", "[intents.change_pin"), ["not valid TOML", "line"]),
    "stray brace": (TEXT.replace("call {support_phone} and we'll help.\"", "call {support_phone and we'll help.\"", 1),
                    ["'card_arrival'", "malformed placeholder"]),
    "same description": (TEXT.replace('description = "a lost or stolen card"', 'description = "a card that is not working"'),
                         ["'card_not_working'", "'lost_or_stolen_card'", "same description"]),
    "unknown key": (TEXT.replace('[intents.change_pin]\n', '[intents.change_pin]\nanwser = "typo"\n'),
                    ["'change_pin'", "'anwser'"]),
}


def _assert_one_line(err: BaseException, words: list[str]) -> None:
    line = format_error(err)
    assert "\n" not in line and "-- fix:" in line, line
    for word in words:
        assert word in line, (word, line)


def test_default_library_loads_and_covers_every_label():
    assert default_answers_file() == DEFAULT
    lib = AnswerLibrary.load(DEFAULT, LABELS)
    assert lib.labels == tuple(LABELS)
    assert re.fullmatch(r"[0-9a-f]{64}", lib.sha256)
    for label in LABELS:
        for text in (lib.answer(label), lib.description(label)):
            assert text and "{" not in text and "}" not in text, (label, text)


def test_default_library_is_bank_neutral_and_short():
    source = read_library(DEFAULT, LABELS)
    texts = {f"{label} {field}": getattr(intent, field)
             for label, intent in source.intents.items() for field in ("answer", "description")}
    texts.update({f"default {name}": value for name, value in source.defaults.items()})
    for where, text in texts.items():
        assert not re.search(r"\d[\d ()+-]{4,}\d|\d{3,}", text), f"{where}: looks like a phone number: {text}"
        assert not re.search(r"https?:|www\.|\.(com|org|net|co\.uk)\b", text, re.I), f"{where}: a URL: {text}"
        assert not re.search(r"[£$€]\s*\d", text), f"{where}: a fee: {text}"
    for label, intent in source.intents.items():
        assert len(intent.answer.split()) <= 60, label
        assert len(intent.description.split()) <= 12, label
        # defaults are lowercase phrases ("the app"): a placeholder must not start a sentence
        assert not re.search(r'(^|[.!?]\s+)\{', intent.answer), label
    assert set(source.used) <= set(source.declared)


def test_placeholders_are_filled_from_facts_over_defaults():
    facts = {"support_phone": "0800 555 0100", "app_name": "the Acme app", "card_delivery_days": 5}
    lib = AnswerLibrary.load(DEFAULT, LABELS, facts)
    assert "call 0800 555 0100" in lib.answer("lost_or_stolen_card")
    assert "in the Acme app" in lib.answer("lost_or_stolen_card")
    assert "within 5 of ordering" in lib.answer("card_arrival")
    assert "our website" in lib.answer("country_support")  # a default where no fact is given
    plain = AnswerLibrary.load(DEFAULT, LABELS)
    assert "call our support line" in plain.answer("lost_or_stolen_card")
    assert lib.sha256 == plain.sha256  # the file's hash, whatever the facts


def test_literal_braces_and_reverted_label():
    text = TEXT.replace('description = "a card payment that was reversed"',
                        'description = "a card payment that was reversed {{like this}}"')
    from appliance.answers import parse_library

    lib = parse_library(text.encode(), LABELS, "answers.toml").fill({})
    assert lib.description("reverted_card_payment?") == "a card payment that was reversed {like this}"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_library_is_refused_with_one_line(case, tmp_path):
    text, words = BAD[case]
    path = tmp_path / "answers.toml"
    path.write_text(text)
    with pytest.raises(AnswerLibraryError) as exc:
        AnswerLibrary.load(path, LABELS)
    assert isinstance(exc.value, InputError)
    _assert_one_line(exc.value, words)


def test_required_fact_missing_is_refused_and_given_is_used(tmp_path):
    path = tmp_path / "answers.toml"
    path.write_text(_with_required_phone(TEXT))
    with pytest.raises(AnswerLibraryError) as exc:
        AnswerLibrary.load(path, LABELS, {"app_name": "Acme"})
    _assert_one_line(exc.value, ["'support_phone'", "bank_facts.support_phone"])
    with pytest.raises(AnswerLibraryError):
        AnswerLibrary.load(path, LABELS, {"support_phone": "   "})
    lib = AnswerLibrary.load(path, LABELS, {"support_phone": "0800 555 0100"})
    assert "0800 555 0100" in lib.answer("pin_blocked")


def test_undeclared_fact_is_refused():
    with pytest.raises(AnswerLibraryError) as exc:
        AnswerLibrary.load(DEFAULT, LABELS, {"suport_phone": "0800 555 0100"})
    _assert_one_line(exc.value, ["'suport_phone'", "not a placeholder"])


def test_unknown_intent_lookup_is_refused():
    lib = AnswerLibrary.load(DEFAULT, LABELS)
    with pytest.raises(AnswerLibraryError):
        lib.answer("mortgage_rates")


def _check(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", "answers", "check", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=cwd or REPO)


def test_cli_check_accepts_the_default():
    proc = _check(DEFAULT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: 77 intents, placeholders: ")
    assert "support_phone" in proc.stdout and "app_name" in proc.stdout
    proc = _check(DEFAULT, "--labels", LABELS_FILE, "--fact", "support_phone=0800 555 0100")
    assert proc.returncode == 0, proc.stderr


def test_cli_check_refuses_each_bad_file_with_its_line(tmp_path):
    cases = dict(BAD)
    cases["required fact given wrong"] = (_with_required_phone(TEXT), ["'support_phone'"])
    for case, (text, words) in cases.items():
        path = tmp_path / case.replace(" ", "-") / "answers.toml"
        path.parent.mkdir()
        path.write_text(text)
        extra = ["--fact", "app_name=Acme"] if case == "required fact given wrong" else []
        proc = _check(path, "--labels", LABELS_FILE, *extra)
        assert proc.returncode != 0, case
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, proc.stderr)
        for word in words:
            assert word in lines[0], (case, word, lines[0])
        assert proc.stdout == ""


def test_cli_check_reads_labels_beside_the_file(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(LABELS[:-1]))  # a model without country_support
    (tmp_path / "answers.toml").write_text(TEXT + "\n# the bank's own copy\n")  # not the shipped default
    proc = _check(tmp_path / "answers.toml")
    assert proc.returncode != 0 and "'country_support'" in proc.stderr and "not a label" in proc.stderr


def test_out_of_scope_sets():
    d = REPO / "build" / "default"
    train = [l for l in (d / "oos-train.txt").read_text().splitlines()]
    val = [l for l in (d / "oos-val.txt").read_text().splitlines()]
    assert all(l.strip() == l and l for l in train + val)
    assert len(train) + len(val) >= 400
    assert not set(map(str.lower, train)) & set(map(str.lower, val))
    assert 0.55 <= len(train) / (len(train) + len(val)) <= 0.65


def test_the_default_library_serves_a_model_on_some_banking77_intents():
    """A model trained on a few Banking77 intents gets the default's answers for those; a bank's own library must
    match exactly, and a label the default lacks is refused with the way out."""
    labels = ["card_arrival", "top_up_failed", "out_of_scope"]
    lib = AnswerLibrary.load(default_answers_file(), labels)
    assert set(lib.labels) == {"card_arrival", "top_up_failed"}
    with pytest.raises(AnswerLibraryError, match="mortgage_rates") as refused:
        AnswerLibrary.load(default_answers_file(), ["card_arrival", "mortgage_rates"])
    assert "answers_file" in refused.value.fix
