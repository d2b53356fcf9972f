"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
import secrets
import time

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.response import Response, Stream

from ..engine import Delta, Done, GenParams
from ..errors import APIError, EngineTimeoutError
from ..prompting import grammar_for_response_format
from ..records import RequestRecord
from ..schemas import ChatCompletionRequest, CompletionRequest, stops
from ..service import Service
from ..waiting import events_until
from . import scoped

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _finish(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _error_event(err: APIError) -> bytes:
    return _sse(err.body())


def _stream(svc: NamedDependency[Service], record: NamedDependency[RequestRecord], gen, base: dict, stream_options, opening, choice) -> Stream:
    """The SSE response both endpoints share: `choice(text, finish_reason)` shapes one choice (text None on the
    final chunk); optional usage chunk; always `data: [DONE]`; a client that goes away frees its slot at once."""
    include_usage = bool(stream_options and stream_options.include_usage)

    async def sse():
        done = None
        try:
            if opening is not None:
                yield _sse({**base, "choices": [opening]})
            deadline = time.monotonic() + svc.settings.request_timeout_s
            async for event in events_until(gen.handle, deadline):
                if isinstance(event, Delta):
                    yield _sse({**base, "choices": [choice(event.text, None)]})
                else:
                    done = event
            if done.finish_reason == "error":
                yield _error_event(APIError(done.error or "generation failed", status=500))
            else:
                yield _sse({**base, "choices": [choice(None, _finish(done))]})
                if include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(done)})
            yield b"data: [DONE]\n\n"
        except EngineTimeoutError as err:
            yield _error_event(err)
            yield b"data: [DONE]\n\n"
        finally:
            gen.handle.cancel()  # no-op when finished; frees the slot at once when the client went away
            svc.account(record, done, gen.prompt, gen.n_prompt)

    return Stream(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _respond(request: Request, svc: NamedDependency[Service], record: NamedDependency[RequestRecord], gen, stream: bool, stream_options,
                   base: dict, whole, opening, chunk) -> Response | Stream:
    """Both endpoints: wait and shape the whole answer with `whole(done)`, or stream chunks shaped by `chunk`."""
    if stream:
        return _stream(svc, record, gen, base, stream_options, opening, chunk)
    done = await svc.finish(request, record, gen)
    if done is None:
        return Response(b"", status_code=499)
    return Response({**base, **whole(done), "usage": _usage(done)})


@post("/v1/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: Request, data: JSONBody[ChatCompletionRequest], svc: NamedDependency[Service],
                           record: NamedDependency[RequestRecord]) -> Response | Stream:
    model = svc.model(data.model, record)
    max_tokens = svc.cap_max_tokens(data.max_completion_tokens or data.max_tokens)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(data.messages)]
    prompt, tokens = svc.render(messages)
    svc.engine.check_fits(len(tokens), max_tokens)  # a prompt that cannot fit is reported before a grammar problem
    grammar = grammar_for_response_format(data.response_format)
    if grammar is not None:
        if stops(data.stop):  # a stop string could cut the JSON short and still finish with "stop"
            raise APIError("`stop` cannot be combined with a JSON response_format (a stop string would cut the "
                           "JSON short); remove `stop`", param="stop")
        svc.engine.check_grammar(grammar)
    params = GenParams(max_tokens=max_tokens, temperature=data.temperature, top_p=data.top_p, seed=data.seed,
                       stop=stops(data.stop), grammar=grammar, adapter=model.adapter)
    gen = svc.generate(params, record.key_id, prompt=prompt, tokens=tokens)
    base = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": model.id,
            "system_fingerprint": None}
    return await _respond(
        request, svc, record, gen, data.stream, data.stream_options,
        {**base, "object": "chat.completion.chunk"} if data.stream else {**base, "object": "chat.completion"},
        lambda done: {"choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                   "logprobs": None, "finish_reason": _finish(done)}]},
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
        lambda text, fin: {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                           "finish_reason": fin})


@post("/v1/completions", status_code=200, summary="Create a text completion (OpenAI-compatible)")
async def completions(request: Request, data: JSONBody[CompletionRequest], svc: NamedDependency[Service],
                      record: NamedDependency[RequestRecord]) -> Response | Stream:
    model = svc.model(data.model, record)
    max_tokens = svc.cap_max_tokens(data.max_tokens)
    prompt = data.prompt if isinstance(data.prompt, str) else data.prompt[0]
    params = GenParams(max_tokens=max_tokens, temperature=data.temperature, top_p=data.top_p, seed=data.seed,
                       stop=stops(data.stop), adapter=model.adapter)
    gen = svc.generate(params, record.key_id, prompt=prompt, param="prompt")
    base = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
            "model": model.id, "system_fingerprint": None}
    return await _respond(
        request, svc, record, gen, data.stream, data.stream_options, base,
        lambda done: {"choices": [{"index": 0, "text": done.text, "logprobs": None, "finish_reason": _finish(done)}]},
        None,
        lambda text, fin: {"index": 0, "text": text or "", "logprobs": None, "finish_reason": fin})


def _model_card(svc: Service, model) -> dict:
    """As vLLM lists LoRA adapters: `parent` is the base an adapter runs on (None for the base itself)."""
    return {"id": model.id, "object": "model", "created": svc.created, "owned_by": "bankllm",
            "root": svc.base.id, "parent": None if model.adapter is None else svc.base.id,
            "base": model.adapter is None, "classifier": bool(model.labels)}


@get("/v1/models", summary="List the served models: the base and every adapter")
async def list_models(svc: NamedDependency[Service]) -> dict:
    return {"object": "list", "data": [_model_card(svc, m) for m in list(svc.models.values())]}


@get("/v1/models/{model_id:str}", summary="Describe a served model")
async def get_model(model_id: FromPath[str], svc: NamedDependency[Service]) -> dict:
    return _model_card(svc, svc.model(model_id))


ROUTES = scoped("openai", chat_completions, completions, list_models, get_model)
