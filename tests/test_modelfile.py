"""The Modelfile: Ollama's grammar, writer/parser round trip, and its template against the tokenizer's."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
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


# Real tokenizers' chat templates, verbatim from their tokenizer_config.json (Mistral's less its tool-calling
# branches), as llama.cpp's tests/test-chat-template.cpp carries them: each family's Ollama TEMPLATE must render
# what these render. (bos, eos) as those tokenizers define them.
REAL_TEMPLATES = {
    "Meta-Llama-3-8B-Instruct": ("llama3", "<|begin_of_text|>", "<|eot_id|>", (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
        "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")),
    "gemma-3-it": ("gemma", "<bos>", "<eos>", (
        "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
        "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
        "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
        "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
        "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
        "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
        "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
        "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
        "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")),
    # Gemma 2 has no system role (its template raises on one): checked on conversations without one.
    "gemma-2-it": ("gemma", "<bos>", "<eos>", (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")),
    "Phi-3-small": ("phi3", "<|endoftext|>", "<|endoftext|>", (
        "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
        "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
        "{% endif %}")),
    "Mistral-7B-Instruct-v0.3": ("mistral", "<s>", "</s>", (
        "{%- if messages[0][\"role\"] == \"system\" %}\n    {%- set system_message = messages[0][\"content\"] %}\n"
        "    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n"
        "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n"
        "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n\n"
        "{%- for message in loop_messages | rejectattr(\"role\", \"equalto\", \"tool\") | "
        "rejectattr(\"role\", \"equalto\", \"tool_results\") | selectattr(\"tool_calls\", \"undefined\") %}\n"
        "    {%- if (message[\"role\"] == \"user\") != (loop.index0 % 2 == 0) %}\n"
        "        {{- raise_exception(\"After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...\") }}\n    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n"
        "{%- for message in loop_messages %}\n    {%- if message[\"role\"] == \"user\" %}\n"
        "        {%- if loop.last and system_message is defined %}\n"
        "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
        "        {%- else %}\n            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n        {%- endif %}\n"
        "    {%- elif message[\"role\"] == \"assistant\" %}\n"
        "        {{- \" \" + message[\"content\"]|trim + eos_token}}\n    {%- else %}\n"
        "        {{- raise_exception(\"Only user and assistant roles are supported, with the exception of an initial "
        "optional system message!\") }}\n    {%- endif %}\n{%- endfor %}\n")),
}


@functools.cache
def _go_renderer() -> str:
    """Build tests/gotemplate/render.go once per run (a `go run` per template would recompile each time)."""
    go = shutil.which("go")
    assert go, "Go is needed to render Ollama templates with the real text/template (apt-get install golang-go)"
    out = Path(tempfile.mkdtemp(prefix="bankllm-gotemplate-")) / "render"
    proc = subprocess.run([go, "build", "-o", str(out), str(GO_RENDERER)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(out)


def go_render(template: str, messages: list[dict], system: str = "") -> str:
    proc = subprocess.run([_go_renderer()], input=json.dumps(
        {"template": template, "system": system, "messages": messages}), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def jinja_render(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """What the tokenizer's template renders (transformers' own renderer), less a leading BOS: libllama adds that
    itself when it tokenizes, so an Ollama template that wrote it too would double it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True,
                                        bos_token=bos, eos_token=eos)
    text = rendered[0]
    return text[len(bos):] if bos and text.startswith(bos) else text


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
        mf.template_family("{{ bos_token }}{% for m in messages %}### Instruction:\n{{ m.content }}{% endfor %}")
    # Zephyr writes <|assistant|> too, but ends turns with </s>: not Phi-3's family.
    with pytest.raises(UnsupportedModelError):
        mf.template_family("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>{% endfor %}<|assistant|>")
    with pytest.raises(UnsupportedModelError, match="no chat template") as err:
        mf.template_family(None)
    assert "--chat-template" in err.value.fix


CONVERSATIONS = {"with system": CONVERSATION, "without system": CONVERSATION[1:], "one turn": CONVERSATION[:2]}


@pytest.mark.parametrize("name", list(REAL_TEMPLATES))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_family_template_renders_like_real_tokenizers(name, conversation):
    family, bos, eos, template = REAL_TEMPLATES[name]
    messages = CONVERSATIONS[conversation]
    if name == "gemma-2-it" and messages[0]["role"] == "system":
        pytest.skip("Gemma 2's own template refuses a system message")
    assert mf.template_family(template) == family
    expected = jinja_render(template, messages, bos, eos)
    assert go_render(mf.family_modelfile(family).template, messages) == expected


@pytest.mark.parametrize("family", ["chatml", "llama3", "gemma", "phi3", "mistral"])
def test_shipped_chat_templates_match_their_modelfiles(family):
    """The Jinja a base without a template is given (--chat-template FAMILY) and the family's Ollama TEMPLATE agree."""
    assert family in mf.families()
    chosen = mf.resolve_chat_template(family)
    assert chosen.family == family and chosen.choice == family
    assert mf.template_family(chosen.template) == family
    template = mf.family_modelfile(family).template
    for messages in CONVERSATIONS.values():
        assert go_render(template, messages) == jinja_render(chosen.template, messages, "<s>", "</s>")


def test_chat_template_choice_from_a_file(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(REAL_TEMPLATES["gemma-3-it"][3])
    chosen = mf.resolve_chat_template(str(path))
    assert chosen.family == "gemma" and chosen.choice == str(path) and chosen.as_dict()["sha256"] == chosen.sha256
    with pytest.raises(InputError, match="neither a known family nor a file"):
        mf.resolve_chat_template("alpaca")
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(UnsupportedModelError, match="unknown family"):
        mf.resolve_chat_template(str(path))
