"""Banking routes: /api/v1/chat (server-side history) and /api/v1/classify (constrained to the label set)."""

from __future__ import annotations

import asyncio
import time

from litestar import Request, post
from litestar.datastructures import State
from litestar.response import Response

from ..engine import GenParams
from ..errors import APIError, NotFoundError
from ..prompting import classify_messages
from ..schemas import BankChatRequest, ClassifyRequest
from .common import ClientGone, check_done, key_id, record_usage, wait_result

CHAT_MAX_TOKENS = 256


@post("/api/v1/chat", status_code=200, summary="Chat with server-side conversation history")
async def bank_chat(request: Request, data: BankChatRequest, state: State) -> Response:
    svc = state.service
    start = time.perf_counter()
    owner = key_id(request)
    if data.conversation_id:
        conv = svc.conversations.get(data.conversation_id, owner)
        if conv is None:
            raise NotFoundError(
                f"conversation_id {data.conversation_id!r} is unknown or expired (idle conversations end after "
                f"{svc.settings.conversation_ttl_s:g} s); omit it to start a new conversation", param="conversation_id")
    else:
        conv = svc.conversations.new(owner)
    history = list(conv.turns)
    max_tokens = min(CHAT_MAX_TOKENS, svc.settings.max_tokens_cap)
    while True:
        messages = [{"role": "system", "content": svc.settings.system_prompt}]
        for user, answer in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": data.message})
        prompt = svc.template.render(messages)
        tokens = svc.engine.tokenize(prompt, special=True)
        if len(tokens) + max_tokens <= svc.engine.seq_ctx or not history:
            break
        history = history[1:]  # the oldest turns make room for the new one
    max_tokens = svc.engine.check_fits(len(tokens), min(max_tokens, svc.engine.seq_ctx - len(tokens)), "message")
    handle = svc.engine.submit(tokens, GenParams(max_tokens=max_tokens, temperature=0.0), owner)
    try:
        done = await wait_result(request, handle, svc.settings.request_timeout_s)
    except ClientGone:
        record_usage(request, svc, None, data.message, len(tokens))
        return Response(b"", status_code=499)
    record_usage(request, svc, done, data.message)
    answer = done.text.strip()
    svc.conversations.add_turn(conv, data.message, answer)
    return Response({"response": answer, "conversation_id": conv.id,
                     "latency_ms": round((time.perf_counter() - start) * 1000, 1)})


@post("/api/v1/classify", status_code=200, summary="Classify text into the model's intent labels")
async def classify(request: Request, data: ClassifyRequest, state: State) -> Response:
    svc = state.service
    start = time.perf_counter()
    if (data.text is None) == (data.texts is None):
        raise APIError("send exactly one of `text` (a string) or `texts` (a list of up to 64 strings)", param="text")
    texts = [data.text] if data.text is not None else data.texts
    prepared = []
    for text in texts:
        prompt = svc.template.render(classify_messages(text))
        tokens = svc.engine.tokenize(prompt, special=True)
        svc.engine.check_fits(len(tokens), svc.label_max_tokens, "text")
        prepared.append(tokens)
    params = GenParams(max_tokens=svc.label_max_tokens, temperature=0.0, choices=svc.label_choices)
    owner = key_id(request)
    handles = [svc.engine.submit(tokens, params, owner) for tokens in prepared]
    try:
        results = await asyncio.gather(*(wait_result(request, h, svc.settings.request_timeout_s) for h in handles))
    except ClientGone:
        for h in handles:
            h.cancel()
        return Response(b"", status_code=499)
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    out = []
    for text, done in zip(texts, results):
        check_done(done)
        record_usage(request, svc, done, text)
        if done.text not in svc.label_set:  # the grammar makes this impossible; refuse rather than invent
            raise APIError(f"classification produced no valid label (finish: {done.finish_reason})", status=500)
        out.append({"intent": done.text, "confidence": round(done.probability or 0.0, 4)})
    latency = round((time.perf_counter() - start) * 1000, 1)
    body = {**out[0], "latency_ms": latency} if data.text is not None else {"results": out, "latency_ms": latency}
    return Response(body)


ROUTES = [bank_chat, classify]
