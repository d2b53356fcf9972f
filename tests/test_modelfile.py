"""The Modelfile: Ollama's grammar, writer/parser round trip, and its template against the tokenizer's."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.errors import InputError, UnsupportedModelError
from appliance.pipeline import modelfile as mf

GO_RENDERER = Path(__file__).parent / "gotemplate" / "render.go"

CONVERSATION = [
    {"role": "system", "content": "You are a bank assistant."},
    {"role": "user", "content": "I lost my card, what now?"},
    {"role": "assistant", "content": "Freeze it in the app, then order a new one."},
    {"role": "user", "content": "And the pending \"payments\"?\nThey look odd."},
]


def go_render(template: str, messages: list[dict], system: str = "") -> str:
    go = shutil.which("go")
    assert go, "Go is needed to render Ollama templates with the real text/template (apt-get install golang-go)"
    proc = subprocess.run([go, "run", str(GO_RENDERER)], input=json.dumps(
        {"template": template, "system": system, "messages": messages}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_written_modelfile_round_trips_and_follows_grammar(tmp_path, base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    dest = tmp_path / "Modelfile"
    written = mf.write_modelfile(dest, tok.chat_template, "Be precise.\nNever ask for a PIN.", 2048)
    text = dest.read_text()
    parsed = mf.parse(text)
    assert parsed == written
    assert mf.parse(parsed.to_string()) == parsed
    assert parsed.from_ == "./model.gguf"
    assert parsed.param_values("stop") == ["<|im_start|>", "<|im_end|>"]
    assert parsed.param_values("temperature") == ["0"]
    assert parsed.system == "Be precise.\nNever ask for a PIN."
    assert text.startswith("FROM ./model.gguf\n")


def test_template_renders_like_the_tokenizers_jinja_template(base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    expected = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    template = mf.family_modelfile(mf.template_family(tok.chat_template)).template
    assert go_render(template, CONVERSATION, system=CONVERSATION[0]["content"]) == expected


@pytest.mark.parametrize("text,needle", [
    ("FROM x\nBOGUS y\n", "unknown command 'BOGUS'"),
    ("FROM x\nPARAMETER warmth 3\n", "unknown PARAMETER 'warmth'"),
    ("FROM x\nPARAMETER temperature hot\n", "not a float"),
    ('FROM x\nTEMPLATE """{{ .Prompt }}\n', 'unterminated """'),
    ("PARAMETER seed 1\n", "no FROM"),
    ("FROM x\nMESSAGE robot hi\n", "MESSAGE role 'robot'"),
])
def test_parser_rejects_what_ollama_rejects(text, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        mf.parse(text)


def test_parser_reads_every_command():
    text = ('# comment\nFROM ./m.gguf\nADAPTER ./a.gguf\nTEMPLATE """{{ .Prompt }}"""\nSYSTEM "hi"\n'
            'PARAMETER num_ctx 4096\nPARAMETER stop "<|x|>"\nMESSAGE user hello\nMESSAGE assistant "hey there"\n'
            'LICENSE """Apache-2.0\nline two"""\nREQUIRES 0.5.0\n')
    parsed = mf.parse(text)
    assert parsed.adapters == ["./a.gguf"] and parsed.template == "{{ .Prompt }}" and parsed.system == "hi"
    assert parsed.parameters == [("num_ctx", "4096"), ("stop", "<|x|>")]
    assert parsed.messages == [("user", "hello"), ("assistant", "hey there")]
    assert parsed.license == "Apache-2.0\nline two" and parsed.requires == "0.5.0"
    assert mf.parse(parsed.to_string()) == parsed


def test_unknown_template_family_is_refused():
    with pytest.raises(UnsupportedModelError):
        mf.template_family("{{ bos_token }}{% for m in messages %}[INST]{{ m.content }}{% endfor %}")
    with pytest.raises(UnsupportedModelError):
        mf.template_family(None)
