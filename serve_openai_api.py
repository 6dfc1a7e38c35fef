"""An OpenAI-compatible chat server for a trained MiniMind-V model (FastAPI + uvicorn).

    python serve_openai_api.py --ckpt out/sft_vlm_512.pth --clip_path model/clip_model/clip-vit-base-patch32

Endpoints: POST /v1/chat/completions (streamed as server-sent events with `"stream": true`), GET /v1/models,
GET /v1/models/{id}, GET /health. Any OpenAI client works with base_url=http://127.0.0.1:8998/v1.

Messages: `content` is a string or a list of `{"type": "text"}` and `{"type": "image_url"}` parts. An image is
a `data:image/...;base64,` URI, or a local path, accepted only under --image_dir (remote URLs are never
fetched). A conversation may hold several images (up to MAX_IMAGES, in one message or spread over user
messages); their placeholders lead the earliest user turn kept in the prompt, in the order they were sent. Earlier user/assistant messages become the history; system messages are ignored (the
model was not trained with them). Sampling: temperature, top_p, max_tokens (or max_completion_tokens),
seed, and the extensions top_k and repetition_penalty; unset fields use inference.chat.GenerationSettings.

Concurrent requests are decoded together: a dynamic batcher (model/batcher.py) takes up to --max_batch
waiting requests, waiting at most --batch_wait_ms for a batch to fill, and runs one forward per step for all of
them (left padding with an attention mask; each request keeps its own sampling settings and seed). The model
runs on the batcher's thread, so the server keeps answering (/health, new requests) while it generates. It binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.batcher import DynamicBatcher
from inference.chat import DEFAULT_QUESTION, GenerationSettings, StreamStats, Turn, VLMChat
from model.vision import DEFAULT_CLIP_PATH, ImageError, open_image

MAX_IMAGES = 8  # each image takes a 50-token placeholder span of the prompt (VLMChat.build_prompt)
DEFAULT_MAX_TOKENS_LIMIT = 2048
DEFAULT_MAX_QUEUE = 32
MIN_REPETITION_PENALTY = 0.01
DEFAULT_BODY_TIMEOUT_S = 30.0
DECODE_SLOTS = 2  # images decoded at once: each holds its full decoded size until it is resized
RETRY_AFTER_S = 2
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """A request the server refuses; rendered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status,
                            headers=headers)


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ---------------------------------------------------------------------------------------------- request parsing
@dataclass
class ChatJob:
    """One parsed chat request: what the model needs to answer it."""

    question: str
    images: list[Image.Image]  # in the order they were sent; may be empty
    history: list[Turn]
    settings: GenerationSettings
    stream: bool = False
    include_usage: bool = False


@dataclass
class Outcome:
    finish_reason: str  # "stop" (end token) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _number(body: dict[str, Any], name: str, lo: float, hi: float, integer: bool = False,
            lo_open: bool = False) -> Optional[float]:
    """body[name] checked to be a number in range (None when absent or null)."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (lo < value <= hi if lo_open else lo <= value <= hi):
        low = f"greater than {lo}" if lo_open else f"at least {lo}"
        raise APIError(400, f"{name} must be {kind} {low} and at most {hi}, got {value!r}", name, "invalid_value")
    return value


def valid_text(text: str, param: str) -> str:
    """text, or a 400 when it cannot be encoded as UTF-8 (JSON allows lone UTF-16 surrogates like \\ud800)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode text ({e.reason} at character {e.start})", param,
                       "invalid_text") from None
    return text


