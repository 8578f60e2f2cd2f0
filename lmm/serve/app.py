"""The OpenAI-compatible HTTP app: `POST /v1/chat/completions` (JSON or server-sent events),
`GET /v1/models`, `GET /health`, `GET /stats` (batching counters).

    from lmm.serve.app import create_app
    app = create_app(model, "my-model", api_key="secret")   # then: uvicorn.run(app, port=8000)

Each request is checked against `Limits` before the work each limit bounds (see `lmm.serve.protocol`); a
non-streamed request whose client disconnects while it waits is cancelled before it reaches the model; errors
the server did not expect answer a 500 whose body says nothing about the server's internals (the log has them).
"""

import asyncio
import copy
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from lmm.serve.batcher import Batcher, Job
from lmm.serve.protocol import (
    APIError,
    ChatRequest,
    Limits,
    bad_request,
    check_prompt,
    chunk_body,
    completion_body,
    parse_json,
    parse_settings,
    resolve_messages,
)

log = logging.getLogger("lmm.serve")

MAX_BODY_BYTES = Limits().max_body_bytes
_DONE = object()


def internal_error() -> APIError:
    """A 500 that names no exception, path or value: the log line with the same id has the details."""
    ref = uuid.uuid4().hex[:12]
    return APIError(
        500,
        f"internal server error (reference {ref}); the server log has the details",
        "internal_error",
        type_="server_error",
    )


