"""Fast tier: the schema -> GBNF converter, checked with llama.cpp's own grammar engine (a vocabulary-only load of the
default GGUF, no weights): every grammar compiles, admits the valid texts and rejects the invalid ones, random walks
through the grammar end in JSON that validates, and unsupported schemas are refused with one line naming the
keyword (also through the real route, over a FakeEngine)."""

from __future__ import annotations

import ctypes
import json
import random
import re

import llama_cpp
import pytest
from litestar.testing import TestClient

from appliance.service.errors import GrammarError
from appliance.service.json_grammar import any_object_gbnf, int_range, schema_to_gbnf
from tests._json_schemas import CASES, REFUSED, check_answer
from tests._service_util import default_gguf

pytestmark = pytest.mark.fast


class GrammarEngine:
    """llama.cpp's grammar sampler over a vocabulary: compile, and feed text token by token asking at each step
    whether the next token is allowed (llama_sampler_apply sets a refused token's logit to -inf)."""

    def __init__(self):
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(default_gguf()).encode(), params)
        assert self.model
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def compile(self, grammar: str):
        smpl = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert smpl, f"llama.cpp could not compile:\n{grammar}"
        return smpl

    def tokens(self, text: str) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        return list(buf[:n])

    def allowed(self, smpl, candidates: list[int]) -> list[int]:
        arr = (llama_cpp.llama_token_data * len(candidates))()
        for i, t in enumerate(candidates):
            arr[i].id, arr[i].logit, arr[i].p = t, 0.0, 0.0
        data = llama_cpp.llama_token_data_array(data=arr, size=len(candidates), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(data))
        return [arr[i].id for i in range(len(candidates)) if arr[i].logit != float("-inf")]

    def accepts(self, grammar: str, text: str) -> bool:
        smpl = self.compile(grammar)
        try:
            for t in self.tokens(text):
                if not self.allowed(smpl, [t]):
                    return False
                llama_cpp.llama_sampler_accept(smpl, t)
            return bool(self.allowed(smpl, [self.eos]))  # complete: the end of generation is allowed here
        finally:
            llama_cpp.llama_sampler_free(smpl)

    def walk(self, grammar: str, rng: random.Random, alphabet: list[int], closers: set[int], max_steps: int = 400):
        """A random path through the grammar over `alphabet` (closing tokens favoured so walks end); the text,
        or None when it did not end within max_steps."""
        smpl = self.compile(grammar)
        out = []
        try:
            for _ in range(max_steps):
                ok = self.allowed(smpl, alphabet + [self.eos])
                assert ok, f"the grammar dead-ends after {b''.join(out)!r}"
                weights = [30 if t in closers or t == self.eos else 1 for t in ok]
                t = rng.choices(ok, weights)[0]
                if t == self.eos:
                    return b"".join(out).decode("utf-8")
                llama_cpp.llama_sampler_accept(smpl, t)
                out.append(self.piece(t))
            return None
        finally:
            llama_cpp.llama_sampler_free(smpl)

    def piece(self, t: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
        return buf.raw[:n]


@pytest.fixture(scope="module")
def engine():
    return GrammarEngine()


@pytest.fixture(scope="module")
def alphabet(engine):
    """Single-character tokens (printable ASCII, control characters, a few non-ASCII) and some longer JSON-ish
    tokens; the closing characters favoured by the walk."""
    chars = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t", "\r", "\x00", "\x1b", "é", "€", "ü"]
    extra = ['":', '{"', '"}', '",', "true", "false", "null", "\\u", "00", "Z", "-0", "1.", "e5"]
    toks = []
    for text in chars + extra:
        t = engine.tokens(text)
        if len(t) == 1 and t[0] not in toks:
            toks.append(t[0])
    closers = {engine.tokens(c)[0] for c in ['"', "}", "]", ","]}
    return toks, closers


def test_the_set_is_large_and_varied():
    assert len(CASES) >= 30 and len({c["name"] for c in CASES}) == len(CASES)
    assert len(REFUSED) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_grammar_admits_valid_and_rejects_invalid(engine, case):
    grammar = schema_to_gbnf(case["schema"])
    llama_cpp.llama_sampler_free(engine.compile(grammar))
    for text in case["valid"]:
        check_answer(text, case["schema"])  # the example itself is valid
        assert engine.accepts(grammar, text), f"{case['name']}: refused valid {text!r}\n{grammar}"
    for text in case["invalid"]:
        assert not engine.accepts(grammar, text), f"{case['name']}: admitted {text!r}\n{grammar}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_random_walks_through_the_grammar_validate(engine, alphabet, case):
    """Random paths through the compiled grammar (what any sampler could produce): every one that ends parses and
    validates; most end."""
    toks, closers = alphabet
    grammar = schema_to_gbnf(case["schema"])
    rng = random.Random(case["name"])
    ended = 0
    for _ in range(12):
        text = engine.walk(grammar, rng, toks, closers)
        if text is None:
            continue
        ended += 1
        try:
            check_answer(text, case["schema"])
        except Exception as exc:
            raise AssertionError(f"{case['name']}: the grammar produced {text!r}: {exc}") from None
    assert ended >= (6 if case["walks_end"] else 0), f"{case['name']}: only {ended} of 12 walks ended"


@pytest.mark.parametrize("schema,word", REFUSED, ids=[f"refuse-{i}" for i in range(len(REFUSED))])
def test_unsupported_schemas_are_refused_naming_the_keyword(schema, word):
    with pytest.raises(GrammarError) as err:
        schema_to_gbnf(schema)
    msg = err.value.message
    assert word in msg and "\n" not in msg and err.value.status == 400 and err.value.param == "response_format", msg


def test_largest_bounds_compile(engine):
    """Counts up to MAX_REPEAT on compound items compile (llama.cpp caps repeated symbols times count at 2000)."""
    schema = {"type": "array", "maxItems": 2000, "items": {"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 2000}, "b": {"type": "string", "pattern": "^(ab|c[0-9]){1,2000}$"}},
        "required": ["a"]}}
    grammar = schema_to_gbnf(schema)
    assert engine.accepts(grammar, '[' + ",".join(['{"a":"' + "x" * 1999 + '","b":"abc1"}'] * 3) + "]")
    assert not engine.accepts(grammar, '[{"a":"' + "x" * 2001 + '"}]')


def test_malformed_utf8_never_enters_a_string(engine):
    """Byte tokens that would decode (in Python) to U+FFFD or a surrogate are refused inside strings: a surrogate's
    bytes, a lone continuation byte, overlong forms; a real two-byte character is admitted."""
    byte_token = {}
    for t in range(engine.n_vocab):
        piece = engine.piece(t)
        if len(piece) == 1 and piece[0] >= 0x80:
            byte_token[piece[0]] = t
    grammar = schema_to_gbnf({"type": "string", "maxLength": 1})
    quote = engine.tokens('"')

    def admits(raw: bytes) -> bool:
        smpl = engine.compile(grammar)
        try:
            for t in quote + [byte_token[b] for b in raw] + quote:
                if not engine.allowed(smpl, [t]):
                    return False
                llama_cpp.llama_sampler_accept(smpl, t)
            return bool(engine.allowed(smpl, [engine.eos]))
        finally:
            llama_cpp.llama_sampler_free(smpl)

    assert admits("é".encode())
    for raw in (b"\xed\xa0\x80", b"\xa9", b"\xe0\x81\x81", b"\xe0\x80\x80", b"\xc3"):
        assert all(b in byte_token for b in raw), raw
        assert not admits(raw), raw


def test_reference_cycles_do_not_compile(engine):
    """A $ref cycle that consumes nothing is left recursion: llama.cpp refuses it, so the engine's check_grammar
    answers 400 before any decoding."""
    schema = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}},
              "$ref": "#/$defs/a"}
    smpl = llama_cpp.llama_sampler_init_grammar(engine.vocab, schema_to_gbnf(schema).encode(), b"root")
    assert not smpl