def parse_content(content: Any, param: str) -> tuple[str, list[tuple[str, str]]]:
    """(text, [(image url, its param path)]) of one message's content."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return valid_text(content, param), []
    if not isinstance(content, list):
        raise APIError(400, f"{param} must be a string or a list of content parts", param, "invalid_type")
    texts, images = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise APIError(400, f"{where} must be an object with a type", where, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}.text must be a string", f"{where}.text", "invalid_type")
            texts.append(valid_text(part["text"], f"{where}.text"))
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{where}.image_url.url must be a non-empty string", f"{where}.image_url",
                               "invalid_type")
            images.append((url, f"{where}.image_url"))
        else:
            raise APIError(400, f"{where}: content part type {kind!r} is not supported (use 'text' or 'image_url')",
                           f"{where}.type", "unsupported_content_type")
    return "\n".join(texts), images


def parse_messages(messages: Any) -> tuple[str, list[Turn], list[tuple[str, str]]]:
    """(question, history, images) of an OpenAI message list.

    Consecutive messages of one role are joined; a reply before the first question is dropped, since the
    prompt format starts with a user turn.
    """
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages", "missing_messages")
    turns: list[list[str]] = []  # [role, text]
    images: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]",
                           "invalid_type")
        role = message.get("role")
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise APIError(400, f"messages[{i}].role {role!r} is not supported (use system, user or assistant)",
                           f"messages[{i}].role", "unsupported_role")
        text, found = parse_content(message.get("content"), f"messages[{i}].content")
        if found and role != "user":
            raise APIError(400, f"messages[{i}]: only user messages can hold images", f"messages[{i}].content",
                           "invalid_image_position")
        images.extend(found)
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message (other than system messages) must come from the user", "messages",
                       "invalid_last_message")
    history: list[Turn] = []
    question: Optional[str] = None
    for role, text in turns[:-1]:
        if role == "user":
            question = text
        elif question is not None:  # roles alternate after the merge, so this closes a (question, answer) pair
            history.append((question, text))
            question = None
    return turns[-1][1], history, images


def resolve_image_path(path: str, image_dir: Optional[str], param: str) -> str:
    """The real path of a local image, which must lie under image_dir (after resolving `..` and symlinks)."""
    if image_dir is None:
        raise APIError(403, "local image paths are disabled: send the image as a data: URI, or start the server "
                            "with --image_dir DIR", param, "image_path_forbidden")
    try:
        root = os.path.realpath(image_dir)
        real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    except ValueError as e:  # e.g. an embedded NUL byte
        raise APIError(400, f"invalid image path ({e})", param, "invalid_image_path") from None
    if os.path.commonpath([root, real]) != root:
        raise APIError(403, f"image path {path!r} is outside the served image directory", param,
                       "image_path_forbidden")
    if not os.path.isfile(real):
        raise APIError(400, f"image file not found: {path!r}", param, "image_not_found")
    return real


def load_image(url: str, param: str, image_dir: Optional[str], size: Optional[int] = None) -> Image.Image:
    """Decode an image_url (a base64 data URI or a local path under image_dir), resized to size x size with the
    encoder's own bicubic resize when given: a queued request then holds 150 KB, not the full decoded image."""
    image = _decode_image(url, param, image_dir)
    return image if size is None else image.resize((size, size), Image.BICUBIC)


def _decode_image(url: str, param: str, image_dir: Optional[str]) -> Image.Image:
    try:
        if url.startswith("data:"):
            header, comma, data = url.partition(",")
            mime = header[5:].split(";")[0].strip().lower()
            if not comma or ";base64" not in header.lower():
                raise APIError(400, f"{param}: data URIs must be base64 encoded (data:image/png;base64,...)",
                               param, "invalid_image_url")
            if mime and not mime.startswith("image/"):
                raise APIError(400, f"{param}: media type {mime!r} is not an image", param, "invalid_image_url")
            try:
                raw = base64.b64decode(re.sub(r"\s+", "", data), validate=True)
            except (binascii.Error, ValueError) as e:
                raise APIError(400, f"{param}: invalid base64 data ({e})", param, "invalid_image_url") from None
            return open_image(raw, name=f"{param} (data URI)")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url) and not url.startswith("file://"):
            raise APIError(400, f"{param}: remote image URLs are not fetched; send a data: URI or a path under "
                                f"--image_dir", param, "invalid_image_url")
        path = url[len("file://"):] if url.startswith("file://") else url
        return open_image(resolve_image_path(path, image_dir, param), name=path)
    except ImageError as e:  # one line naming the image and what failed
        raise APIError(400, f"could not decode the image: {e}", param, "invalid_image") from None


