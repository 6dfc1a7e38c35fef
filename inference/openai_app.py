"""The OpenAI-compatible app (FastAPI) that serve_openai_api.py runs: its routes, the model worker that answers
through the dynamic batcher, plain and streamed (server-sent events) replies, and the limits on request bodies
and on requests admitted at once. Requests are read by inference/openai_request.py."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import DynamicBatcher
from .chat import GenerationSettings, StreamStats, VLMChat
from .openai_request import RETRY_AFTER_S, APIError, ChatJob, Outcome, error_body, parse_json_body, parse_request

DEFAULT_MAX_TOKENS_LIMIT = 2048
DEFAULT_MAX_QUEUE = 32
DEFAULT_BODY_TIMEOUT_S = 30.0
DECODE_SLOTS = 2  # images decoded at once: each holds its full decoded size until it is resized
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


# ---------------------------------------------------------------------------------------------- generation
class Runner:
    """Answers requests through a dynamic batcher: concurrent requests are decoded together.

    The batcher's thread alone runs the model (inference.batcher.DynamicBatcher): it takes up to max_batch waiting
    requests, waiting at most max_wait_ms for a batch to fill. Each request waits for its tokens on a worker
    thread of `executor` (which also prepares its prompt and encodes its image), so a batch can form while
    the previous one decodes. max_batch=1 decodes one request at a time.
    """

    def __init__(self, chat: VLMChat, max_queue: int = DEFAULT_MAX_QUEUE, max_batch: int = 8,
                 max_wait_ms: float = 10.0):
        self.chat = chat
        self.max_queue = max_queue  # requests admitted (decoding, waiting or generating) at once; more get a 503
        self.admitted = 0
        self.batcher = DynamicBatcher(chat.model, chat.eos_id, chat.eos_id, max_batch, max_wait_ms / 1000)
        self.executor = ThreadPoolExecutor(max_workers=2 * max_batch, thread_name_prefix="minimind-request")
        # what a request is checked against before it queues: images resized to the encoder's input size, and
        # no more images than the model's context holds (VLMChat.max_images)
        self.image_size: Optional[int] = getattr(getattr(chat.encoder, "preprocess", None), "size", None)
        self.max_images, self.context = chat.max_images(), chat.model.config.max_seq_len
        self.image_tokens, self.generation = chat.model.config.image_tokens, chat.generation  # 3v: 64, alpha dropped

    def generate(self, job: ChatJob, emit: Callable[[str], None], cancel: threading.Event) -> Outcome:
        """Answer job, calling emit(text piece) as text becomes final; stops early when cancel is set."""
        stats = StreamStats()
        # the client went away: stop before the prompt runs or at the next step, and leave the batch
        for piece in self.chat.stream(job.question, job.images, job.history, job.settings, stats, cancel.is_set,
                                      batcher=self.batcher):
            emit(piece)
        finish = "length" if stats.completion_tokens >= job.settings.max_new_tokens else "stop"
        return Outcome(finish, stats.prompt_tokens, stats.completion_tokens)


# ---------------------------------------------------------------------------------------------- app
async def read_body(request: Request, limit: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed limit (header or bytes received),
    and with 408 when it has not all arrived within timeout_s (a stalled body would hold its connection)."""
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", None,
                       "request_timeout") from None


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"request body is larger than the limit of {limit} bytes (--max_body_mb)", None,
                         "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise APIError(400, "invalid Content-Length header", None, "invalid_body") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked or lying Content-Length: stop reading here
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class ServeOptions:
    """What a chat request may be and send: where local images may come from, and the limits."""

    image_dir: Optional[str] = None
    max_body_bytes: int = 10 << 20
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S


