"""JSON Schema -> GBNF for response_format: a grammar that admits only valid JSON that validates against the schema.

Why our own converter: llama-cpp-python 0.3.36's json_schema_to_gbnf writes `char ::= [^"\\\\]`, which lets raw
control characters (a newline) into JSON strings, and it silently ignores constraints it does not know (maxLength,
pattern, minimum, ...), so "stop" answers could fail json.loads or the schema. Here every keyword is either
enforced exactly by the grammar or the schema is refused (GrammarError, a 400 naming the keyword and its place).

The grammar may admit a subset of the valid documents, never a superset. Supported (draft 2020-12 keywords):
  - type (a name or a list: ["string", "null"] is how a field is made nullable), enum, const (any JSON values)
  - string: minLength, maxLength, pattern (a regex subset, below), format date, time, date-time, uuid, email, ipv4
  - integer: minimum, maximum, exclusiveMinimum, exclusiveMaximum (any integers), format int32/int64 (other formats
    do not apply to numbers: jsonschema checks none)
  - number: the same bounds when they are whole numbers (a bounded number is written without an exponent and with
    at most 15 significant digits, so no decimal rounds onto an exclusive bound)
  - boolean, null
  - array: items, prefixItems, minItems, maxItems (uniqueItems only when maxItems <= 1)
  - object: properties, required, additionalProperties (false, true, absent or a schema; unevaluatedProperties
    stands in for it when it is absent, as no applicator may sit beside properties). Objects with declared
    properties are written with exactly those, in declared order, required ones always, optional ones when the
    model chooses; an object with no properties and a schema for additionalProperties is a map with string keys
  - anyOf; oneOf when its branches are provably disjoint (different JSON types, disjoint enum/const sets, or
    objects told apart by a required property with disjoint constant values); allOf of one schema
  - $ref to "#" or into the same document ($defs/definitions/...), recursion included (a rule refers to itself;
    the answer stays bounded by max_tokens)
  - annotations are ignored: title, description, default, examples, $comment, $schema, $id, deprecated, ...
Patterns: literals, escapes, ., classes [..] / [^..], \\d \\w \\s (and negations), groups (..) and (?:..), |,
quantifiers * + ? {n} {n,} {n,m} (lazy forms too), ^ and $ at the ends of a top-level branch. \\d, \\w and \\s are
enforced as their ASCII part (a subset of Python's Unicode classes, which is what jsonschema uses).
Refused: not, if/then/else, multipleOf, uniqueItems, contains, patternProperties, propertyNames, dependent*,
min/maxProperties, unevaluatedItems, $dynamicRef, OpenAPI's nullable, other formats, lookarounds, backreferences,
word boundaries, inline flags, a repeated part that can match the empty string ((a?)* hangs llama.cpp's grammar
engine), patterns Python's re cannot compile, repetition bounds above MAX_REPEAT, fractional bounds on numbers,
keywords beside $ref/anyOf/oneOf/allOf (an intersection the grammar cannot build), unknown keywords.
A $ref cycle that consumes nothing (left recursion) is refused by llama.cpp's compiler: check_grammar's 400.

Strings: no raw control characters, only JSON's escapes, no \\u escape of a surrogate, no raw DEL; llama.cpp
itself refuses malformed UTF-8 (lone continuation bytes, overlong forms) and the char class excludes surrogates, so
the text Python decodes is the text the grammar checked. Whitespace between tokens is bounded (one space, or one
newline and up to 20 spaces/tabs) so a model cannot pad forever.
"""

from __future__ import annotations

import json
import math
import re

from .errors import GrammarError

MAX_REPEAT = 2000  # llama.cpp's grammar parser refuses repetition counts above 2000 (MAX_REPETITION_THRESHOLD)
MAX_DEPTH = 64  # nesting of the schema itself (a deeper one is refused, not recursed into)
MAX_RULES = 4000  # grammar size: a schema needing more rules is refused
MAX_ENUM = 1000
# Branches llama.cpp follows side by side cost time on every token for every request in the batch (measured here:
# 300 object branches, 0.7 s a token over the full vocabulary); enum values share one trie instead.
MAX_BRANCHES = 32
INT_LIMIT = 10 ** 16 - 1  # an integer with no bound on one side stays within 16 digits (a subset of valid)
NUM_LIMIT = 10 ** 9 - 1  # a bounded number's open side stays within 9 integer digits (float rounding, below)

ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor",
               "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "contentMediaType",
               "contentEncoding", "discriminator", "$vocabulary"}
