"""The OpenAI chat.completions request as this server reads it: the body checked field by field, the messages
turned into a question, a history and images (decoded and resized), and every refusal as an APIError that
renders as an OpenAI error body. Used by inference/openai_app.py (serve_openai_api.py)."""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from fastapi.responses import JSONResponse
from PIL import Image

from checkpoints.files import first_line
from data_pipeline.image_decode import ImageError

from model.config import IMAGE_TOKENS

from .app_images import open_app_image
from .chat import (DEFAULT_QUESTION, MAX_IMAGES, V3_QUESTION, GenerationSettings, TooManyImagesError, Turn,
                   check_image_count)

MIN_REPETITION_PENALTY = 0.01
RETRY_AFTER_S = 2


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


def load_image(url: str, param: str, image_dir: Optional[str], size: Optional[int] = None,
               generation: str = "v1") -> Image.Image:
    """Decode an image_url (a base64 data URI or a local path under image_dir), resized to size x size with the
    encoder's own bicubic resize when given: a queued request then holds 150 KB, not the full decoded image.
    Transparency as the model's generation takes it (inference.app_images: v1 over white, 3v alpha dropped)."""
    image = _decode_image(url, param, image_dir, generation)
    return image if size is None else image.resize((size, size), Image.BICUBIC)


def _decode_image(url: str, param: str, image_dir: Optional[str], generation: str = "v1") -> Image.Image:
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
            return open_app_image(raw, f"{param} (data URI)", generation)
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", url) and not url.startswith("file://"):
            raise APIError(400, f"{param}: remote image URLs are not fetched; send a data: URI or a path under "
                                f"--image_dir", param, "invalid_image_url")
        path = url[len("file://"):] if url.startswith("file://") else url
        return open_app_image(resolve_image_path(path, image_dir, param), path, generation)
    except ImageError as e:  # one line naming the image and what failed
        raise APIError(400, f"could not decode the image: {e}", param, "invalid_image") from None


def parse_request(body: Any, image_dir: Optional[str], defaults: GenerationSettings,
                  max_tokens_limit: int, image_size: Optional[int] = None, max_images: int = MAX_IMAGES,
                  context: Optional[int] = None, image_tokens: int = IMAGE_TOKENS,
                  generation: str = "v1") -> ChatJob:
    """Validate an OpenAI chat.completions body into a ChatJob (images decoded), or raise APIError.

    max_images is the model's own cap (VLMChat.max_images: 8, or fewer when its `context` cannot hold their
    spans of `image_tokens` each: 50 for v1, 64 for 3v); it is checked before any image is decoded. `generation`
    decides how transparency is taken and the question asked of an image sent alone."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_body")
    question, history, images = parse_messages(body.get("messages"))
    try:
        check_image_count(len(images), min(max_images, MAX_IMAGES), context, image_tokens)
    except TooManyImagesError as e:
        code = "too_many_images" if len(images) > MAX_IMAGES else "context_length_exceeded"
        raise APIError(400, f"{e} (this server counts the images of the whole conversation)", "messages",
                       code) from None
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
    settings = parse_settings(body, defaults, max_tokens_limit)
    decoded = [load_image(url, param, image_dir, image_size, generation) for url, param in images]
    if not question.strip() and decoded:  # an image alone asks what it shows: v1's question, or 3v's eval question
        question = V3_QUESTION if generation == "3v" else DEFAULT_QUESTION
    return ChatJob(question, decoded, history, settings, stream, bool(options.get("include_usage")))


def parse_settings(body: dict[str, Any], defaults: GenerationSettings, max_tokens_limit: int) -> GenerationSettings:
    """The sampling fields of a body, each checked to be in range; unset ones come from defaults."""
    # max_completion_tokens is the newer OpenAI name; max_tokens the older one.
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, tokens_field, 1, max_tokens_limit, integer=True)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, lo_open=True)
    top_k = _number(body, "top_k", 0, 1_000_000, integer=True)
    seed = _number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True)
    # below 0.01 a penalty divides logits into inf (and NaN probabilities): refused, like any out-of-range value
    penalty = _number(body, "repetition_penalty", MIN_REPETITION_PENALTY, 10)
    return GenerationSettings(
        temperature=defaults.temperature if temperature is None else float(temperature),
        top_k=defaults.top_k if top_k is None else (int(top_k) or None),  # 0 turns top-k off
        top_p=defaults.top_p if top_p is None else (None if top_p >= 1 else float(top_p)),
        max_new_tokens=defaults.max_new_tokens if max_tokens is None else int(max_tokens),
        repetition_penalty=defaults.repetition_penalty if penalty is None else float(penalty),
        seed=defaults.seed if seed is None else int(seed),
    )


def parse_json_body(raw: bytes) -> Any:
    """The request body as JSON, or a 400 that says what is wrong with it."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", None, "invalid_json") from None
    except ValueError as e:  # e.g. an integer longer than Python's int-string conversion limit
        raise APIError(400, f"the request body is not acceptable JSON ({first_line(e)})", None,
                       "invalid_json") from None
