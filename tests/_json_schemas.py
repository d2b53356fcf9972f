"""Structured-output test set: schemas the grammar supports (with a prompt, and JSON texts it must admit and
reject), and schemas it must refuse (with the keyword the 400 must name). Shared by the fast and real-model tests."""

from __future__ import annotations

import datetime
import json

import jsonschema

Q = json.dumps  # a JSON text of a Python value


def case(name, schema, prompt, valid=(), invalid=(), walks_end=True):
    """walks_end=False: a random walk through the grammar is not expected to finish (an unanchored pattern needs
    its literal text, which random characters rarely spell)."""
    return {"name": name, "schema": schema, "prompt": prompt, "valid": list(valid), "invalid": list(invalid),
            "walks_end": walks_end}


ADDRESS = {"type": "object", "properties": {"street": {"type": "string", "maxLength": 40},
                                            "city": {"type": "string", "maxLength": 30},
                                            "postcode": {"type": "string", "pattern": "^[A-Z]{1,2}[0-9]{1,2} [0-9][A-Z]{2}$"}},
           "required": ["street", "city", "postcode"], "additionalProperties": False}

CASES = [
    case("intent", {"type": "object", "properties": {"intent": {"type": "string"}}, "required": ["intent"]},
         "What is the intent of: 'I lost my card yesterday'?",
         valid=['{"intent":"lost_card"}', '{"intent": "a\\nb"}', '{\n  "intent": "x"\n}'],
         invalid=['{"intent":"a\nb"}', '{"intent":"tab\there"}', '{"intent":"\\x"}', '{"intent":"\\ud800"}',
                  '{"intent":1}', '{}', '{"intent":"a"', '{"intent":"a"}}']),
    case("intent_enum", {"type": "object", "properties": {"intent": {"type": "string", "enum": [
        "lost_card", "balance", "transfer", "other"]}}, "required": ["intent"], "additionalProperties": False},
         "Classify: 'how much money do I have?'",
         valid=['{"intent":"balance"}'], invalid=['{"intent":"Balance"}', '{"intent":"balance","x":1}']),
    case("customer", {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 30},
                                                       "age": {"type": "integer", "minimum": 18, "maximum": 120}},
                      "required": ["name", "age"], "additionalProperties": False},
         "Invent a bank customer.",
         valid=['{"name":"Ann","age":18}', '{"name":"Bo","age":120}'],
         invalid=['{"name":"","age":30}', '{"name":"Ann","age":17}', '{"name":"Ann","age":121}',
                  '{"name":"Ann","age":30.5}', '{"age":30,"name":"Ann"}']),
    case("transaction", {"type": "object", "properties": {
        "amount": {"type": "number", "minimum": 0, "maximum": 1000000},
        "currency": {"type": "string", "enum": ["GBP", "EUR", "USD"]},
        "date": {"type": "string", "format": "date"}}, "required": ["amount", "currency", "date"],
        "additionalProperties": False},
         "Describe a card payment of 12.50 pounds made on 3 March 2024.",
         valid=['{"amount":12.5,"currency":"GBP","date":"2024-03-03"}', '{"amount":1000000,"currency":"EUR","date":"1999-12-31"}'],
         invalid=['{"amount":-1,"currency":"GBP","date":"2024-03-03"}', '{"amount":1000000.5,"currency":"GBP","date":"2024-03-03"}',
                  '{"amount":1,"currency":"GBP","date":"2024-02-30"}', '{"amount":1,"currency":"GBP","date":"2024-13-01"}',
                  '{"amount":1e3,"currency":"GBP","date":"2024-03-03"}']),
    case("nullable", {"type": "object", "properties": {"reference": {"type": ["string", "null"], "maxLength": 12}},
                      "required": ["reference"], "additionalProperties": False},
         "Give the payment reference of a transfer that had none.",
         valid=['{"reference":null}', '{"reference":"INV-1"}'], invalid=['{"reference":"ABCDEFGHIJKLMN"}', '{"reference":1}']),
    case("tags", {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 15},
                                                            "minItems": 1, "maxItems": 3}},
                  "required": ["tags"], "additionalProperties": False},
         "Give up to three tags for a mortgage enquiry.",
         valid=['{"tags":["a"]}', '{"tags":["a","b","c"]}'], invalid=['{"tags":[]}', '{"tags":["a","b","c","d"]}']),
    case("address", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "address": ADDRESS},
                     "required": ["name", "address"], "additionalProperties": False},
         "Give a UK customer's name and postal address.",
         valid=['{"name":"A","address":{"street":"1 High St","city":"Leeds","postcode":"LS1 4AB"}}'],
         invalid=['{"name":"A","address":{"street":"1 High St","city":"Leeds","postcode":"ls1 4ab"}}']),
    case("iban", {"type": "object", "properties": {"iban": {"type": "string", "pattern": "^GB[0-9]{2}[A-Z]{4}[0-9]{14}$"}},
                  "required": ["iban"], "additionalProperties": False},
         "Write an example UK IBAN.",
         valid=['{"iban":"GB29NWBK60161331926819"}'], invalid=['{"iban":"GB29NWBK6016133192681"}', '{"iban":"gb29NWBK60161331926819"}']),
    case("uuid", {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"],
                  "additionalProperties": False},
         "Give a new request id.",
         valid=['{"id":"123e4567-e89b-12d3-a456-426614174000"}'], invalid=['{"id":"123e4567e89b12d3a456426614174000"}']),
    case("datetime", {"type": "object", "properties": {"at": {"type": "string", "format": "date-time"},
                                                       "until": {"type": "string", "format": "time"}},
                      "required": ["at"], "additionalProperties": False},
         "When was the last login? Give an ISO timestamp.",
         valid=['{"at":"2024-05-01T10:00:00Z"}', '{"at":"2024-05-01T10:00:00.123+01:00","until":"23:59:59Z"}'],
         invalid=['{"at":"2024-05-01 10:00:00"}', '{"at":"2024-05-01T24:00:00Z"}']),
    case("flags", {"type": "object", "properties": {"fraud": {"type": "boolean"}, "urgent": {"type": "boolean"}},
                   "required": ["fraud", "urgent"], "additionalProperties": False},
         "Is 'someone took money from my account without asking' fraud, and is it urgent?",
         valid=['{"fraud":true,"urgent":false}'], invalid=['{"fraud":"yes","urgent":false}', '{"fraud":true}']),
    case("any_of", {"type": "object", "properties": {"account": {"anyOf": [
        {"type": "string", "pattern": "^[0-9]{8}$"}, {"type": "integer", "minimum": 0, "maximum": 99999999}]}},
        "required": ["account"], "additionalProperties": False},
         "Give an 8-digit account number.",
         valid=['{"account":"12345678"}', '{"account":12345678}'], invalid=['{"account":"1234567"}', '{"account":-1}']),
    case("one_of_tagged", {"type": "object", "properties": {"event": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "deposit"}, "amount": {"type": "integer", "minimum": 1}},
         "required": ["kind", "amount"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "close"}, "reason": {"type": "string", "maxLength": 40}},
         "required": ["kind", "reason"], "additionalProperties": False}]}}, "required": ["event"],
        "additionalProperties": False},
         "A customer deposits 50 pounds. Describe the event.",
         valid=['{"event":{"kind":"deposit","amount":50}}', '{"event":{"kind":"close","reason":"moving"}}'],
         invalid=['{"event":{"kind":"deposit","reason":"x"}}']),
    case("defs_ref", {"$defs": {"money": {"type": "object", "properties": {
        "value": {"type": "integer", "minimum": 0}, "currency": {"enum": ["GBP", "EUR"]}},
        "required": ["value", "currency"], "additionalProperties": False}},
        "type": "object", "properties": {"balance": {"$ref": "#/$defs/money"}, "overdraft": {"$ref": "#/$defs/money"}},
        "required": ["balance", "overdraft"], "additionalProperties": False},
         "Give a current account's balance and overdraft limit.",
         valid=['{"balance":{"value":10,"currency":"GBP"},"overdraft":{"value":0,"currency":"EUR"}}'],
         invalid=['{"balance":{"value":10,"currency":"USD"},"overdraft":{"value":0,"currency":"EUR"}}']),
    case("recursive", {"$defs": {"node": {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 20},
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["label"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
         "Give a tiny tree of bank product categories.",
         valid=['{"label":"a","children":[{"label":"b"},{"label":"c","children":[]}]}'],
         invalid=['{"label":"a","children":[{"label":"b"},{"label":"c"},{"label":"d"}]}']),
    case("const", {"type": "object", "properties": {"version": {"const": 2}, "ok": {"const": True}},
                   "required": ["version", "ok"], "additionalProperties": False},
         "Acknowledge with version 2.",
         valid=['{"version":2,"ok":true}'], invalid=['{"version":3,"ok":true}', '{"version":2,"ok":1}']),
    case("mixed_enum", {"enum": [1, "two", None, True, {"a": [1]}]}, "Pick any.",
         valid=["1", '"two"', "null", "true", '{"a":[1]}'], invalid=["2", '"three"', "false"]),
    case("map", {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100}},
         "Give percentages per product: savings, loans.",
         valid=['{}', '{"savings":40,"loans":60}'], invalid=['{"savings":101}', '{"savings":"40"}']),
    case("lengths", {"type": "object", "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 6}},
                     "required": ["code"], "additionalProperties": False},
         "Make up a short branch code.",
         valid=['{"code":"abc"}', '{"code":"abcdef"}', '{"code":"a\\"b"}'], invalid=['{"code":"ab"}', '{"code":"abcdefg"}']),
    case("exclusive_int", {"type": "object", "properties": {"rating": {"type": "integer", "exclusiveMinimum": 0,
                                                                       "exclusiveMaximum": 10}},
                           "required": ["rating"], "additionalProperties": False},
         "Rate our service from 1 to 9.",
         valid=['{"rating":1}', '{"rating":9}'], invalid=['{"rating":0}', '{"rating":10}', '{"rating":-3}']),
    case("negative_number", {"type": "object", "properties": {"loss": {"type": "number", "maximum": -1, "minimum": -500}},
                             "required": ["loss"], "additionalProperties": False},
         "Write a loss of 20.5 as a negative number.",
         valid=['{"loss":-20.5}', '{"loss":-1}', '{"loss":-500}'], invalid=['{"loss":-0.5}', '{"loss":3}', '{"loss":-500.1}']),
    case("tuple", {"type": "array", "prefixItems": [{"type": "string", "maxLength": 10}, {"type": "integer"}],
                   "items": False},
         "Give a product name and its count as a pair.",
         valid=['["isa",3]'], invalid=['["isa"]', '["isa",3,4]', '[3,"isa"]']),
    case("top_string", {"type": "string", "maxLength": 20}, "Say hello in a few words.",
         valid=['"hello"'], invalid=['"hello world, how are you?"', "hello"]),
    case("any_value", {}, "Give any JSON value.", valid=['{"a":[1,2.5,"x",null,true]}', "3"], invalid=['{"a":}', "'x'"]),
    case("array_of_objects", {"type": "array", "items": {"type": "object", "properties": {
        "product": {"type": "string", "maxLength": 20}, "rate": {"type": "number", "minimum": 0, "maximum": 20}},
        "required": ["product", "rate"], "additionalProperties": False}, "minItems": 1, "maxItems": 3},
         "List two savings products and their interest rates.",
         valid=['[{"product":"ISA","rate":4.25}]'], invalid=['[]', '[{"product":"ISA","rate":25}]']),
    case("all_of_one", {"$defs": {"c": {"type": "string", "enum": ["low", "high"]}},
                        "type": "object", "properties": {"risk": {"allOf": [{"$ref": "#/$defs/c"}], "description": "risk"}},
                        "required": ["risk"], "additionalProperties": False},
         "Is a 95% mortgage low or high risk?",
         valid=['{"risk":"high"}'], invalid=['{"risk":"medium"}']),
    case("email", {"type": "object", "properties": {"email": {"type": "string", "format": "email"}}, "required": ["email"],
                   "additionalProperties": False},
         "Give a contact email address for a bank branch.",
         valid=['{"email":"branch@bank.example"}'], invalid=['{"email":"not-an-email"}']),
    case("ipv4", {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}}, "required": ["ip"],
                  "additionalProperties": False},
         "Give the IP address of a login attempt.",
         valid=['{"ip":"192.168.0.1"}', '{"ip":"255.255.255.255"}'], invalid=['{"ip":"256.1.1.1"}', '{"ip":"01.2.3.4"}']),
    case("pattern_alternation", {"type": "object", "properties": {"answer": {"type": "string", "pattern": "^(yes|no|maybe)$"}},
                                 "required": ["answer"], "additionalProperties": False},
         "Can I open an account online?",
         valid=['{"answer":"maybe"}'], invalid=['{"answer":"Yes"}', '{"answer":"yes!"}']),
    case("pattern_unanchored", {"type": "object", "properties": {"ref": {"type": "string", "pattern": "REF-[0-9]{4}"}},
                                "required": ["ref"], "additionalProperties": False},
         "Quote the reference REF-1234 in a sentence.",
         valid=['{"ref":"your REF-1234 ok"}', '{"ref":"REF-0000"}'], invalid=['{"ref":"REF-12"}'], walks_end=False),
    case("optional_only", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 5},
                                                            "c": {"type": "boolean"}}, "additionalProperties": False},
         "Fill any of the fields.",
         valid=['{}', '{"b":"x"}', '{"a":1,"c":true}', '{"a":1,"b":"x","c":false}'], invalid=['{"c":true,"a":1}', '{"a":1,}']),
    case("type_list", {"type": "object", "properties": {"value": {"type": ["integer", "string"], "maxLength": 8,
                                                                  "minimum": 0}},
                       "required": ["value"], "additionalProperties": False},
         "Give a sort code either as digits or as text.",
         valid=['{"value":123456}', '{"value":"12-34-56"}'], invalid=['{"value":-1}', '{"value":"123456789"}', '{"value":null}']),
    case("int32", {"type": "object", "properties": {"count": {"type": "integer", "format": "int32"}}, "required": ["count"],
                   "additionalProperties": False},
         "How many accounts does a big bank have?",
         valid=['{"count":2147483647}', '{"count":-2147483648}'], invalid=['{"count":2147483648}']),
    case("pattern_specials", {"type": "object", "properties": {"s": {"type": "string", "pattern": '^[a-z"\\\\]{1,5}$'}},
                              "required": ["s"], "additionalProperties": False},
         "Write a short lowercase word.",
         valid=['{"s":"ab\\"\\\\"}'], invalid=['{"s":"ab\\n"}', '{"s":"AB"}']),
    case("strict_nested", {"type": "object", "properties": {
        "customer": {"type": "object", "properties": {"id": {"type": "string", "pattern": "^C[0-9]{6}$"},
                                                      "segment": {"type": "string", "enum": ["retail", "business"]}},
                     "required": ["id", "segment"], "additionalProperties": False},
        "products": {"type": "array", "items": {"type": "string", "enum": ["current", "savings", "loan", "card"]},
                     "maxItems": 4}},
        "required": ["customer", "products"], "additionalProperties": False},
         "Describe a retail customer with a current account and a card.",
         valid=['{"customer":{"id":"C123456","segment":"retail"},"products":["current","card"]}'],
         invalid=['{"customer":{"id":"C12345","segment":"retail"},"products":[]}']),
    case("pydantic_style", {"$defs": {"Intent": {"enum": ["card", "loan"], "title": "Intent", "type": "string"}},
                            "properties": {"intent": {"$ref": "#/$defs/Intent"},
                                           "confidence": {"title": "Confidence", "type": "number", "minimum": 0, "maximum": 1},
                                           "note": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}],
                                                    "default": None, "title": "Note"}},
                            "required": ["intent", "confidence"], "title": "Answer", "type": "object"},
         "Classify 'I want to borrow money' with a confidence.",
         valid=['{"intent":"loan","confidence":0.9}', '{"intent":"loan","confidence":1,"note":null}'],
         invalid=['{"intent":"loan","confidence":1.5}', '{"intent":"mortgage","confidence":0.5}']),
    case("one_of_untyped", {"oneOf": [
        {"properties": {"type": {"const": "card"}, "last4": {"type": "string", "pattern": "^[0-9]{4}$"}},
         "required": ["type", "last4"], "additionalProperties": False},
        {"properties": {"type": {"const": "account"}, "number": {"type": "string", "pattern": "^[0-9]{8}$"}},
         "required": ["type", "number"], "additionalProperties": False}]},
         "Which card was used? It ends in 1234.",
         valid=['{"type":"card","last4":"1234"}', '{"type":"account","number":"12345678"}'],
         invalid=['{"type":"card","number":"12345678"}', '"card"']),
    case("unevaluated_map", {"type": "object", "unevaluatedProperties": {"type": "integer", "minimum": 0}},
         "Count the accounts per branch.",
         valid=['{"leeds":3}', '{}'], invalid=['{"leeds":"3"}', '{"leeds":-1}']),
    case("format_on_union", {"type": ["integer", "string"], "format": "date"},
         "When did the account open?",
         valid=['"2020-01-31"', "20200131"], invalid=['"2020-01-32"', '"yesterday"']),
    case("unbounded_numbers", {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"}},
                               "required": ["x", "n"], "additionalProperties": False},
         "Give a number and an integer.",
         valid=['{"x":-1.5e3,"n":-7}', '{"x":0,"n":0}'], invalid=['{"x":01,"n":1}', '{"x":1.,"n":1}', '{"x":1,"n":1.0}']),
]