GENERIC = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
STRING_KW = {"minLength", "maxLength", "pattern", "format"}
NUMBER_KW = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "format"}
ARRAY_KW = {"items", "prefixItems", "minItems", "maxItems", "uniqueItems"}
OBJECT_KW = {"properties", "required", "additionalProperties", "unevaluatedProperties"}
KNOWN = ANNOTATIONS | GENERIC | STRING_KW | NUMBER_KW | ARRAY_KW | OBJECT_KW
REFUSED = {
    "not": "negation", "if": "conditionals", "then": "conditionals", "else": "conditionals",
    "multipleOf": "divisibility", "contains": "containment", "minContains": "containment",
    "maxContains": "containment", "patternProperties": "regex-named properties",
    "propertyNames": "constraints on property names", "dependentRequired": "dependencies",
    "dependentSchemas": "dependencies", "dependencies": "dependencies", "minProperties": "property counts",
    "maxProperties": "property counts", "unevaluatedItems": "unevaluated items", "additionalItems": "tuple arrays",
    "$dynamicRef": "dynamic references", "$recursiveRef": "dynamic references",
    "nullable": "OpenAPI's nullable (write the type as a list, e.g. [\"string\", \"null\"])",
}
ALL_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# The JSON text rules every grammar shares. A string character is anything but `"`, `\`, control characters, DEL,
# surrogates and values above U+10FFFF (llama.cpp decodes malformed UTF-8 into those; Python's decoder would turn
# them into U+FFFD and change the string), or one of JSON's escapes; \u never names a surrogate.
BASE_RULES = {
    "ws": r'| " " | "\n" [ \t]{0,20}',
    "char": r'[^"\\\x00-\x1F\x7F\uD800-\uDFFF\U00110000-\U001FFFFF] | "\\" (["\\/bfnrt] | "u" hex4)',
    "hex4": r'[0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}',
    "string": r'"\"" char* "\""',
    "number": r'"-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?',
    "integer": r'"-"? ("0" | [1-9] [0-9]{0,15})',
    "boolean": r'"true" | "false"',
    "null": r'"null"',
    "value": r'object | array | string | number | boolean | null',
    "object": r'"{" ws (string ws ":" ws value ws ("," ws string ws ":" ws value ws)*)? "}"',
    "array": r'"[" ws (value ws ("," ws value ws)*)? "]"',
}


def _refuse(path: str, message: str) -> GrammarError:
    """The 400 for a schema the grammar cannot enforce: one line naming the place and the keyword."""
    where = path or "/"
    if len(where) > 120:
        where = "..." + where[-117:]
    text = f"response_format schema at {where}: {message}"
    return GrammarError(re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text), param="response_format")


def gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _class_char(o: int) -> str:
    if 0x30 <= o <= 0x39 or 0x41 <= o <= 0x5A or 0x61 <= o <= 0x7A:
        return chr(o)
    if o <= 0xFF:
        return f"\\x{o:02X}"
    if o <= 0xFFFF:
        return f"\\u{o:04X}"
    return f"\\U{o:08X}"


def _json_escape(o: int) -> str:
    """The escape JSON writes for a character that cannot appear raw in a string."""
    short = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
    return short.get(o, f"\\u{o:04x}")


def _repeat(expr: str, lo: int, hi: int | None) -> str:
    if hi is not None and hi == lo:
        return "" if lo == 0 else (expr if lo == 1 else f"{expr}{{{lo}}}")
    if (lo, hi) == (0, None):
        return f"{expr}*"
    if (lo, hi) == (1, None):
        return f"{expr}+"
    if (lo, hi) == (0, 1):
        return f"{expr}?"
    return f"{expr}{{{lo},}}" if hi is None else f"{expr}{{{lo},{hi}}}"


def _alts(parts: list[str]) -> str:
    parts = list(dict.fromkeys(p for p in parts))
    if len(parts) == 1:
        return parts[0]
    return "(" + " | ".join(p if p else '""' for p in parts) + ")"


def _trie(texts: list[str]) -> str:
    """Alternatives of literal texts as a prefix tree: one grammar path per common prefix, so llama.cpp follows one
    stack instead of one per value (1000 enum values sharing a prefix: 0.44 s a token as plain alternatives)."""
    root: dict = {}
    for text in dict.fromkeys(texts):
        node = root
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = {}  # end of a text

    def emit(node: dict) -> str:
        alts = []
        for ch, child in node.items():
            if ch == "":
                alts.append('""')
                continue
            run = ch
            while len(child) == 1 and "" not in child:  # a chain without branches is one literal
                (nxt, child), = child.items()
                run += nxt
            rest = emit(child) if child != {"": {}} else ""
            alts.append(f"{gbnf_literal(run)} {rest}".strip())
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    return emit(root)


# ---------------------------------------------------------------- integer ranges as digit patterns
def _same_len(x: str, y: str) -> list[str]:
    """Sequences matching every decimal string of len(x) digits between x and y (x <= y)."""
    if not x:
        return [""]
    if x == y:
        return [gbnf_literal(x)]
    n = len(x) - 1
    tail = f" [0-9]{{{n}}}" if n > 1 else (" [0-9]" if n == 1 else "")
    if x[0] == y[0]:
        return [f'"{x[0]}" ' + _alts(_same_len(x[1:], y[1:]))]
    out = []
    lo, hi = int(x[0]), int(y[0])
    if x[1:] != "0" * n:
        out.append(f'"{x[0]}" ' + _alts(_same_len(x[1:], "9" * n)))
        lo += 1
    last = None
    if y[1:] != "9" * n:
        last = f'"{y[0]}" ' + _alts(_same_len("0" * n, y[1:]))
        hi -= 1
    if lo <= hi:
        out.append((f'"{lo}"' if lo == hi else f"[{lo}-{hi}]") + tail)
    if last is not None:
        out.append(last)
    return out


def _nonneg_range(a: int, b: int) -> str:
    """Decimal integers (no leading zeros, no sign) between a and b inclusive (0 <= a <= b)."""
    parts = []
    for length in range(len(str(a)), len(str(b)) + 1):
        lo = max(a, 10 ** (length - 1) if length > 1 else 0)
        hi = min(b, 10 ** length - 1)
        if lo <= hi:
            parts.extend(_same_len(str(lo), str(hi)))
    return _alts(parts)


def int_range(lo: int, hi: int) -> str:
    """JSON integers between lo and hi inclusive (lo <= hi)."""
    parts = []
    if lo < 0:
        parts.append('"-" ' + _nonneg_range(max(-hi, 1), -lo))
    if hi >= 0:
        parts.append(_nonneg_range(max(lo, 0), hi))
    return _alts(parts)