def parse_request(body: Any, image_dir: Optional[str], defaults: GenerationSettings,
                  max_tokens_limit: int, image_size: Optional[int] = None) -> ChatJob:
    """Validate an OpenAI chat.completions body into a ChatJob (images decoded), or raise APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_body")
    question, history, images = parse_messages(body.get("messages"))
    if len(images) > MAX_IMAGES:
        raise APIError(400, f"this server takes at most {MAX_IMAGES} images per conversation, got {len(images)}",
                       "messages", "too_many_images")
    for name, unsupported in (("n", body.get("n") not in (None, 1)), ("stop", body.get("stop") not in (None, [])),
                              ("tools", bool(body.get("tools"))), ("logprobs", bool(body.get("logprobs")))):
        if unsupported:
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported_parameter")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options", "invalid_type")

    # max_completion_tokens is the newer OpenAI name; max_tokens the older one.
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, tokens_field, 1, max_tokens_limit, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, lo_open=True)
    top_k = _number(body, "top_k", 0, 1_000_000, integer=True)
    seed = _number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True)
    # below 0.01 a penalty divides logits into inf (and NaN probabilities): refused, like any out-of-range value
    penalty = _number(body, "repetition_penalty", MIN_REPETITION_PENALTY, 10)
    settings = GenerationSettings(
        temperature=defaults.temperature if temperature is None else float(temperature),
        top_k=defaults.top_k if top_k is None else (int(top_k) or None),  # 0 turns top-k off
        top_p=defaults.top_p if top_p is None else (None if top_p >= 1 else float(top_p)),
        max_new_tokens=defaults.max_new_tokens if max_tokens is None else int(max_tokens),
        repetition_penalty=defaults.repetition_penalty if penalty is None else float(penalty),
        seed=defaults.seed if seed is None else int(seed),
    )
    decoded = [load_image(url, param, image_dir, image_size) for url, param in images]
    if not question.strip() and decoded:
        question = DEFAULT_QUESTION  # an image alone asks what it shows, as in v1
    return ChatJob(question, decoded, history, settings, stream, bool(options.get("include_usage")))


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


def create_app(runner: Runner, model_id: str, image_dir: Optional[str] = None, max_body_bytes: int = 10 << 20,
               defaults: GenerationSettings = GenerationSettings(),
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """The FastAPI application serving `runner`'s model under the name model_id."""
    decode_slots = asyncio.Semaphore(DECODE_SLOTS)
    image_size = getattr(getattr(runner.chat, "encoder", None), "preprocess", None)
    image_size = getattr(image_size, "size", None)
    app = FastAPI(title="MiniMind-V OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "minimind-v"}

    add_error_handlers(app)

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
            response = await _chat_completion(request, release)
        except BaseException:
            release()
            raise
        if not isinstance(response, StreamingResponse):
            release()  # a stream releases its slot when it ends, however it ends
        return response

    async def _chat_completion(request: Request, release: Callable[[], None]):
        body = parse_json_body(await read_body(request, max_body_bytes, body_timeout_s))
        # Images are decoded off the event loop (a large PNG takes a while and must not stall other requests),
        # a few at a time, and resized before the request queues for the model: memory stays bounded.
        async with decode_slots:
            job = await asyncio.to_thread(parse_request, body, image_dir, defaults, max_tokens_limit, image_size)
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

    return app


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


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, or a 400 that says what is wrong with it."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", None, "invalid_json") from None
    except ValueError as e:  # e.g. an integer longer than Python's int-string conversion limit
        raise APIError(400, f"the request body is not acceptable JSON ({_first_line(e)})", None,
                       "invalid_json") from None


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


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="model checkpoint (.pth, .safetensors or a model directory)")
    p.add_argument("--clip_path", default=DEFAULT_CLIP_PATH, help="Hugging Face CLIP directory")
    p.add_argument("--tokenizer_path", default=None, help="default: the checkpoint's own tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--image_dir", default=None, help="allow image_url paths under this directory (default: none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max_body_mb", type=float, default=10.0, help="largest accepted request body, in MiB")
    p.add_argument("--max_tokens_limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests admitted at once (decoding, queued or generating); more get 503 + Retry-After")
    p.add_argument("--body_timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds a request body may take to arrive (408 after that)")
    p.add_argument("--max_batch", type=int, default=8,
                   help="most requests decoded together in one batch (1: one at a time)")
    p.add_argument("--batch_wait_ms", type=float, default=10.0,
                   help="how long the first waiting request waits for others to join its batch")
    p.add_argument("--model_name", default=None, help="model id reported by the API (default: checkpoint name)")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.image_dir is not None and not os.path.isdir(args.image_dir):
        print(f"serve_openai_api.py: error: --image_dir {args.image_dir} is not a directory", file=sys.stderr)
        return 1
    try:
        chat = VLMChat.load(args.ckpt, args.clip_path, args.tokenizer_path, device=args.device)
    except (OSError, ValueError) as e:  # missing/corrupt checkpoint, CLIP or tokenizer: say which, in one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"serve_openai_api.py: error: {message}", file=sys.stderr)
        return 1
    import uvicorn

    model_id = args.model_name or Path(args.ckpt).stem
    if args.max_batch < 1 or args.batch_wait_ms < 0:
        print("serve_openai_api.py: error: --max_batch must be at least 1 and --batch_wait_ms at least 0",
              file=sys.stderr)
        return 1
    runner = Runner(chat, args.max_queue, args.max_batch, args.batch_wait_ms)
    app = create_app(runner, model_id, args.image_dir, int(args.max_body_mb * (1 << 20)),
                     max_tokens_limit=args.max_tokens_limit, body_timeout_s=args.body_timeout)
    print(f"serving {model_id} ({chat.n_params / 1e6:.2f}M parameters) at http://{args.host}:{args.port}/v1",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