# Schemas that must be refused with 400, and a word the one-line message must contain.
REFUSED = [
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "if": {"required": ["a"]}, "then": {}}, "if"),
    ({"type": "integer", "multipleOf": 5}, "multipleOf"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "array", "contains": {"const": 1}}, "contains"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "oneOf"),
    ({"oneOf": [{"type": "string", "maxLength": 3}, {"type": "string", "minLength": 2}]}, "oneOf"),
    ({"type": "string", "pattern": "^(?=a)abc$"}, "pattern"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "pattern"),
    ({"type": "string", "pattern": "\\bword\\b"}, "pattern"),
    ({"type": "string", "pattern": "(?i)abc"}, "pattern"),
    ({"type": "string", "pattern": "^a$b"}, "pattern"),
    ({"type": "string", "pattern": "^[A-Z]+$|x", "maxLength": 5}, "maxLength"),
    ({"type": "number", "minimum": 0.5}, "minimum"),
    ({"type": "string", "format": "uri"}, "format"),
    ({"type": "string", "maxLength": 5000}, "maxLength"),
    ({"type": "object", "properties": {"a": {"type": "string", "maxlength": 3}}}, "maxlength"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"type": "string", "nullable": True}, "nullable"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
    ({"type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, "anyOf"),
    ({"type": "string", "enum": ["a", "bb"], "maxLength": 1}, "enum"),
    ({"type": "strin"}, "type"),
    (False, "false"),
    ({"type": "array", "items": [{"type": "string"}]}, "items"),
    ({"type": "integer", "minimum": 10, "maximum": 5}, "bounds"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "$ref"),
    ({"type": "object", "properties": {"a\nb": {"not": {}}}}, "not"),
    ({"anyOf": [{"const": i} for i in range(40)]}, "branches"),
    ({"type": "string", "pattern": "^[a-"}, "not a valid regular expression"),
    ({"type": "string", "pattern": "^[\\d-z]$"}, "pattern"),
    ({"type": "string", "pattern": "^\\p{L}+$"}, "pattern"),
    ({"type": "number", "multipleOf": 0.01}, "multipleOf"),
    ({"type": "string", "format": "hostname"}, "format"),
    ({"type": "string", "pattern": "^((a?){20}){20}$"}, "empty string"),  # hangs llama.cpp's grammar engine
    ({"type": "string", "pattern": "^(?:[a-z]*[0-9]*)*$"}, "empty string"),
]


def check_answer(text: str, schema) -> object:
    """json.loads + jsonschema (formats checked too; date-time and time by datetime, which jsonschema needs an
    extra package for); returns the value or raises."""
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    _check_times(value, schema, schema)
    return value


def _check_times(value, schema, root):
    """Walk value and schema together and parse every date-time/time string (the formats jsonschema skips here)."""
    if not isinstance(schema, dict):
        return
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part] if part else node
        return _check_times(value, node, root)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            try:
                jsonschema.validate(value, {**sub, "$defs": root.get("$defs", {})} if isinstance(sub, dict) else sub)
            except jsonschema.ValidationError:
                continue
            _check_times(value, sub, root)
    if isinstance(value, str) and schema.get("format") == "date-time":
        datetime.datetime.fromisoformat(value)
    if isinstance(value, str) and schema.get("format") == "time":
        datetime.time.fromisoformat(value)
    if isinstance(value, dict):
        for k, v in value.items():
            if k in schema.get("properties", {}):
                _check_times(v, schema["properties"][k], root)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for v in value:
            _check_times(v, schema["items"], root)