def test_large_enum_is_exact(engine):
    """Enum values become a prefix tree (one grammar path per prefix): still exactly the listed values."""
    values = [f"acct-{i}" for i in range(990)] + ["acct", "", "a\"b\\c\n", 5, 5.5, None, [1, "x"], {"k": True}]
    grammar = schema_to_gbnf({"enum": values})
    rng = random.Random(3)
    for v in rng.sample(values[:990], 20) + values[990:]:
        assert engine.accepts(grammar, json.dumps(v, separators=(",", ":"))), v
    for text in ['"acct-990"', '"acct-"', '"acct-01"', '"ac"', "55", "5.", '[1,"x",2]', '{"k":false}', '"a\"b"']:
        assert not engine.accepts(grammar, text), text


def test_json_object_grammar(engine):
    grammar = any_object_gbnf()
    for text in ['{}', '{"a":[1,{"b":null}],"c":"x\\ny"}', '{ "k" : -0.5e-3 }']:
        assert engine.accepts(grammar, text), text
    for text in ['[]', '"x"', '{"a":"x\ny"}', '{"a":"\x01"}', "{'a':1}", '{"a":1,}', '{"a":NaN}', '{"a":"\\q"}',
                 '{"a":"\\ud83d\\ude00"}', '{}\n\n']:
        assert not engine.accepts(grammar, text), text


@pytest.mark.parametrize("lo,hi", [(0, 0), (0, 9), (1, 10), (7, 1234), (-15, 15), (-130, -7), (99, 101), (-1, 0),
                                   (18, 120), (-2147483648, 2147483647), (100, 999), (5, 5)])
