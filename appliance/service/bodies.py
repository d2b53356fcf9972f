"""Request bodies checked before any route decodes them: a JSON body nested deeper than MAX_JSON_DEPTH is refused."""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

from .errors import APIError

# No request this API defines comes near this depth (a response_format JSON schema is the deepest, a few dozen);
# msgspec decodes nesting by recursion and raises RecursionError (a 500) near Python's recursion limit.
MAX_JSON_DEPTH = 64

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string: its brackets are text, not nesting
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # open +1, close -1 (as signed bytes)


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count); a cheap upper
    bound instead when that bound is within the limit."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return body.count(b"[") + body.count(b"{")  # an upper bound, and cheap: most bodies stop here
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", body)).translate(_STEP)
    return max(accumulate(array("b", brackets)), default=0)


def check_json_depth(body: bytes) -> None:
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise APIError(f"the request body nests JSON arrays or objects {depth} levels deep, over this server's limit "
                       f"of {MAX_JSON_DEPTH}; send a flatter body", code="json_too_deep")


async def check_body(request) -> None:
    """Litestar before_request hook for every route: refuse a too-deeply nested body before any decoder sees it, and
    an empty one where the route reads a body."""
    if request.method not in ("POST", "PUT", "PATCH", "DELETE"):
        return
    body = await request.body()  # cached on the request: the route's decoder reads it from there
    if not body.strip() and request.route_handler.parsed_data_field is not None:
        raise APIError("the request body is empty; send one JSON object")
    check_json_depth(body)
