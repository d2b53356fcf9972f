"""Banking routes: /api/v1/chat (server-side history) and /api/v1/classify (constrained to the label set)."""

from __future__ import annotations

import time

from litestar import Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Response

from ..errors import APIError, NotFoundError
from ..records import RequestRecord
from ..schemas import BankChatRequest, ClassifyRequest
from ..service import Service
from . import scoped


@post("/api/v1/chat", status_code=200, summary="The banking assistant: approved answers, clarifying questions, handoff")
async def bank_chat(request: Request, data: JSONBody[BankChatRequest], svc: NamedDependency[Service], record: NamedDependency[RequestRecord]) -> Response:
    start = time.perf_counter()
    model = svc.model(data.model, record)
    # A conversation belongs to (key, model): one started on a model continues on it (issue 13).
    owner = record.key_id if model.adapter is None else f"{record.key_id}@{model.id}"
    if data.conversation_id:
        conv = await svc.conversations.get(data.conversation_id, owner)
        if conv is None:
            raise NotFoundError(
                f"conversation_id {data.conversation_id!r} is unknown or expired on model {model.id!r} (idle "
                f"conversations end after {svc.settings.conversation_ttl_s:g} s, and a conversation continues on the "
                "model it started on); omit it to start a new conversation", param="conversation_id")
    else:
        conv = svc.conversations.draft(owner)  # stored by add_turn: a refused request leaves none behind
    reply = await svc.assist(request, record, conv, data.message, model)
    if reply is None:
        return Response(b"", status_code=499)
    await svc.conversations.add_turn(conv, data.message, reply.response, reply.options,
                                     conv.pending_text or data.message if reply.options else "")
    body = {"response": reply.response, "conversation_id": conv.id, "intent": reply.intent,
            "confidence": round(reply.confidence, 4), "handoff": reply.handoff, "source": reply.source}
    if reply.options:
        body["options"] = [{"intent": i, "description": model.answers.descriptions[i]} for i in reply.options]
    if model.adapter is not None:
        body["model"] = model.id
    body["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
    return Response(body)


@post("/api/v1/classify", status_code=200, summary="Classify text into the model's intent labels, with calibrated "
      "confidence and whether it is in scope")
async def classify(request: Request, data: JSONBody[ClassifyRequest], svc: NamedDependency[Service], record: NamedDependency[RequestRecord]) -> Response:
    start = time.perf_counter()
    if (data.text is None) == (data.texts is None):
        raise APIError("send exactly one of `text` (a string) or `texts` (a list of up to 64 strings)", param="text")
    texts = [data.text] if data.text is not None else data.texts
    model = svc.model(data.model, record)
    results = await svc.classify(request, record, texts, model)
    if results is None:
        return Response(b"", status_code=499)
    out = [{"intent": r.intent, "confidence": round(r.confidence, 4), "in_scope": r.in_scope} for r in results]
    latency = round((time.perf_counter() - start) * 1000, 1)
    body = {**out[0], "latency_ms": latency} if data.text is not None else {"results": out, "latency_ms": latency}
    if model.adapter is not None:
        body["model"] = model.id
    return Response(body)


ROUTES = [*scoped("chat", bank_chat), *scoped("classify", classify)]
