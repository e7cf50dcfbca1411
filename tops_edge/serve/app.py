"""The OpenAI-compatible HTTP API over one Pipeline (Starlette): POST /v1/chat/completions (JSON or
server-sent events), GET /v1/models, GET /health, GET /metrics. docs/serve.md describes it."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import TopsError
from .engine import Done, Engine, Job, timeout_error
from .errors import ApiError, bad_request, from_tops_error, internal
from .media import MediaPolicy, load_image
from .metrics import CONTENT_TYPE
from .schema import ChatRequest, conversation, parse_request, stop_strings

log = logging.getLogger("tops_edge.serve")

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class ServerConfig:
    #: the id clients pass as `model` (GET /v1/models); default: the export's source model
    model_id: str | None = None
    #: clients send `Authorization: Bearer KEY` to /v1/*; None: no key
    api_key: str | None = None
    #: requests that may wait for the model; one more is answered 429
    max_queue: int = 8
    #: seconds from a request's arrival to the end of its answer (None: no limit)
    request_timeout: float | None = 120.0
    media: MediaPolicy = MediaPolicy()
    #: new tokens when a request sets neither max_tokens nor max_completion_tokens
    default_max_tokens: int = 256


def create_app(pipe, config: ServerConfig = ServerConfig(), clock=time.monotonic) -> Starlette:
    """The ASGI app serving `pipe` (a loaded Pipeline). Its worker starts with the app's lifespan;
    `app.state.engine` is the queue and its worker."""
    engine = Engine(pipe, config.max_queue, config.request_timeout, clock)
    model_id = config.model_id or str(pipe.manifest["model"]["source"])
    created = int(time.time())
    max_body = config.media.max_image_bytes * 4 // 3 + 2**20  # one base64 image and the rest of the request
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        client = None
        if config.media.allow_remote:
            import httpx

            client = httpx.AsyncClient(follow_redirects=True, max_redirects=3)
        app.state.http = client
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)
            if client is not None:
                await client.aclose()

    def fail(error: ApiError) -> JSONResponse:
        metrics.errors.inc(kind=error.code)
        metrics.responses.inc(status=error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "the API key is not this server's", type="authentication_error",
                           code="invalid_api_key")

    async def health(request: Request) -> Response:
        metrics.requests.inc(endpoint="/health")
        up = engine.alive
        return JSONResponse({"status": "ok" if up else "worker stopped", "model": model_id, "busy": engine.busy,
                             "queue_depth": engine.depth, "max_queue": engine.max_queue}, status_code=200 if up else 503)

    async def metrics_text(request: Request) -> Response:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "tops-edge"}

    async def models(request: Request) -> Response:
        metrics.requests.inc(endpoint="/v1/models")
        try:
            authorize(request)
        except ApiError as error:
            return fail(error)
        if "model" in request.path_params:
            if request.path_params["model"] != model_id:
                return fail(_no_model(request.path_params["model"], model_id))
            return JSONResponse(model_card())
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def chat(request: Request) -> Response:
        metrics.requests.inc(endpoint=CHAT)
        arrival = clock()
        watcher = None
        try:
            authorize(request)
            req = parse_request(await _read_body(request, max_body))
            if req.model != model_id:
                raise _no_model(req.model, model_id)
            conv = conversation(req.messages, lambda chat: pipe.pre.processor.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=False))
            selector = _selector(req)
            if engine.full():  # before the image is fetched and decoded
                raise engine.queue_full()
            image = await load_image(conv.image_url, config.media, request.app.state.http)
            job = Job(image=image, prompt=conv.prompt, raw=conv.raw, options=_options(req, config), selector=selector,
                      stops=stop_strings(req), stream=req.stream, arrival=arrival, deadline=engine.deadline(arrival),
                      loop=asyncio.get_running_loop())
            del image
            engine.submit(job)
            watcher = asyncio.create_task(_watch_disconnect(request.receive, job))
            first = await _next_event(job, clock)
            if first[0] == "disconnected":
                return _left(job, metrics)
            if first[0] == "error":
                raise first[1]
            if not req.stream:
                text = ""
                event = first
                while event[0] == "delta":  # (a non-streamed job sends none; kept for safety)
                    text += event[1]
                    event = await _next_event(job, clock)
                if event[0] == "disconnected":
                    return _left(job, metrics)
                if event[0] == "error":
                    raise event[1]
                done: Done = event[1]
                metrics.duration.observe(clock() - arrival)
                metrics.responses.inc(status=200)
                return JSONResponse(_completion(job, model_id, done))
            metrics.responses.inc(status=200)
            response = _EventStream(job, first, watcher, model_id, req, clock, metrics, arrival)
            watcher = None  # the stream owns it now
            return response
        except ApiError as error:
            return fail(error)
        except TopsError as exc:
            return fail(from_tops_error(exc))
        except Exception as exc:  # a bug: one line to the client, the traceback to the server's log
            log.exception("tops-serve: %s failed", CHAT)
            return fail(internal(exc))
        finally:
            if watcher is not None:
                watcher.cancel()

    async def not_found(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"no {request.method} {request.url.path} on this server" if exc.status_code in (404, 405) else \
            str(exc.detail)
        return fail(ApiError(exc.status_code, message, code=code))

    async def crashed(request: Request, exc: Exception) -> Response:
        return fail(internal(exc))

    app = Starlette(
        routes=[Route("/health", health), Route("/metrics", metrics_text), Route("/v1/models", models),
                Route("/v1/models/{model:path}", models), Route(CHAT, chat, methods=["POST"])],
        exception_handlers={HTTPException: not_found, Exception: crashed},
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.model_id = model_id
    app.state.http = None
    return app


def _no_model(asked: str, served: str) -> ApiError:
    return ApiError(404, f"this server serves '{served}', not '{asked}' (GET /v1/models)", param="model",
                    code="model_not_found")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes. A body up to a few times the limit is read to its end
    (and dropped) first, so that the client, still sending, can read the answer."""
    too_large = ApiError(413, f"the request is over this server's {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 8 * limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 8 * limit:
            raise too_large
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _selector(req: ChatRequest):
    if req.selector is None:
        return None
    from ..eval.runner import parse_selector_spec  # `name` or `name:key=value[:...]`, as tops-eval --selector

    try:
        return parse_selector_spec(req.selector)
    except TopsError as exc:
        raise bad_request(str(exc), "invalid_selector", "selector") from None


def _options(req: ChatRequest, config: ServerConfig) -> dict:
    return dict(max_new_tokens=req.max_completion_tokens or req.max_tokens or config.default_max_tokens,
                keep=req.keep, keep_ratio=req.keep_ratio, budget=req.budget,
                temperature=0.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed)


async def _watch_disconnect(receive, job: Job) -> None:
    """Tells the request's handler when its client goes (the body is read by now, so the next ASGI
    message is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.events.put_nowait(("disconnected", None))
            return


async def _next_event(job: Job, clock) -> tuple:
    """The job's next event, or a timeout error at its deadline (the job is cancelled then)."""
    if job.deadline is None:
        return await job.events.get()
    try:
        return await asyncio.wait_for(job.events.get(), max(job.deadline - clock(), 0.0))
    except asyncio.TimeoutError:
        job.cancel("timeout")
        return "error", timeout_error(job.deadline - job.arrival)


def _left(job: Job, metrics) -> Response:
    """A client that went away: its generation stops at the next token; nobody reads this answer."""
    metrics.errors.inc(kind="client_disconnected")
    job.cancel("client_disconnected")
    return Response(status_code=499)


def _completion(job: Job, model_id: str, done: Done) -> dict:
    return {"id": job.id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text, "refusal": None},
                         "logprobs": None, "finish_reason": done.finish_reason}],
            "usage": done.usage.to_json()}


