"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
import secrets
import time

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.response import Response, Stream

from ..engine import Delta, Done, GenParams
from ..errors import APIError, EngineTimeoutError, NotFoundError
from ..prompting import grammar_for_response_format
from ..schemas import ChatCompletionRequest, CompletionRequest, stops
from .common import ClientGone, events_until, key_id, record_usage, wait_result

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


async def _result(request: Request, svc, handle, prompt: str, n_prompt: int) -> Done | None:
    """Wait for a non-streamed answer and record it; None when the client went away (its slot is freed)."""
    try:
        done = await wait_result(request, handle, svc.settings.request_timeout_s)
    except ClientGone:
        record_usage(request, svc, None, prompt, n_prompt)
        return None
    record_usage(request, svc, done, prompt)
    return done


def _stream(request: Request, svc, handle, base: dict, prompt: str, n_prompt: int, stream_options, opening,
            choice) -> Stream:
    """The SSE response both endpoints share: `choice(text, finish_reason)` shapes one choice (text None on the
    final chunk); optional usage chunk; always `data: [DONE]`; a client that goes away frees its slot at once."""
    include_usage = bool(stream_options and stream_options.include_usage)

    async def sse():
        done = None
        try:
            if opening is not None:
                yield _sse({**base, "choices": [opening]})
            deadline = time.monotonic() + svc.settings.request_timeout_s
            async for event in events_until(handle, deadline):
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
            handle.cancel()  # no-op when finished; frees the slot at once when the client went away
            record_usage(request, svc, done, prompt, n_prompt)

    return Stream(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


def prepare(svc, model: str, max_tokens: int | None, n_prompt: int, param: str = "messages") -> int:
    """Check the model name and max_tokens; return the max_tokens to use."""
    if model != svc.settings.model_name:
        raise NotFoundError(f"the model {model!r} does not exist here; use {svc.settings.model_name!r} "
                            "(see GET /v1/models)", param="model", code="model_not_found")
    cap = svc.settings.max_tokens_cap
    if max_tokens is not None and max_tokens > cap:
        raise APIError(f"max_tokens={max_tokens} is above this server's cap of {cap}; ask for at most {cap}",
                       param="max_tokens")
    use = svc.engine.check_fits(n_prompt, max_tokens, param)
    return min(use, cap)


@post("/v1/chat/completions", status_code=200, summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: Request, data: ChatCompletionRequest, state: State) -> Response | Stream:
    svc = state.service
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in data.messages]
    prompt = svc.template.render(messages)
    tokens = svc.engine.tokenize(prompt, special=True)
    max_tokens = prepare(svc, data.model, data.max_completion_tokens or data.max_tokens, len(tokens))
    grammar = grammar_for_response_format(data.response_format)
    if grammar is not None:
        svc.engine.check_grammar(grammar)
    params = GenParams(max_tokens=max_tokens, temperature=data.temperature, top_p=data.top_p, seed=data.seed,
                       stop=stops(data.stop), grammar=grammar)
    handle = svc.engine.submit(tokens, params, key_id(request))
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    base = {"id": rid, "created": created, "model": svc.settings.model_name, "system_fingerprint": None}
    if not data.stream:
        done = await _result(request, svc, handle, prompt, len(tokens))
        if done is None:
            return Response(b"", status_code=499)
        return Response({**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
            "finish_reason": _finish(done)}], "usage": _usage(done)})

    chunk = {**base, "object": "chat.completion.chunk"}
    opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _stream(request, svc, handle, chunk, prompt, len(tokens), data.stream_options, opening,
                   lambda text, finish: {"index": 0, "delta": {} if text is None else {"content": text},
                                         "logprobs": None, "finish_reason": finish})


@post("/v1/completions", status_code=200, summary="Create a text completion (OpenAI-compatible)")
async def completions(request: Request, data: CompletionRequest, state: State) -> Response | Stream:
    svc = state.service
    prompt = data.prompt if isinstance(data.prompt, str) else data.prompt[0]
    # Raw prompts are tokenized without parsing control-token text: a caller cannot forge chat turns this way.
    tokens = svc.engine.tokenize(prompt, special=False)
    max_tokens = prepare(svc, data.model, data.max_tokens, len(tokens), "prompt")
    params = GenParams(max_tokens=max_tokens, temperature=data.temperature, top_p=data.top_p, seed=data.seed,
                       stop=stops(data.stop))
    handle = svc.engine.submit(tokens, params, key_id(request))
    base = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
            "model": svc.settings.model_name, "system_fingerprint": None}
    if not data.stream:
        done = await _result(request, svc, handle, prompt, len(tokens))
        if done is None:
            return Response(b"", status_code=499)
        return Response({**base, "choices": [{"index": 0, "text": done.text, "logprobs": None,
                                              "finish_reason": _finish(done)}], "usage": _usage(done)})

    return _stream(request, svc, handle, base, prompt, len(tokens), data.stream_options, None,
                   lambda text, finish: {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish})


@get("/v1/models", summary="List the served model")
async def list_models(state: State) -> dict:
    svc = state.service
    return {"object": "list", "data": [{"id": svc.settings.model_name, "object": "model",
                                        "created": svc.created, "owned_by": "bankllm"}]}


@get("/v1/models/{model_id:str}", summary="Describe the served model")
async def get_model(model_id: str, state: State) -> dict:
    svc = state.service
    if model_id != svc.settings.model_name:
        raise NotFoundError(f"the model {model_id!r} does not exist here; use {svc.settings.model_name!r}",
                            param="model", code="model_not_found")
    return {"id": model_id, "object": "model", "created": svc.created, "owned_by": "bankllm"}


ROUTES = [chat_completions, completions, list_models, get_model]