def create_app(
    model,
    model_name: str,
    api_key: str | None = None,
    allow_local_dir: str | Path | None = None,
    max_batch_size: int = 16,
    max_wait_ms: float = 10.0,
    default_max_tokens: int = 256,
    limits: Limits | None = None,
    decode: dict | None = None,
):
    """A FastAPI app serving `model` under `model_name`; one `Batcher` worker owns the model. `decode`: generation
    options of the server, not of a request (e.g. {"compile": True})."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    allow_dir = Path(allow_local_dir).resolve() if allow_local_dir else None
    context = getattr(model.lm.config, "max_position_embeddings", None)
    limits = (limits or Limits()).for_context(context)
    # request threads count tokens on their own copy: a fast tokenizer shared with the generating thread can
    # fail with "Already borrowed" when both use it at once
    counter, counter_lock = copy.deepcopy(model.tokenizer), threading.Lock()

    def count_tokens(text: str) -> int:
        with counter_lock:
            return len(counter(text, add_special_tokens=False)["input_ids"])

    started = int(time.time())
    audio = model.encoders["audio"] if "audio" in model.encoders else None
    audio_rate = getattr(audio, "sampling_rate", 16_000)

    def check_audio(media: list) -> None:
        """A clip the audio encoder refuses (e.g. longer than its max_chunks) is the client's 400, found here
        rather than inside a batch; a model without an audio encoder refuses audio parts."""
        from lmm.inputs import Audio, check_audio_length

        for item in media:
            if isinstance(item, Audio):
                if audio is None:
                    raise bad_request("this model has no audio encoder; send text, images or video", "invalid_audio")
                try:
                    check_audio_length(model, "audio", item.value)  # decoded at the encoder's rate
                except ValueError as e:
                    raise bad_request(str(e)[:500], "invalid_audio", "messages") from None

    server_options = dict(decode or {})

    def generate(conversations, settings):
        return model.chat(conversations, **settings.kwargs(), **server_options)

    def stream(conversation, settings):
        prompt, images = model.render_chat(conversation)  # as model.chat renders it (default system prompt)
        kwargs = {**settings.kwargs(), **server_options}
        return model.stream(prompt, images, add_special_tokens=False, stop_at_end_of_chunk=False, **kwargs)

    batcher = Batcher(generate, stream, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="lmm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.limits = limits

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path[:200]}: {e.detail}", code))

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        err = internal_error()
        log.error("unexpected error, %s", err.message, exc_info=e)
        return error_response(err)

    class _Auth:
        """API-key check as plain ASGI middleware (no body buffering, disconnects stay visible)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and api_key is not None:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
                given = headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
                if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), api_key.encode()):
                    err = APIError(
                        401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "invalid_api_key"
                    )
                    await error_response(err)(scope, receive, send)
                    return
            await self.app(scope, receive, send)

    app.add_middleware(_Auth)

    def check_model(name) -> None:
        if name is not None and name != model_name:
            shown = repr(name)[:80] if isinstance(name, str) else "a non-string"
            raise APIError(
                404, f"the model {shown} does not exist; this server serves {model_name!r}", "model_not_found", "model"
            )

    def prepare(raw: bytes) -> ChatRequest:
        """Parse + validate a request and decode its images (runs in a worker thread, off the event loop)."""
        body = parse_json(raw)
        check_model(body.get("model"))
        stream_flag = body.get("stream", False)
        if not isinstance(stream_flag, bool):
            raise bad_request("'stream' must be true or false", "invalid_value", "stream")
        explicit = body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None
        settings = parse_settings(body, default_max_tokens)
        messages = resolve_messages(body.get("messages"), allow_dir, limits, model.config.video_frames, audio_rate)
        try:
            prompt, images = model.render_chat(messages)
        except ValueError as e:
            raise bad_request(str(e), "invalid_messages", "messages") from None
        n_tokens = count_tokens(prompt)
        if not explicit and context is not None:  # fit the default answer length into what the context leaves
            settings = replace(settings, max_new_tokens=max(1, min(settings.max_new_tokens, context - n_tokens)))
        check_prompt(prompt, n_tokens, images, settings.max_new_tokens, context)
        check_audio(images)
        return ChatRequest(
            messages=messages, settings=settings, stream=stream_flag, prompt=prompt, prompt_tokens=n_tokens
        )

    async def read_body(request: Request) -> bytes:
        """The body, however it is sent (Content-Length or chunked), refused past `limits.max_body_bytes`
        (413) or when it does not arrive within `limits.body_timeout` seconds (408)."""
        too_large = APIError(
            413, f"request body larger than {limits.max_body_bytes / 2**20:g} MiB", "request_too_large"
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise bad_request("the Content-Length header is not a number", "invalid_request")
            if int(declared) > limits.max_body_bytes:
                raise too_large

        async def collect() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_large
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(collect(), limits.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(
                408, f"the request body did not arrive within {limits.body_timeout:g} s", "request_timeout"
            ) from None

    async def client_gone(request: Request) -> None:
        """Returns when the client disconnects (the body has been read: the next ASGI message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/stats")
    async def stats():
        return batcher.stats()

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "lmm"}],
        }

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": started, "owned_by": "lmm"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await run_in_threadpool(prepare, await read_body(request))
        if req.stream:
            return StreamingResponse(
                sse(req),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        job = batcher.submit(Job(req.messages, req.settings))
        answer = asyncio.wrap_future(job.future)
        watcher = asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not answer.done():  # the client left: drop its job if it has not started (no one reads the answer)
            batcher.cancel(job)
            answer.cancel()
            return Response(status_code=499)
        try:
            text = answer.result()
        except ValueError as e:
            raise bad_request(str(e), "invalid_request") from None
        return completion_body(req, model_name, text, count_tokens(text))

    def event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    async def sse(req: ChatRequest):
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def push(item) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the event loop is gone: the client left
                job.cancelled.set()

        job = Job(req.messages, req.settings, on_piece=push)
        job.future.add_done_callback(lambda f: push(_DONE))
        batcher.submit(job)
        try:
            yield event(chunk_body(req, model_name, {"role": "assistant", "content": ""}))
            while (item := await pieces.get()) is not _DONE:
                yield event(chunk_body(req, model_name, {"content": item}))
            if job.future.cancelled():
                return
            err = job.future.exception()
            if err is not None:
                if isinstance(err, APIError):
                    e = err
                elif isinstance(err, ValueError):
                    e = bad_request(str(err))
                else:
                    e = internal_error()
                    log.error("streamed generation failed, %s", e.message, exc_info=err)
                yield event(e.body())
            else:
                done = count_tokens(job.future.result()) >= req.settings.max_new_tokens
                yield event(chunk_body(req, model_name, {}, "length" if done else "stop"))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()

    return app