class _EventStream:
    """The streamed answer (text/event-stream): a first chunk with the role, one per text delta, one
    with the finish reason, a usage chunk when stream_options.include_usage, then `data: [DONE]`. An
    error after the answer began is one `data: {"error": ...}` event. A client that leaves cancels
    its generation (the worker stops at the next token)."""

    def __init__(self, job: Job, first: tuple, watcher, model_id: str, req: ChatRequest, clock, metrics, arrival):
        self.job, self.first, self.watcher, self.model_id = job, first, watcher, model_id
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.clock, self.metrics, self.arrival = clock, metrics, arrival
        self.created = int(time.time())

    def _chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None, choices=True) -> bytes:
        body = {"id": self.job.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
                "usage": usage}
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    async def __call__(self, scope, receive, send) -> None:
        job, finished = self.job, False
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})

        async def data(payload: bytes) -> None:
            await send({"type": "http.response.body", "body": payload, "more_body": True})

        try:
            await data(self._chunk({"role": "assistant", "content": ""}))
            event = self.first
            while True:
                kind, value = event
                if kind == "delta":
                    await data(self._chunk({"content": value}))
                elif kind == "done":
                    await data(self._chunk({}, value.finish_reason))
                    if self.include_usage:
                        await data(self._chunk({}, usage=value.usage.to_json(), choices=False))
                    await data(b"data: [DONE]\n\n")
                    self.metrics.duration.observe(self.clock() - self.arrival)
                    finished = True
                    break
                elif kind == "error":
                    self.metrics.errors.inc(kind=value.code)
                    await data(b"data: " + json.dumps(value.body()).encode() + b"\n\n")
                    finished = True
                    break
                else:  # disconnected
                    break
                event = await _next_event(job, self.clock)
        finally:
            self.watcher.cancel()
            if not finished:
                self.metrics.errors.inc(kind="client_disconnected")
                job.cancel("client_disconnected")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