def test_integer_ranges_are_exact(engine, lo, hi):
    grammar = f"root ::= {int_range(lo, hi)}\n"
    rng = random.Random(lo * 31 + hi)
    probes = {lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, 0, -1, 1, 10, -10, 100}
    probes |= {rng.randint(lo - 50, hi + 50) for _ in range(20)}
    for n in sorted(probes):
        assert engine.accepts(grammar, str(n)) == (lo <= n <= hi), (lo, hi, n, grammar)
    assert not engine.accepts(grammar, "0" + str(abs(hi)))  # no leading zeros


def test_bounded_number_edges(engine):
    schema = {"type": "number", "exclusiveMinimum": -3, "exclusiveMaximum": 2}
    grammar = schema_to_gbnf(schema)
    for text, ok in [("-3", False), ("-2.999999", True), ("-3.0", False), ("1.999999", True), ("2", False),
                     ("2.0", False), ("0", True), ("-0.5", True), ("1e1", False), ("-0", True)]:
        assert engine.accepts(grammar, text) == ok, text
        if ok:
            check_answer(text, schema)


def test_routes_refuse_unsupported_schema_and_stop(tmp_path):
    """The 400s through the real /v1/chat/completions route (FakeEngine, no model)."""
    from appliance.service.app import create_app
    from appliance.service.engine.fake import FakeEngine
    from appliance.settings import Settings

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    settings = Settings.load(env={}, model=model, require_keys=False)
    app = create_app(settings, engine_factory=lambda *_: FakeEngine(reply=lambda _p: '{"a":1}', n_slots=2))

    def post(fmt, **kw):
        return c.post("/v1/chat/completions", json={"model": "bankllm", "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 8, "response_format": fmt, **kw})

    schema = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}
    with TestClient(app) as c:
        r = post({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert "multipleOf" in err["message"] and "/properties/n" in err["message"] and err["param"] == "response_format"
        r = post({"type": "json_object"}, stop=["}"])
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
        r = post({"type": "json_object"})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"a": 1}


def _random_pattern(rng: random.Random, depth: int = 0) -> str:
    def atom(d):
        r = rng.random()
        if d > 2 or r < 0.35:
            return rng.choice(["a", "b", "1", "\\-", "\\.", '"', "\\\\", "\\n", " "])
        if r < 0.5:
            return rng.choice(["[ab]", "[^a]", "[a-c1]", "\\d", "\\w", "\\s", "\\D", "\\W", "\\S", ".", "[^\\d]", '[\\s"]'])
        return ("(" if r < 0.75 else "(?:") + alt(d + 1) + ")"

    def seq(d):
        return "".join(atom(d) + rng.choice(["", "", "", "*", "+", "?", "{2}", "{1,3}", "{0,2}", "*?"])
                       for _ in range(rng.randint(1, 3)))

    def alt(d):
        return "|".join(seq(d) for _ in range(rng.randint(1, 2)))

    return rng.choice(["", "^"]) + alt(depth) + rng.choice(["", "$"])


def test_random_patterns_admit_only_matching_strings(engine):
    """Random patterns of the subset against random strings with quotes, backslashes and newlines: whatever the
    grammar admits, Python's re.search (jsonschema's matcher) matches; nearly always they agree exactly (the rest:
    `$` also matching before a final newline in Python)."""
    rng = random.Random(11)
    tried = agree = 0
    for _ in range(300):
        pattern = _random_pattern(rng)
        try:
            grammar = schema_to_gbnf({"type": "string", "pattern": pattern})
        except GrammarError:
            continue  # mostly repeated empty-matching parts, refused on purpose
        for _ in range(25):
            text = "".join(rng.choice('ab1-"\\. \n') for _ in range(rng.randint(0, 6)))
            admitted = engine.accepts(grammar, json.dumps(text))
            matches = bool(re.search(pattern, text))
            assert matches or not admitted, (pattern, text)
            tried += 1
            agree += admitted == matches
    assert tried >= 2000 and agree >= 0.98 * tried, (tried, agree)


def test_random_number_bounds_admit_only_valid_numbers(engine):
    import jsonschema

    rng = random.Random(5)
    tried = 0
    for _ in range(150):
        schema = {"type": rng.choice(["number", "integer"])}
        for side in ("inimum", "aximum"):
            if rng.random() < 0.7:
                schema[rng.choice(["m", "exclusiveM"]) + side] = rng.randint(-300, 300)
        try:
            grammar = schema_to_gbnf(schema)
        except GrammarError:
            continue  # empty ranges
        for _ in range(15):
            v = round(rng.uniform(-400, 400), rng.choice([0, 1, 2, 6]))
            text = rng.choice([str(int(v)), repr(v), f"{v:.3f}"])
            valid = jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))
            admitted = engine.accepts(grammar, text)
            assert valid or not admitted, (schema, text)
            plain = "e" not in text and (schema["type"] == "number" or "." not in text)
            assert admitted or not valid or not plain, (schema, text)  # a plain in-range decimal is admitted
            tried += 1
    assert tried >= 1500
