"""The OpenAI-compatible HTTP API of `bitnet-a48 serve` (FastAPI): schemas, errors, endpoints.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(both with ``stream: true`` as server-sent events, ``data: {...}`` then ``data: [DONE]``), ``GET /health``.
Generation runs in :class:`serving_engine.BatchingEngine`; this module only validates, tokenises and formats.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (malformed
JSON, a wrong type, an unknown field, ``max_tokens < 1``, a prompt that does not fit the context, a parameter this
server does not implement), 404 for an unknown model or path, 429 when the queue is full (at once), 500 when
generation fails.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .serving_engine import BatchingEngine, QueueFullError, SamplingParams, Sequence

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_CHOICES = 16

# -----------------------------------------------------------------------------------------------------------------
# Request schemas: strict types, unknown fields rejected (as OpenAI's API does)
# -----------------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id: accepted, not used

    def unsupported(self) -> dict[str, bool]:
        """Parameters given with a value this server does not implement (refused, never ignored)."""
        return {
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logit_bias": bool(self.logit_bias),
        }


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> dict[str, bool]:
        return {
            **super().unsupported(),
            "echo": self.echo,
            "logprobs": self.logprobs is not None,
            "best_of": self.best_of not in (None, 1),
            "suffix": bool(self.suffix),
        }


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def unsupported(self) -> dict[str, bool]:
        return {**super().unsupported(), "logprobs": self.logprobs, "top_logprobs": self.top_logprobs is not None}


# -----------------------------------------------------------------------------------------------------------------
# Errors
# -----------------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _validation_error(error: RequestValidationError) -> APIError:
    """The first problem pydantic found, as one OpenAI-style message naming the parameter."""
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Drop union member names pydantic adds to the location ("str", "list[int]", ...)
    param = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool"))
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(
            400, f"We could not parse the JSON body of your request ({first.get('msg', '')}).", code="invalid_json"
        )
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if not param:
        return APIError(400, f"The request body must be a JSON object ({first.get('msg', '')}).", code="invalid_body")
    return APIError(400, f"Invalid value for '{param}': {first.get('msg', '')}.", param=param, code="invalid_value")


# -----------------------------------------------------------------------------------------------------------------
# The app
# -----------------------------------------------------------------------------------------------------------------


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: BatchingEngine, model_name: str, context_length: int) -> FastAPI:
    """The FastAPI app serving ``engine``'s model under ``model_name``; prompts plus completion must fit
    ``context_length`` tokens."""
    tokenizer = engine.tokenizer
    vocab_size = engine.model.config.vocab_size
    created = int(time.time())
    app = FastAPI(title="bitnet-a48", description="OpenAI-compatible API of a BitNet a4.8 model")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        return APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}", code=code).response()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "bitnet-a48"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist (this server serves `{model_name}`).",
                param="model",
                code="model_not_found",
            )

    def check_common(body: _Sampling) -> tuple[str, ...]:
        check_model(body.model)
        for name, given in body.unsupported().items():
            if given:
                raise APIError(400, f"'{name}' is not supported by this server.", param=name, code="unsupported_value")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
            raise APIError(
                400, f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings.", param="stop", code="invalid_value"
            )
        return stop

    def check_length(prompt_ids: list[int], max_tokens: int | None) -> int:
        """The completion budget: ``max_tokens``, or what the context leaves when it is None."""
        budget = context_length - len(prompt_ids) if max_tokens is None else max_tokens
        if len(prompt_ids) + max(budget, 1) > context_length:
            raise APIError(
                400,
                f"This model's maximum context length is {context_length} tokens. However, you requested "
                f"{len(prompt_ids) + max(budget, 1)} tokens ({len(prompt_ids)} in the prompt, {max(budget, 1)} for "
                "the completion). Please reduce the prompt or the completion length.",
                param="messages" if max_tokens is None else "max_tokens",
                code="context_length_exceeded",
            )
        return budget

    def make_sequences(
        prompts: list[list[int]], body: _Sampling, max_tokens: int | None, stop: tuple[str, ...], emit: Any
    ) -> list[Sequence]:
        sequences = []
        for p, ids in enumerate(prompts):
            budget = check_length(ids, max_tokens)
            for j in range(body.n):
                index = p * body.n + j
                seed = None if body.seed is None else body.seed + index  # choices differ, each reproducible
                params = SamplingParams(
                    max_tokens=budget, temperature=body.temperature, top_p=body.top_p, seed=seed, stop=stop
                )
                sequences.append(Sequence(index=index, prompt_ids=ids, params=params, emit=emit))
        return sequences

    async def run(
        request: Request,
        prompts: list[list[int]],
        body: _Sampling,
        max_tokens: int | None,
        stop: tuple[str, ...],
        chat: bool,
    ) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def emit(event: tuple[Any, ...]) -> None:  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        sequences = make_sequences(prompts, body, max_tokens, stop, emit)
        try:
            engine.submit(sequences)
        except QueueFullError as error:
            raise APIError(429, str(error), type_="requests", code="rate_limit_exceeded") from None
        prompt_tokens = sum(len(ids) for ids in prompts) * body.n
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = stream_events(events, sequences, ident, chat, prompt_tokens, include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        texts = [""] * len(sequences)
        reasons: list[str | None] = [None] * len(sequences)
        completion_tokens = 0
        try:
            while any(r is None for r in reasons):
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                if event[0] == "text":
                    texts[event[1]] += event[2]
                elif event[0] == "finish":
                    reasons[event[1]] = event[2]
                    completion_tokens += event[3]
                else:
                    raise APIError(500, event[2], type_="server_error")
        finally:
            engine.cancel([s for s in sequences if s.finish_reason is None])
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
            if chat
            else {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def stream_events(
        events: asyncio.Queue,
        sequences: list[Sequence],
        ident: str,
        chat: bool,
        prompt_tokens: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """SSE chunks; a client that goes away cancels this generator, and ``finally`` frees its sequences."""
        created_at = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
            return _sse(
                {"id": ident, "object": kind, "created": created_at, "model": model_name, "choices": [choice], **extra}
            )

        pending = len(sequences)
        completion_tokens = 0
        try:
            if chat:
                for seq in sequences:
                    yield chunk(seq.index, None, None, role=True)
            while pending:
                event = await events.get()
                if event[0] == "text":
                    yield chunk(event[1], event[2], None)
                elif event[0] == "finish":
                    pending -= 1
                    completion_tokens += event[3]
                    yield chunk(event[1], None, event[2])
                else:
                    error = {"message": event[2], "type": "server_error", "param": None, "code": None}
                    yield _sse({"error": error})
                    return
            if include_usage:
                yield _sse(
                    {
                        "id": ident,
                        "object": kind,
                        "created": created_at,
                        "model": model_name,
                        "choices": [],
                        "usage": usage(prompt_tokens, completion_tokens),
                    }
                )
            yield _sse("[DONE]")
        finally:
            engine.cancel([s for s in sequences if s.finish_reason is None])

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        stop = check_common(body)
        raw = body.prompt
        if isinstance(raw, str):
            prompts = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            prompts = [raw]
        else:
            prompts = list(raw)
        if not prompts:
            raise APIError(400, "'prompt' must not be an empty list.", param="prompt", code="invalid_value")
        ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        for row in ids:
            bad = [t for t in row if not 0 <= t < vocab_size]
            if bad or not row:
                problem = f"holds token id {bad[0]} outside [0, {vocab_size})" if bad else "must hold a token"
                raise APIError(400, f"'prompt' {problem}.", param="prompt", code="invalid_value")
        return await run(request, ids, body, body.max_tokens, stop, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        stop = check_common(body)
        if tokenizer.chat_template is None:
            raise APIError(
                400,
                "the model's tokenizer has no chat template (start the server with --chat-template)",
                param="messages",
                code="no_chat_template",
            )
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give 'max_tokens' or 'max_completion_tokens', not both.", param="max_tokens")
        messages = [
            {
                "role": m.role,
                "content": m.content if isinstance(m.content, str) else "".join(part.text for part in m.content),
            }
            for m in body.messages
        ]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        return await run(request, [list(encoded["input_ids"])], body, max_tokens, stop, chat=True)

    return app