def create_app(runner: Runner, model_id: str, image_dir: Optional[str] = None, max_body_bytes: int = 10 << 20,
               defaults: GenerationSettings = GenerationSettings(),
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI application serving `runner`'s model under the name model_id."""
    app = FastAPI(title="MiniMind-V OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    add_model_routes(app, model_id)
    options = ServeOptions(image_dir, max_body_bytes, defaults, max_tokens_limit, body_timeout_s)
    add_chat_route(app, runner, model_id, options)
    return app


def add_model_routes(app: FastAPI, model_id: str) -> None:
    """GET /health, /v1/models and /v1/models/{id}."""
    model_card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "minimind-v"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise APIError(404, f"model {name!r} not found; this server serves {model_id!r}", "model",
                           "model_not_found", "not_found_error")
        return model_card


def add_chat_route(app: FastAPI, runner: Runner, model_id: str, options: ServeOptions) -> None:
    """POST /v1/chat/completions: admitted while fewer than runner.max_queue requests are in, else a 503."""
    decode_slots = asyncio.Semaphore(DECODE_SLOTS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if runner.admitted >= runner.max_queue:
            raise APIError(503, f"the server is busy ({runner.admitted} requests queued or running); retry in "
                                f"{RETRY_AFTER_S} s", None, "server_busy", "server_busy_error")
        runner.admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released, runner.admitted = True, runner.admitted - 1

        try:
            response = await chat_completion(request, runner, model_id, options, decode_slots, release)
        except BaseException:
            release()
            raise
        if not isinstance(response, StreamingResponse):
            release()  # a stream releases its slot when it ends, however it ends
        return response


async def chat_completion(request: Request, runner: Runner, model_id: str, options: ServeOptions,
                          decode_slots: asyncio.Semaphore, release: Callable[[], None]) -> Any:
    """One admitted request: read and check it, then answer it whole or as a stream (which calls release)."""
    body = parse_json_body(await read_body(request, options.max_body_bytes, options.body_timeout_s))
    # Images are decoded off the event loop (a large PNG takes a while and must not stall other requests),
    # a few at a time, and resized before the request queues for the model: memory stays bounded.
    async with decode_slots:
        job = await asyncio.to_thread(parse_request, body, options.image_dir, options.defaults,
                                      options.max_tokens_limit, runner.image_size, runner.max_images,
                                      runner.context, runner.image_tokens, runner.generation)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    now = int(time.time())
    if job.stream:
        return StreamingResponse(stream_events(runner, job, completion_id, now, model_id, release),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pieces, outcome = await generate_whole(runner, job, request)
    return {
        "id": completion_id, "object": "chat.completion", "created": now, "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                     "logprobs": None, "finish_reason": outcome.finish_reason}],
        "usage": outcome.usage(),
    }


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-style JSON error body: ours with their codes, the framework's (404,
    405, ...) as request errors, anything unforeseen as a 500 that names it."""

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)


async def generate_whole(runner: Runner, job: ChatJob, request: Request) -> tuple[list[str], Outcome]:
    """Run a non-streamed request on the model worker, watching the client: one that disconnects stops its
    queued or running work (a 499 for the log). Returns the answer pieces and the worker's outcome."""
    pieces: list[str] = []
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    try:
        work = loop.run_in_executor(runner.executor, runner.generate, job, pieces.append, cancel)
        while not (await asyncio.wait({work}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():  # the client gave up: its queued or running work stops
                cancel.set()
                await asyncio.wait({work})
                raise APIError(499, "the client closed the connection", None, "client_closed")
        return pieces, work.result()
    finally:
        cancel.set()  # if this request was cancelled while queued or running, the worker stops early


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream_events(runner: Runner, job: ChatJob, completion_id: str, created: int,
                        model_id: str, on_close: Callable[[], None] = lambda: None) -> AsyncIterator[str]:
    """chat.completion.chunk events for job, then `data: [DONE]`; on_close runs when the stream ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def put(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def work() -> None:
        try:
            put("done", runner.generate(job, lambda piece: put("piece", piece), cancel))
        except Exception as e:  # reported to the client as an error event: headers are already sent
            put("error", e)

    def chunk(delta: dict[str, Any], finish: Optional[str] = None) -> dict[str, Any]:
        out = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if job.include_usage:
            out["usage"] = None  # as OpenAI: only the last chunk carries usage
        return out

    loop.run_in_executor(runner.executor, work)
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield _sse(chunk({"content": value}))
            elif kind == "done":
                yield _sse(chunk({}, value.finish_reason))
                if job.include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": model_id, "choices": [], "usage": value.usage()})
                break
            else:
                yield _sse(error_body(f"generation failed: {type(value).__name__}: {value}", "server_error"))
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # also on client disconnect (the generator is closed): stop generating
        on_close()
