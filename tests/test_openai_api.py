"""serve_openai_api.py, run as a real server process and driven with the official `openai` client.

One server (tiny random model, tiny random CLIP) serves every test in this module; it is killed at the end.
"""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, build_tiny_clip, tiny_config
from helpers import free_port
from PIL import Image

from checkpoints.checkpoint import save_checkpoint
from model.vlm import MiniMindVLM

MAX_BODY_MB = 1


def _png(color=(200, 30, 60), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"




@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    """(base url, image_dir) of a running server; the process is always killed afterwards."""
    tmp = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    save_checkpoint(MiniMindVLM(tiny_config(tokenizer)), tmp / "tiny.pth", tokenizer=PROJECT_TOKENIZER)
    clip = build_tiny_clip(tmp / "clip")
    image_dir = tmp / "images"
    image_dir.mkdir()
    (image_dir / "cat.png").write_bytes(_png())
    (tmp / "secret.png").write_bytes(_png((0, 0, 0)))
    os.symlink(tmp / "secret.png", image_dir / "escape.png")  # a link pointing out of the image directory
    port = free_port()
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "serve_openai_api.py"), "--ckpt", str(tmp / "tiny.pth"), "--clip_path", str(clip),
         "--tokenizer_path", TOKENIZER_PATH, "--port", str(port), "--image_dir", str(image_dir),
         "--max_body_mb", str(MAX_BODY_MB), "--model_name", "tiny", "--log_level", "warning"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not become healthy within 60 s")
            time.sleep(0.2)
        yield base, image_dir
    finally:
        proc.kill()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=60)


def _image_question(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code, error
    return error


def _post(server, body=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60, **kwargs)


def test_image_question_streamed_and_not(client):
    messages = _image_question(_data_uri(_png()))
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=7, temperature=1.0)
    answer = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert isinstance(answer, str) and answer
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 50 and 0 < usage.completion_tokens <= 12  # the prompt holds the 50 image tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, seed=7, temperature=1.0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) >= 3 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer  # same seed, same sampler
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == usage.prompt_tokens


def test_several_image_parts_in_one_message(client):
    one = _image_question(_data_uri(_png()), "Same colour?")
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(_png())}},
                                        {"type": "image_url", "image_url": {"url": _data_uri(_png((0, 0, 255)))}},
                                        {"type": "text", "text": "Same colour?"}]}]
    single = client.chat.completions.create(model="tiny", messages=one, max_tokens=3, temperature=0)
    double = client.chat.completions.create(model="tiny", messages=two, max_tokens=3, temperature=0)
    assert double.choices[0].message.content is not None
    assert double.usage.prompt_tokens - single.usage.prompt_tokens >= 50  # a second 50-token image span


def test_images_the_context_cannot_hold_are_refused_and_prompts_stay_within_it(client, server):
    """8 images in a 200-token context were accepted with prompt_tokens 420. The tiny model's 160 tokens hold the
    spans of 2 images (51 tokens each) and some text: 3 are a 400, and 2 with a long question fit in 160."""
    png = {"type": "image_url", "image_url": {"url": _data_uri(_png())}}
    three = [{"role": "user", "content": [png] * 3 + [{"type": "text", "text": "Same?"}]}]
    error = _assert_error(_post(server, {"messages": three}), 400, "context_length_exceeded")
    assert "3 images are too many" in error["message"] and "160 tokens" in error["message"]
    across = [{"role": "user", "content": [png, png]}, {"role": "assistant", "content": "ok"},
              {"role": "user", "content": [png, {"type": "text", "text": "and this one?"}]}]
    _assert_error(_post(server, {"messages": across}), 400, "context_length_exceeded")
    two = [{"role": "user", "content": [png, png, {"type": "text", "text": "describe them " * 400}]}]
    reply = client.chat.completions.create(model="tiny", messages=two, max_tokens=8, temperature=0)
    assert 100 < reply.usage.prompt_tokens <= 160