# ---------------------------------------------------------------- the regex subset
class _Set:
    """A character class: sorted, merged code point ranges."""

    def __init__(self, ranges):
        merged = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        self.ranges = merged

    def minus(self, other: "_Set") -> "_Set":
        out = []
        for lo, hi in self.ranges:
            cur = lo
            for olo, ohi in other.ranges:
                if ohi < cur or olo > hi:
                    continue
                if olo > cur:
                    out.append((cur, olo - 1))
                cur = max(cur, ohi + 1)
            if cur <= hi:
                out.append((cur, hi))
        return _Set(out)

    def union(self, other: "_Set") -> "_Set":
        return _Set(self.ranges + other.ranges)


UNIVERSE = _Set([(0, 0xD7FF), (0xE000, 0x10FFFF)])
ASCII = _Set([(0, 0x7F)])
# What Python's Unicode \d, \w, \s match among ASCII characters: enforced as these (a subset of the real classes).
SHORT = {"d": _Set([(0x30, 0x39)]), "w": _Set([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]),
         "s": _Set([(0x09, 0x0D), (0x1C, 0x20)])}
ESCAPED = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B}


class _Regex:
    """Parser of the supported regex subset into a small tree: ("set", _Set), ("seq", [..]), ("alt", [..]),
    ("rep", node, lo, hi), ("bol",), ("eol",)."""

    def __init__(self, pattern: str, path: str):
        self.p = pattern
        self.i = 0
        self.path = path

    def fail(self, what: str) -> GrammarError:
        return _refuse(self.path, f"`pattern` uses {what}, which the grammar cannot enforce; supported: literals, "
                                  "classes, groups, |, quantifiers, ^ and $ at the ends")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self):
        node = self.alt()
        if self.i != len(self.p):
            raise self.fail(f"an unbalanced `{self.p[self.i]}`")
        return node

    def alt(self):
        branches = [self.seq()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.seq())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def seq(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            atom = self.atom()
            items.append(self.quantified(atom))
        return ("seq", items)

    def quantified(self, atom):
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{":
                m = re.match(r"\{(\d*)(,?)(\d*)\}", self.p[self.i:])
                if not m or (not m.group(1) and not m.group(2)):
                    return atom  # Python reads a `{` that is no quantifier as a literal; the next atom takes it
                self.i += m.end()
                lo = int(m.group(1) or 0)
                hi = lo if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
                if hi is not None and hi < lo:
                    raise self.fail("a repetition {m,n} with n < m")
            else:
                return atom
            if atom[0] in ("bol", "eol"):
                raise self.fail("a quantified anchor")
            if self.peek() == "?":
                self.i += 1  # lazy: the same strings match
            elif self.peek() == "+":
                raise self.fail("a possessive quantifier")
            if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
                raise _refuse(self.path, f"`pattern` repeats more than {MAX_REPEAT} times")
            if atom[0] == "rep":
                raise self.fail("a repeated repetition")
            if _lengths(atom)[0] == 0 and (hi is None or hi > 1):
                # llama.cpp explores every way an empty-matching part can repeat: (a?){20}{20} hangs a request.
                raise self.fail("a repeated part that can match the empty string")
            atom = ("rep", atom, lo, hi)

    def atom(self):
        c = self.p[self.i]
        self.i += 1
        if c == "(":
            if self.peek() == "?":
                if self.p[self.i:self.i + 2] != "?:":
                    raise self.fail("a lookaround, named group or inline flag `(?`")
                self.i += 2
            node = self.alt()
            if self.peek() != ")":
                raise self.fail("an unclosed group")
            self.i += 1
            return node
        if c == "[":
            return ("set", self.klass())
        if c == ".":
            return ("set", UNIVERSE.minus(_Set([(0x0A, 0x0A)])))
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "\\":
            return ("set", self.escape(in_class=False))
        if c in "*+?":
            raise self.fail("a quantifier with nothing to repeat")
        return ("set", _Set([(ord(c), ord(c))]))

    def escape(self, in_class: bool) -> _Set:
        if self.i >= len(self.p):
            raise self.fail("a trailing backslash")
        c = self.p[self.i]
        self.i += 1
        if c.lower() in SHORT:
            base = SHORT[c.lower()]
            return base if c.islower() else ASCII.minus(base)
        if c in ESCAPED:
            return _Set([(ESCAPED[c], ESCAPED[c])])
        if c in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + n]
            if len(digits) != n or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"a malformed \\{c} escape")
            self.i += n
            o = int(digits, 16)
            if 0xD800 <= o <= 0xDFFF or o > 0x10FFFF:
                raise self.fail("an escape of a surrogate or non-character")
            return _Set([(o, o)])
        if c.isalnum() or c == "_":
            raise self.fail(f"the escape \\{c}")
        return _Set([(ord(c), ord(c))])

    def klass(self) -> _Set:
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        acc = _Set([])
        shorthand = False
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("an unclosed class `[`")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\":
                self.i += 1
                nxt = self.peek()
                shorthand |= nxt is not None and nxt.lower() in SHORT
                if nxt == "b":
                    raise self.fail("the escape \\b in a class")
                item = self.escape(in_class=True)
            else:
                self.i += 1
                item = _Set([(ord(c), ord(c))])
            if len(item.ranges) == 1 and item.ranges[0][0] == item.ranges[0][1] and self.peek() == "-" \
                    and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                end_c = self.p[self.i]
                self.i += 1
                if end_c == "\\":
                    end = self.escape(in_class=True)
                    if len(end.ranges) != 1 or end.ranges[0][0] != end.ranges[0][1]:
                        raise self.fail("a class range ending in a shorthand")
                    hi = end.ranges[0][0]
                else:
                    hi = ord(end_c)
                lo = item.ranges[0][0]
                if hi < lo:
                    raise self.fail("a reversed class range")
                item = _Set([(lo, hi)])
            acc = acc.union(item)
        if negated:
            # The complement of a class holding \d, \w or \s is taken among ASCII characters only: Python's versions
            # of those match non-ASCII characters too, which the complement must not admit.
            return (ASCII if shorthand else UNIVERSE).minus(acc)
        return acc.minus(_Set([(0xD800, 0xDFFF)]))