def test_history_and_local_image_under_image_dir(client, server):
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And its colour?"},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"top_k": 5})
    assert reply.usage.prompt_tokens > 60 and reply.usage.completion_tokens <= 4
    # the same file by absolute path is inside the directory too
    absolute = _image_question(str(server[1] / "cat.png"))
    assert client.chat.completions.create(model="tiny", messages=absolute, max_tokens=2).choices


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_openai_client_sees_openai_style_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[])
    assert e.value.status_code == 400 and e.value.code == "missing_messages"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_bad_requests_get_4xx_with_error_bodies(server):
    base = server[0]
    png = _data_uri(_png())
    # malformed JSON
    _assert_error(httpx.post(f"{base}/v1/chat/completions", content=b'{"messages": [', timeout=30,
                             headers={"content-type": "application/json"}), 400, "invalid_json")
    # no messages, or not a list, or ending with the assistant
    _assert_error(_post(server, {"model": "tiny"}), 400, "missing_messages")
    _assert_error(_post(server, {"model": "tiny", "messages": "hi"}), 400, "missing_messages")
    _assert_error(_post(server, {"messages": [{"role": "assistant", "content": "x"}]}), 400, "invalid_last_message")
    # more images than the server takes (in one message, or across the conversation)
    many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}] * 9}]
    _assert_error(_post(server, {"messages": many}), 400, "too_many_images")
    across = _image_question(png) + [{"role": "assistant", "content": "ok"}] + many
    _assert_error(_post(server, {"messages": across}), 400, "too_many_images")
    # undecodable images: the message says what failed
    err = _assert_error(_post(server, {"messages": _image_question(_data_uri(b"definitely not a png"))}), 400,
                        "invalid_image")
    assert "not an image" in err["message"] and "messages[0].content[0].image_url" in err["message"]
    truncated = _data_uri(_png(size=(200, 200))[:150])
    assert "could not decode the image" in _assert_error(
        _post(server, {"messages": _image_question(truncated)}), 400)["message"]
    _assert_error(_post(server, {"messages": _image_question("data:image/png;base64,@@@")}), 400, "invalid_image_url")
    _assert_error(_post(server, {"messages": _image_question("https://example.com/cat.png")}), 400,
                  "invalid_image_url")
    # paths outside the image directory: .., a symlink out, an absolute path
    for path in ("../secret.png", "escape.png", str(server[1].parent / "secret.png"), "/etc/passwd",
                 "file:///etc/passwd"):
        _assert_error(_post(server, {"messages": _image_question(path)}), 403, "image_path_forbidden")
    _assert_error(_post(server, {"messages": _image_question("missing.png")}), 400, "image_not_found")
    # bad sampling values and unsupported features
    msg = [{"role": "user", "content": "hi"}]
    for field, value in (("temperature", -1), ("temperature", "hot"), ("top_p", 0), ("max_tokens", 0),
                         ("max_tokens", 10 ** 9), ("seed", 1.5), ("n", 2), ("stream", "yes")):
        error = _assert_error(_post(server, {"messages": msg, field: value}), 400)
        assert error["param"] == field
    _assert_error(_post(server, {"messages": [{"role": "tool", "content": "x"}]}), 400, "unsupported_role")
    # oversize bodies: declared by Content-Length, and sent chunked without one
    big = b'{"messages": "' + b"x" * (MAX_BODY_MB * (1 << 20) + 1000) + b'"}'
    _assert_error(httpx.post(f"{base}/v1/chat/completions", content=big, timeout=30), 413, "request_too_large")
    _assert_error(httpx.post(f"{base}/v1/chat/completions", content=iter([big[i:i + 65536]
                                                                          for i in range(0, len(big), 65536)]),
                             timeout=30), 413, "request_too_large")
    # unknown route: still an OpenAI-style body
    assert httpx.get(f"{base}/v1/nothing", timeout=10).json()["error"]["message"]
    # the server is still up after all of them
    assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"


def test_server_answers_while_generating_and_survives_a_dropped_stream(server):
    body = {"messages": [{"role": "user", "content": "tell me a long story"}], "stream": True,
            "max_tokens": 2000, "temperature": 1.0, "top_k": 0}
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generation has started
        start = time.time()
        assert httpx.get(f"{server[0]}/health", timeout=10).status_code == 200
        assert time.time() - start < 5
    # the stream was dropped half way: the next request is served normally
    reply = _post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3


def test_local_paths_are_refused_without_image_dir():
    from inference.openai_request import APIError, resolve_image_path

    with pytest.raises(APIError) as e:
        resolve_image_path(str(ROOT / "images"), None, "p")
    assert e.value.status == 403 and "--image_dir" in e.value.message


def test_concurrent_requests_get_the_answers_they_get_alone(client, server):
    """The dynamic batcher decodes these together; greedy answers must not depend on the batch."""
    from concurrent.futures import ThreadPoolExecutor

    image = _data_uri(_png((20, 160, 90)))
    questions = [_image_question(image, "What is it?"), [{"role": "user", "content": "Hi"}],
                 _image_question(image, "Describe the colours and shapes in this picture, please."),
                 [{"role": "user", "content": "Tell me a long story about a small robot and a cat."}]]

    def ask(messages):
        r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
        return r.choices[0].message.content, r.usage.completion_tokens

    alone = [ask(m) for m in questions]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions * 2))
    assert together == alone * 2