def _lengths(node) -> tuple[int, int | None]:
    """Fewest and most characters a regex node matches (None: unbounded)."""
    kind = node[0]
    if kind == "set":
        return 1, 1
    if kind in ("bol", "eol"):
        return 0, 0
    if kind == "seq":
        lo, hi = 0, 0
        for item in node[1]:
            a, b = _lengths(item)
            lo += a
            hi = None if hi is None or b is None else hi + b
        return lo, hi
    if kind == "alt":
        ls = [_lengths(b) for b in node[1]]
        return min(a for a, _ in ls), (None if any(b is None for _, b in ls) else max(b for _, b in ls))
    a, b = _lengths(node[1])
    return a * node[2], (None if node[3] is None or b is None else b * node[3])


# ---------------------------------------------------------------- formats, written in the regex subset
_YEAR = r"[1-9][0-9]{3}"
_MONTH_DAY = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
              r"|02-(?:0[1-9]|1[0-9]|2[0-8]))")  # no 29 February: every date the grammar admits exists
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
FORMATS = {
    "date": f"^{_YEAR}-{_MONTH_DAY}$",
    "time": f"^{_TIME}$",
    "date-time": f"^{_YEAR}-{_MONTH_DAY}T{_TIME}$",
    "uuid": r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    "email": r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,4}$",
    "ipv4": rf"^{_OCTET}(?:\.{_OCTET}){{3}}$",
}


def _canon(value) -> str:
    """Equality as JSON Schema sees it (1 == 1.0, true != 1), as a string."""
    def norm(v):
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)):
            return int(v) if float(v).is_integer() else v
        if isinstance(v, list):
            return [norm(x) for x in v]
        return {k: norm(x) for k, x in v.items()}
    return json.dumps(["b" if isinstance(value, bool) else "v", norm(value)], sort_keys=True)


def _type_of(value) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    if isinstance(value, str):
        return {"string"}
    return {"array"} if isinstance(value, list) else {"object"}


def _nonneg_int(value, keyword: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
            (isinstance(value, float) and not value.is_integer()):
        raise _refuse(path, f"`{keyword}` must be a non-negative integer")
    if value > MAX_REPEAT:
        raise _refuse(path, f"`{keyword}` above {MAX_REPEAT} cannot be enforced by the grammar; lower it")
    return int(value)


class _Converter:
    def __init__(self, root: dict):
        self.root = root
        self.rules: dict[str, str] = dict(BASE_RULES)
        self.by_body: dict[str, str] = {}
        self.refs: dict[str, str] = {}
        self.depth = 0

    def rule(self, hint: str, body: str) -> str:
        """A named rule for `body` (rules with the same body are shared)."""
        if body in self.by_body:
            return self.by_body[body]
        if len(self.rules) >= MAX_RULES:
            raise _refuse("", f"the schema needs more than {MAX_RULES} grammar rules; simplify it")
        name = f"{re.sub(r'[^a-zA-Z0-9]+', '-', hint).strip('-')[:40] or 'r'}-{len(self.rules)}"
        self.rules[name] = body
        self.by_body[body] = name
        return name

    def rep(self, expr: str, lo: int, hi: int | None) -> str:
        """expr repeated; a compound expr becomes its own rule first, because llama.cpp refuses a repetition whose
        count times the repeated symbols exceeds 2000."""
        if not re.fullmatch(r"[a-zA-Z0-9-]+", expr):
            if max(lo, hi or 0) > 1:
                expr = self.rule("item", expr)
            elif not re.fullmatch(r'\[[^\]]*\]|"[^"\\]*"', expr):
                expr = f"({expr})"
        return _repeat(expr, lo, hi)

    def grammar(self, root_expr: str) -> str:
        lines = [f"root ::= {root_expr}"] + [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ dispatch
    def value(self, s, path: str) -> str:
        if s is True or s == {}:
            return "value"
        if s is False:
            raise _refuse(path, "the schema `false` admits no value")
        if not isinstance(s, dict):
            raise _refuse(path, "a schema must be an object or a boolean")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _refuse(path, f"the schema nests deeper than {MAX_DEPTH} levels")
            return self._value(s, path)
        finally:
            self.depth -= 1

    def _check_keywords(self, s: dict, path: str) -> None:
        for key in s:
            if key in REFUSED:
                raise _refuse(path, f"`{key}` ({REFUSED[key]}) cannot be enforced by the grammar; remove it")
            if key not in KNOWN and not key.startswith("x-"):
                raise _refuse(path, f"unknown keyword `{key}`; remove it or use a supported one")
        if s.get("uniqueItems") is True and not (isinstance(s.get("maxItems"), int) and s["maxItems"] <= 1):
            raise _refuse(path, "`uniqueItems` cannot be enforced by the grammar; remove it")
        if isinstance(s.get("items"), list):
            raise _refuse(path, "`items` as a list (tuple arrays) is not supported; use `prefixItems`")

    def _value(self, s: dict, path: str) -> str:
        self._check_keywords(s, path)
        constraining = [k for k in s if k not in ANNOTATIONS and not k.startswith("x-")]
        if "$ref" in s:
            others = [k for k in constraining if k != "$ref"]
            if others:
                raise _refuse(path, f"`$ref` next to `{others[0]}` is not supported; move it into the referenced schema")
            return self.ref(s["$ref"], path)
        for key in ("anyOf", "oneOf", "allOf"):
            if key in s:
                others = [k for k in constraining if k != key]
                if others:
                    raise _refuse(path, f"`{key}` next to `{others[0]}` is not supported; move it into each branch")
                branches = s[key]
                if not isinstance(branches, list) or not branches:
                    raise _refuse(path, f"`{key}` must be a non-empty list")
                if key == "allOf":
                    if len(branches) != 1:
                        raise _refuse(path, "`allOf` of several schemas is not supported; merge them into one")
                    return self.value(branches[0], f"{path}/allOf/0")
                if len(branches) > MAX_BRANCHES:
                    raise _refuse(path, f"`{key}` has more than {MAX_BRANCHES} branches; use `enum` for many "
                                        "constants")
                if key == "oneOf":
                    self._check_disjoint(branches, path)
                return _alts([self.value(b, f"{path}/{key}/{i}") for i, b in enumerate(branches)])
        types = s.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not isinstance(types, list) or not types or any(t not in ALL_TYPES for t in types):
                raise _refuse(path, f"`type` must be one of {', '.join(ALL_TYPES)} or a list of them")
        if "enum" in s or "const" in s:
            return self.literals(s, types, constraining, path)
        if types is None:
            # No type: the keywords present say which kinds of value they constrain; output one of those kinds.
            types = _inferred_types(s)
            if not types:
                return "value"
        return _alts([self.typed(t, s, path) for t in dict.fromkeys(types)])

    def typed(self, t: str, s: dict, path: str) -> str:
        if t == "string":
            return self.string(s, path)
        if t == "integer":
            return self.integer(s, path)
        if t == "number":
            return self.number(s, path)
        if t == "object":
            return self.object(s, path)
        if t == "array":
            return self.array(s, path)
        return t  # boolean, null: base rules

    # ------------------------------------------------------------ $ref
    def resolve(self, ref, path: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _refuse(path, f"`$ref` {ref!r} is not a reference inside this schema (#/...)")
        node = self.root
        if ref not in ("#", "#/"):
            if not ref.startswith("#/"):
                raise _refuse(path, f"`$ref` {ref!r}: only JSON pointers (#/...) are supported")
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                    node = node[int(part)]
                else:
                    raise _refuse(path, f"`$ref` {ref!r} points at nothing")
        return node

    def ref(self, ref, path: str) -> str:
        if ref in self.refs:
            return self.refs[ref]
        target = self.resolve(ref, path)
        if len(self.rules) >= MAX_RULES:
            raise _refuse("", f"the schema needs more than {MAX_RULES} grammar rules; simplify it")
        name = f"ref-{len(self.rules)}"
        self.refs[ref] = name
        self.rules[name] = '""'  # reserved: a recursive reference meets this name while its body is built
        self.rules[name] = self.value(target, ref[1:] or "/")
        return name

    # ------------------------------------------------------------ enum / const
    def literals(self, s: dict, types, constraining: list[str], path: str) -> str:
        others = [k for k in constraining if k not in ("enum", "const", "type")]
        if others:
            raise _refuse(path, f"`enum`/`const` next to `{others[0]}` is not supported; list only valid values")
        values = None
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise _refuse(path, "`enum` must be a non-empty list")
            if len(s["enum"]) > MAX_ENUM:
                raise _refuse(path, f"`enum` lists more than {MAX_ENUM} values")
            values = list(s["enum"])
        if "const" in s:
            values = [v for v in (values if values is not None else [s["const"]]) if _canon(v) == _canon(s["const"])]
        if types is not None:
            values = [v for v in values if _type_of(v) & set(types)]
        if not values:
            raise _refuse(path, "no value satisfies `enum`/`const` together with `type`")
        out = []
        for v in values:
            try:
                text = json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            except ValueError:
                raise _refuse(path, "`enum`/`const` holds a value that is not JSON") from None
            out.append(text)
        return _trie(out)

    # ------------------------------------------------------------ strings
    def string(self, s: dict, path: str) -> str:
        min_len = _nonneg_int(s.get("minLength", 0), "minLength", path)
        max_len = _nonneg_int(s["maxLength"], "maxLength", path) if "maxLength" in s else None
        if max_len is not None and max_len < min_len:
            raise _refuse(path, "`maxLength` is below `minLength`")
        pattern, fmt = s.get("pattern"), s.get("format")
        if fmt is not None:
            if fmt not in FORMATS:
                raise _refuse(path, f"`format` {fmt!r} cannot be enforced by the grammar; supported: "
                                    f"{', '.join(FORMATS)}")
            if pattern is not None:
                raise _refuse(path, "`format` together with `pattern` is not supported; keep one")
            pattern = FORMATS[fmt]
        if pattern is None:
            return self.rule("str", f'"\\"" {_repeat("char", min_len, max_len)} "\\""')
        if not isinstance(pattern, str):
            raise _refuse(path, "`pattern` must be a string")
        try:
            re.compile(pattern)  # jsonschema matches with Python's re: a pattern it cannot compile is no schema
        except (re.error, RecursionError, OverflowError) as exc:
            raise _refuse(path, f"`pattern` is not a valid regular expression ({exc})") from None
        return self.rule("pattern", f'"\\"" {self.pattern(pattern, min_len, max_len, path)} "\\""')

    def pattern(self, pattern: str, min_len: int, max_len: int | None, path: str) -> str:
        tree = _Regex(pattern, path).parse()
        branches = tree[1] if tree[0] == "alt" else [tree]
        parts = []
        bounds = []
        for branch in branches:
            items = list(branch[1]) if branch[0] == "seq" else [branch]
            start = bool(items) and items[0][0] == "bol"
            end = bool(items) and items[-1][0] == "eol"
            body = items[int(start):len(items) - int(end)]
            if any(it[0] in ("bol", "eol") for it in body) or _has_anchor_inside(body):
                raise _Regex(pattern, path).fail("`^` or `$` inside the pattern")
            if start and end and len(body) == 1 and body[0][0] == "rep" and body[0][1][0] == "set" \
                    and (min_len or max_len is not None):
                # ^[class]{m,n}$ with minLength/maxLength: one repetition with both bounds.
                _, node, lo, hi = body[0]
                lo, hi = max(lo, min_len), (max_len if hi is None else (hi if max_len is None else min(hi, max_len)))
                if hi is not None and hi < lo:
                    raise _refuse(path, "`pattern` and `minLength`/`maxLength` admit no string together")
                body = [("rep", node, lo, hi)]
            lo, hi = _lengths(("seq", body))
            if not start or not end:
                hi = None
            bounds.append((lo, hi))
            expr = " ".join(self.node(it, path) for it in body) or '""'
            pre = "" if start else "char* "
            post = "" if end else " char*"
            parts.append(f"{pre}{expr}{post}".strip())
        if min_len or max_len is not None:
            # Length keywords beside a pattern are honoured only when the pattern already implies them.
            if any(lo < min_len or (max_len is not None and (hi is None or hi > max_len)) for lo, hi in bounds):
                raise _refuse(path, "`pattern` together with `minLength`/`maxLength` is supported only when the "
                                    "pattern is ^[class]{m,n}$ or implies the lengths itself; put the length "
                                    "into the pattern")
        return _alts([f"({p})" if " " in p else p for p in parts])

    def node(self, node, path: str) -> str:
        kind = node[0]
        if kind == "set":
            return self.charset(node[1], path)
        if kind == "seq":
            inner = " ".join(self.node(it, path) for it in node[1])
            return f"({inner})" if inner else '""'
        if kind == "alt":
            return _alts([self.node(b, path) for b in node[1]])
        inner = self.node(node[1], path)
        return self.rep(inner, node[2], node[3]) or '""'

    def charset(self, cs: _Set, path: str) -> str:
        """One string character of the class, as JSON writes it (raw, or escaped where JSON requires)."""
        special = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
        raw = cs.minus(_Set(special))
        alts = []
        if raw.ranges:
            alts.append("[" + "".join(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"
                                      for lo, hi in raw.ranges) + "]")
        for lo, hi in _Set(special).ranges:
            for o in range(lo, hi + 1):
                if o != 0x7F and any(a <= o <= b for a, b in cs.ranges):
                    alts.append(gbnf_literal(_json_escape(o)))
        if not alts:
            raise _refuse(path, "`pattern` has a class that matches no character")
        return self.rule("cls", _alts(alts)) if len(alts) > 1 else alts[0]

    # ------------------------------------------------------------ numbers
    def _bounds(self, s: dict, path: str):
        out = {}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in s:
                v = s[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise _refuse(path, f"`{key}` must be a number")
                out[key] = v
        return out

    def integer(self, s: dict, path: str) -> str:
        b = self._bounds(s, path)
        lo = hi = None
        if "minimum" in b:
            lo = math.ceil(b["minimum"])
        if "exclusiveMinimum" in b:
            v = math.floor(b["exclusiveMinimum"]) + 1
            lo = v if lo is None else max(lo, v)
        if "maximum" in b:
            hi = math.floor(b["maximum"])
        if "exclusiveMaximum" in b:
            v = math.ceil(b["exclusiveMaximum"]) - 1
            hi = v if hi is None else min(hi, v)
        fmt = s.get("format")
        if fmt in ("int32", "int64"):  # other formats do not apply to numbers (jsonschema checks none on them)
            bits = 31 if fmt == "int32" else 63
            lo = -(2 ** bits) if lo is None else max(lo, -(2 ** bits))
            hi = 2 ** bits - 1 if hi is None else min(hi, 2 ** bits - 1)
        if lo is None and hi is None:
            return "integer"
        lo = -INT_LIMIT if lo is None else lo
        hi = INT_LIMIT if hi is None else hi
        if lo > hi:
            raise _refuse(path, "no integer lies within the bounds")
        return self.rule("int", int_range(lo, hi))

    def number(self, s: dict, path: str) -> str:
        b = self._bounds(s, path)
        if not b:
            return "number"
        for key, v in b.items():
            if not float(v).is_integer():
                raise _refuse(path, f"`{key}` {v} on a number cannot be enforced exactly by the grammar; use whole "
                                    "numbers (scale the unit) or an integer type")
        lo, lo_x, hi, hi_x = None, False, None, False
        if "minimum" in b:
            lo = int(b["minimum"])
        if "exclusiveMinimum" in b and (lo is None or int(b["exclusiveMinimum"]) >= lo):
            lo, lo_x = int(b["exclusiveMinimum"]), True
        if "maximum" in b:
            hi = int(b["maximum"])
        if "exclusiveMaximum" in b and (hi is None or int(b["exclusiveMaximum"]) <= hi):
            hi, hi_x = int(b["exclusiveMaximum"]), True
        lo = -NUM_LIMIT if lo is None else lo
        hi = NUM_LIMIT if hi is None else hi
        if lo > hi or (lo == hi and (lo_x or hi_x)):
            raise _refuse(path, "no number lies within the bounds")
        # Fraction digits: with at most 15 significant digits in all, a decimal strictly inside an exclusive bound
        # never rounds onto it as a double.
        frac = min(6, 15 - len(str(max(abs(lo), abs(hi)))))
        parts = []
        if hi > 0 or (hi == 0 and not hi_x):  # x >= 0
            a, a_x = (lo, lo_x) if lo >= 0 else (0, False)
            parts.append(self._magnitude(a, a_x, hi, hi_x, frac))
        if lo < 0:  # x <= 0, written as "-" and its magnitude
            if hi >= 0:
                a, a_x = 0, hi == 0 and hi_x
            else:
                a, a_x = -hi, hi_x
            parts.append('"-" ' + self._magnitude(a, a_x, -lo, lo_x, frac))
        return self.rule("num", _alts([p for p in parts if p]))

    @staticmethod
    def _magnitude(a: int, a_x: bool, b: int, b_x: bool, frac: int) -> str:
        """Unsigned decimals m with a <(=) m <(=) b (integers a <= b), no exponent."""
        any_frac = f'("." [0-9]{{1,{frac}}})?' if frac > 0 else ""
        zero_frac = f'("." "0"{{1,{frac}}})?' if frac > 0 else ""
        nonzero_frac = f'"." "0"{{0,{frac - 1}}} [1-9] [0-9]{{0,{frac - 1}}}' if frac > 0 else None
        parts = []
        if a == b:
            return f"{_nonneg_range(a, a)} {zero_frac}".strip() if not (a_x or b_x) else ""
        if a_x:
            if nonzero_frac:
                parts.append(f"{_nonneg_range(a, a)} {nonzero_frac}")
        else:
            parts.append(f"{_nonneg_range(a, a)} {any_frac}".strip())
        if a + 1 <= b - 1:
            parts.append(f"{_nonneg_range(a + 1, b - 1)} {any_frac}".strip())
        if not b_x:
            parts.append(f"{_nonneg_range(b, b)} {zero_frac}".strip())
        return _alts([f"({p})" for p in parts]) if parts else ""

    # ------------------------------------------------------------ arrays
    def array(self, s: dict, path: str) -> str:
        prefix = s.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise _refuse(path, "`prefixItems` must be a list")
        items = s.get("items", True)
        min_items = _nonneg_int(s.get("minItems", 0), "minItems", path)
        max_items = _nonneg_int(s["maxItems"], "maxItems", path) if "maxItems" in s else None
        k = len(prefix)
        if max_items is not None and max_items < max(min_items, k):
            raise _refuse(path, "`maxItems` is below `minItems` or the number of `prefixItems`")
        rest_min = max(0, min_items - k)
        rest_max = None if max_items is None else max_items - k
        if items is False:
            if rest_min:
                raise _refuse(path, "`minItems` needs more items than `prefixItems` and `items` is false")
            rest_max = 0
        elems = [self.value(p, f"{path}/prefixItems/{i}") for i, p in enumerate(prefix)]
        item = self.value(items, f"{path}/items") if rest_max != 0 else None
        head = " \",\" ws ".join(f"{e} ws" for e in elems)
        if item is None:
            body = head
        elif not elems:
            first = f"{item} ws"
            more = self.rep(f'"," ws {item} ws', max(rest_min - 1, 0), None if rest_max is None else rest_max - 1)
            body = f"{first} {more}".strip()
            if rest_min == 0:
                body = f"({body})?"
        else:
            more = self.rep(f'"," ws {item} ws', rest_min, rest_max)
            body = f"{head} {more}".strip()
        return self.rule("arr", f'"[" ws {body} "]"'.replace("  ", " "))

    # ------------------------------------------------------------ objects
    def object(self, s: dict, path: str) -> str:
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise _refuse(path, "`properties` must be an object")
        required = s.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise _refuse(path, "`required` must be a list of names")
        # With no applicator beside it (anyOf/allOf/$ref next to properties are refused), unevaluatedProperties
        # governs the same properties additionalProperties would.
        addl = s.get("additionalProperties", s.get("unevaluatedProperties", True))
        if not isinstance(addl, (bool, dict)):
            raise _refuse(path, "`additionalProperties` must be a boolean or a schema")
        props = dict(props)
        for name in required:
            if name not in props:
                if addl is False:
                    raise _refuse(path, f"required property {name!r} is not in `properties` and "
                                        "additionalProperties is false")
                props[name] = addl  # written with the schema that extra properties must match
        if not props:
            if addl is False:
                return '"{" ws "}"'
            value = self.value(addl, f"{path}/additionalProperties")
            kv = f'string ws ":" ws {value} ws'
            return self.rule("map", f'"{{" ws ({kv} ("," ws {kv})*)? "}}"')
        req = set(required)
        kvs = [(name in req, self.rule("kv", f'{gbnf_literal(json.dumps(name, ensure_ascii=False))} ws ":" ws '
                                             f'{self.value(sub, f"{path}/properties/{_pointer(name)}")} ws'))
               for name, sub in props.items()]
        # after[i]: properties i.. once one was written (each is preceded by a comma); start[i]: none written yet.
        after = [""] * (len(kvs) + 1)
        for i in range(len(kvs) - 1, -1, -1):
            is_req, kv = kvs[i]
            piece = f'"," ws {kv}' if is_req else f'("," ws {kv})?'
            after[i] = f"{piece} {after[i + 1]}".strip()
        start = ""
        first_req = next((i for i, (is_req, _) in enumerate(kvs) if is_req), len(kvs) - 1)
        for i in range(first_req, -1, -1):
            is_req, kv = kvs[i]
            first = f"{kv} {after[i + 1]}".strip()
            if is_req:
                start = first
            else:
                start = _alts([f"({first})", f"({start})" if start else '""'])
            start = self.rule("props", start) if i else start
        return self.rule("obj", f'"{{" ws {start} "}}"')

    # ------------------------------------------------------------ oneOf
    def _check_disjoint(self, branches: list, path: str) -> None:
        infos = [self._info(b, f"{path}/oneOf/{i}", 0) for i, b in enumerate(branches)]
        for i in range(len(infos)):
            for j in range(i + 1, len(infos)):
                if not _disjoint(infos[i], infos[j]):
                    raise _refuse(path, f"`oneOf` branches {i} and {j} may both match one value, which the grammar "
                                        "cannot rule out; use `anyOf`, or tell them apart by type, by const values "
                                        "or by a required property with const values")

    def _info(self, s, path: str, depth: int) -> dict:
        """What values a schema can produce: kinds (JSON types), values (a finite set, or None), tags (required
        properties with a finite set of values) - only as precise as the disjointness check needs."""
        kinds_all = {"object", "array", "string", "int", "frac", "boolean", "null"}
        if depth > MAX_DEPTH or not isinstance(s, dict) or s == {}:
            return {"kinds": kinds_all, "values": None, "tags": {}}
        if "$ref" in s:
            return self._info(self.resolve(s["$ref"], path), path, depth + 1)
        for key in ("anyOf", "oneOf"):
            if isinstance(s.get(key), list):
                subs = [self._info(b, path, depth + 1) for b in s[key]]
                values = None if any(x["values"] is None for x in subs) else set().union(*(x["values"] for x in subs))
                return {"kinds": set().union(*(x["kinds"] for x in subs)), "values": values, "tags": {}}
        if isinstance(s.get("allOf"), list) and len(s["allOf"]) == 1:
            return self._info(s["allOf"][0], path, depth + 1)
        if "enum" in s or "const" in s:
            vals = s["enum"] if isinstance(s.get("enum"), list) else [s.get("const")]
            if "const" in s:
                vals = [s["const"]]
            kinds = set()
            for v in vals:
                t = _type_of(v)
                kinds |= {"int"} if "integer" in t else ({"frac"} if t == {"number"} else t)
            return {"kinds": kinds, "values": {_canon(v) for v in vals}, "tags": {}}
        types = s.get("type")
        types = [types] if isinstance(types, str) else types
        if not types:
            types = _inferred_types(s) or ALL_TYPES
        kinds = set()
        for t in types:
            kinds |= {"integer": {"int"}, "number": {"int", "frac"}}.get(t, {t})
        tags = {}
        if kinds == {"object"} and isinstance(s.get("properties"), dict):
            for name in s.get("required", []):
                sub = s["properties"].get(name)
                if sub is not None:
                    info = self._info(sub, path, depth + 1)
                    if info["values"] is not None:
                        tags[name] = info["values"]
        return {"kinds": kinds, "values": None, "tags": tags}


def _inferred_types(s: dict) -> list[str]:
    """The kinds of value a schema without `type` is written as: those its keywords constrain."""
    kw = set(s)
    return [t for t, keys in (("object", OBJECT_KW), ("array", ARRAY_KW), ("string", STRING_KW),
                              ("number", NUMBER_KW - {"format"})) if kw & keys]


def _disjoint(a: dict, b: dict) -> bool:
    if not a["kinds"] & b["kinds"]:
        return True
    if a["values"] is not None and b["values"] is not None and not a["values"] & b["values"]:
        return True
    return a["kinds"] == b["kinds"] == {"object"} and any(
        name in b["tags"] and not a["tags"][name] & b["tags"][name] for name in a["tags"])


def _has_anchor_inside(items) -> bool:
    for it in items:
        if it[0] in ("bol", "eol"):
            return True
        if it[0] == "seq" and _has_anchor_inside(it[1]):
            return True
        if it[0] == "alt" and _has_anchor_inside(it[1]):
            return True
        if it[0] == "rep" and _has_anchor_inside([it[1]]):
            return True
    return False


def _pointer(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def schema_to_gbnf(schema) -> str:
    """GBNF admitting only JSON documents valid against `schema`; GrammarError (400) for what it cannot enforce."""
    if not isinstance(schema, (dict, bool)):
        raise _refuse("", "the schema must be a JSON object")
    conv = _Converter(schema if isinstance(schema, dict) else {})
    try:
        root = conv.value(schema, "")
    except RecursionError:
        raise _refuse("", "the schema nests too deeply") from None
    return conv.grammar(root)


def any_object_gbnf() -> str:
    """GBNF for response_format json_object: any JSON object, with the same string and whitespace rules."""
    return _Converter({}).grammar("object")
