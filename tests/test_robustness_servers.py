"""The two servers under abuse: the streamlit web demo and the OpenAI-compatible API, each started as a real
process on 127.0.0.1 with a tiny model. Each must stay up through 200 sequential bad requests and then answer a
burst of 20 concurrent good ones, and its resident memory must not grow by more than 10% between the first
hundred bad requests and the second hundred. Only loopback addresses; every loop is bounded in count and time.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, tiny_config
from helpers import free_port, stop_process
from PIL import Image

from checkpoints.checkpoint import save_checkpoint
from model.vlm import MiniMindVLM

HOST = "127.0.0.1"
N_BAD = 200
N_GOOD = 20
MAX_RSS_GROWTH = 0.10


# ------------------------------------------------------------------------------------------------- helpers


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def request(port: int, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None,
            timeout: float = 30) -> tuple[Optional[int], bytes]:
    """One HTTP request with the path sent as given (no normalisation); (status, body), or (None, b"") when the
    server closed the connection without answering (allowed only for requests that break HTTP itself)."""
    headers = dict(headers or {})
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            headers["Content-Length"] = str(len(body))
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        try:
            if body:
                conn.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (e.g. 413) and stopped reading: read that answer below
        response = conn.getresponse()
        return response.status, response.read()
    except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
        return None, b""
    finally:
        conn.close()


def raw(port: int, payload: bytes, timeout: float = 10) -> bytes:
    """Bytes that are not well-formed HTTP; returns what the server answers before closing (maybe nothing)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, socket.timeout):
            pass
        return b"".join(chunks)


def chunked(data: bytes, size: int = 1 << 16) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size])
                    for i in range(0, len(data), size)) + b"0\r\n\r\n"


def png(color=(200, 30, 60), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))


def start(cmd: list[str], log: Path, health_path: str, port: int, timeout: float = 120) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIMIND_")}
    env.update(OMP_NUM_THREADS="2", TRANSFORMERS_VERBOSITY="error")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{cmd[1]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        status, _ = request(port, "GET", health_path, timeout=5) if _port_open(port) else (None, b"")
        if status == 200:
            return proc
        time.sleep(0.3)
    stop_process(proc)
    pytest.fail(f"{cmd[1]} not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) == 0




def abuse(proc: subprocess.Popen, port: int, health_path: str, bad: list[Callable[[int], Optional[int]]],
          log: Path) -> tuple[int, int, dict]:
    """Send N_BAD bad requests (cycling through `bad`); (RSS after 100, RSS after 200, status counts).
    Each bad request returns its HTTP status (None: the connection was closed without an answer)."""
    statuses: dict = {}
    rss = []
    t0 = time.monotonic()
    for i in range(N_BAD):
        assert time.monotonic() - t0 < 240, "bad requests took too long"
        kind = bad[i % len(bad)]
        status = kind(port)
        statuses.setdefault(kind.__name__, set()).add(status)
        assert status is None or status < 500, (kind.__name__, status, log.read_text()[-3000:])
        assert proc.poll() is None, f"server died after {kind.__name__}:\n{log.read_text()[-3000:]}"
        if i + 1 in (N_BAD // 2, N_BAD):
            assert request(port, "GET", health_path)[0] == 200
            rss.append(rss_bytes(proc.pid))
    return rss[0], rss[1], statuses


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("servers") / "out"
    torch.manual_seed(0)
    save_checkpoint(MiniMindVLM(tiny_config(tokenizer)), out / "64_vlm_sft.pth", tokenizer=PROJECT_TOKENIZER)
    return out


# ------------------------------------------------------------------------------------------------- streamlit
class StreamlitSession:
    """A browser tab's worth of the streamlit protocol: a websocket session that runs the script once."""

    def __init__(self, port: int, timeout: float = 120):
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(f"ws://{HOST}:{port}/_stcore/stream", subprotocols=["streamlit"],
                                                    open_timeout=30, close_timeout=5, max_size=2 ** 24))
        self.session_id: Optional[str] = None
        self.texts: list[str] = []
        self.run(timeout)

    def run(self, timeout: float) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        msg = BackMsg()
        msg.rerun_script.query_string = ""
        msg.rerun_script.page_script_hash = ""
        self.ws.send(msg.SerializeToString())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fwd = ForwardMsg()
            fwd.ParseFromString(self.ws.recv(timeout=max(1.0, deadline - time.monotonic())))
            kind = fwd.WhichOneof("type")
            if kind == "new_session":
                self.session_id = fwd.new_session.initialize.session_id
            elif kind == "delta":
                self.texts.append(str(fwd.delta))
            elif kind == "script_finished":
                return
        raise TimeoutError("the script run did not finish")

    def close(self) -> None:
        self._stack.close()


def multipart(files: list[tuple[str, bytes, str]], boundary: str = "----minimindtest") -> tuple[bytes, str]:
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file{i or ''}\"; filename=\"{name}\"\r\n"
              f"Content-Type: {mime}\r\n\r\n").encode() + data + b"\r\n" for i, (name, data, mime) in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def xsrf_headers() -> dict[str, str]:
    from streamlit.web.server.starlette.starlette_app_utils import generate_xsrf_token_string

    token = generate_xsrf_token_string()
    return {"X-Xsrftoken": token, "Cookie": f"_streamlit_xsrf={token}"}


def upload(port: int, session_id: str, files, xsrf: bool = True, content_type: Optional[str] = None,
           body: Optional[bytes] = None, extra: Optional[dict] = None) -> Optional[int]:
    data, ctype = multipart(files)
    headers = {"Content-Type": content_type or ctype, **(xsrf_headers() if xsrf else {}), **(extra or {})}
    return request(port, "PUT", f"/_stcore/upload_file/{session_id}/{uuid.uuid4()}",
                   data if body is None else body, headers)[0]


def streamlit_bad_requests(session_id: str) -> list[Callable[[int], Optional[int]]]:
    good = [("ok.png", png(), "image/png")]

    def upload_unknown_session(port):
        return upload(port, "no-such-session", good)

    def upload_without_xsrf(port):
        return upload(port, session_id, good, xsrf=False)

    def upload_not_multipart(port):
        return upload(port, session_id, good, content_type="text/plain", body=b"just some text")

    def upload_torn_multipart(port):
        data, _ = multipart(good)
        return upload(port, session_id, good, body=data[: len(data) // 2])

    def upload_two_files(port):
        return upload(port, session_id, good * 2)

    def upload_declared_too_large(port):
        return upload(port, session_id, good, extra={"Content-Length": str(50 * 2 ** 20)}, body=b"x" * 100)

    def upload_streamed_too_large(port):  # no Content-Length: the server must stop reading at its limit
        data, _ = multipart([("big.png", b"\0" * (11 * 2 ** 20), "image/png")])
        headers = {"Content-Type": multipart(good)[1], "Transfer-Encoding": "chunked", **xsrf_headers()}
        return request(port, "PUT", f"/_stcore/upload_file/{session_id}/{uuid.uuid4()}", chunked(data), headers)[0]

    def upload_bad_content_length(port):
        return upload(port, session_id, good, extra={"Content-Length": "abc"})

    def upload_corrupt_images(port):  # stored as bytes: decoding happens in the script, which reports it
        return upload(port, session_id, [("bomb.png", bomb_png(), "image/png")])

    def delete_unknown_upload(port):
        return request(port, "DELETE", f"/_stcore/upload_file/{session_id}/nothing", headers=xsrf_headers())[0]

    def get_upload_route(port):
        return request(port, "GET", f"/_stcore/upload_file/{session_id}/x")[0]

    def path_traversal(port):
        return request(port, "GET", "/../../../../etc/passwd")[0]

    def encoded_traversal(port):
        return request(port, "GET", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd")[0]

    def component_traversal(port):
        return request(port, "GET", "/component/x/../../../../etc/passwd")[0]

    def random_path(port):
        return request(port, "GET", f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}.png")[0]

    def missing_media(port):
        return request(port, "GET", f"/media/{uuid.uuid4().hex}.png")[0]

    def very_long_path(port):
        return request(port, "GET", "/" + "a" * 20000)[0]

    def post_health(port):
        return request(port, "POST", "/_stcore/health", b"{}", {"Content-Type": "application/json"})[0]

    def stream_without_upgrade(port):
        return request(port, "GET", "/_stcore/stream")[0]

    def junk_bytes(port):
        answer = raw(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200))  # a TLS hello
        return int(answer.split()[1]) if answer.startswith(b"HTTP/") else None

    def junk_websocket_frame(port):
        from websockets.sync.client import connect

        with connect(f"ws://{HOST}:{port}/_stcore/stream", subprotocols=["streamlit"], open_timeout=10) as ws:
            ws.send(b"\xff\x00not a protobuf" * 10)
            try:
                ws.recv(timeout=10)
            except Exception:  # noqa: BLE001 - the server closes the socket: that is the answer
                pass
        return None

    return [upload_unknown_session, upload_without_xsrf, upload_not_multipart, upload_torn_multipart,
            upload_two_files, upload_declared_too_large, upload_streamed_too_large, upload_bad_content_length,
            upload_corrupt_images, delete_unknown_upload, get_upload_route, path_traversal, encoded_traversal,
            component_traversal, random_path, missing_media, very_long_path, post_health, stream_without_upgrade,
            junk_bytes, junk_websocket_frame]


def test_web_demo_survives_bad_requests_and_a_burst(model_dir, tiny_clip_dir, tmp_path):
    pytest.importorskip("streamlit")
    pytest.importorskip("websockets")
    port = free_port()
    log = tmp_path / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", "web_server.py", "--server.address", HOST,
           "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false", "--", "--out_dir", str(model_dir), "--clip_path",
           str(tiny_clip_dir), "--tokenizer_path", TOKENIZER_PATH, "--device", "cpu"]
    proc = start(cmd, log, "/_stcore/health", port)
    try:
        first = StreamlitSession(port)  # loads the model once; its session id makes uploads reach the parser
        assert any("MiniMind-V (0." in t for t in first.texts), first.texts[:5]
        assert upload(port, first.session_id, [("ok.png", png(), "image/png")]) == 204
        rss_100, rss_200, statuses = abuse(proc, port, "/_stcore/health",
                                           streamlit_bad_requests(first.session_id), log)
        assert statuses["upload_unknown_session"] == {400} and statuses["upload_without_xsrf"] == {403}
        assert statuses["upload_declared_too_large"] == {413} and statuses["upload_streamed_too_large"] <= {413, None}
        assert statuses["upload_two_files"] == {400} and statuses["upload_not_multipart"] == {400}
        for path in ("/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd"):
            assert b"root:" not in request(port, "GET", path)[1]  # no file outside the app is served
        assert rss_200 <= rss_100 * (1 + MAX_RSS_GROWTH), (rss_100, rss_200)
        first.close()

        def good(_):
            session = StreamlitSession(port)
            try:
                ok = upload(port, session.session_id, [("ok.png", png((10, 200, 10)), "image/png")])
                return ok, any("MiniMind-V (0." in t for t in session.texts)
            finally:
                session.close()

        with ThreadPoolExecutor(N_GOOD) as pool:
            results = list(pool.map(good, range(N_GOOD), timeout=300))
        assert results == [(204, True)] * N_GOOD, results
        assert request(port, "GET", "/_stcore/health")[0] == 200 and proc.poll() is None
    finally:
        stop_process(proc)


# ------------------------------------------------------------------------------------------------- the API
def api_bad_requests(image_dir: Path) -> list[Callable[[int], Optional[int]]]:
    path = "/v1/chat/completions"
    json_headers = {"Content-Type": "application/json"}

    def post(port, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return request(port, "POST", path, data, {**json_headers, **(headers or {})})[0]

    def image_message(url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "what?"}]}], "max_tokens": 2}

    def data_uri(data: bytes, mime="image/png") -> str:
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"

    good_png = png()

    def malformed_json(port):
        return post(port, b'{"messages": [{"role": "user", "content": "hi"')

    def not_utf8(port):
        return post(port, b'{"messages": "\xff\xfe"}')

    def json_array(port):
        return post(port, [1, 2, 3])

    def no_messages(port):
        return post(port, {"model": "x"})

    def empty_messages(port):
        return post(port, {"messages": []})

    def messages_not_a_list(port):
        return post(port, {"messages": "hello"})

    def unknown_role(port):
        return post(port, {"messages": [{"role": "wizard", "content": "hi"}]})

    def assistant_last(port):
        return post(port, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]})

    def bad_max_tokens(port):
        return post(port, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5})

    def huge_max_tokens(port):
        return post(port, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 12})

    def truncated_image(port):
        return post(port, image_message(data_uri(good_png[: len(good_png) // 2])))

    def text_as_image(port):
        return post(port, image_message(data_uri(b"this is not an image", "image/jpeg")))

    def bomb_image(port):
        return post(port, image_message(data_uri(bomb_png())))

    def bad_base64(port):
        return post(port, image_message("data:image/png;base64,@@@not*base64@@@"))

    def remote_url(port):  # never fetched
        return post(port, image_message("http://203.0.113.1/cat.png"))

    def path_escape(port):
        return post(port, image_message("../../../../etc/passwd"))

    def three_images(port):
        body = image_message(data_uri(good_png))
        body["messages"][0]["content"] *= 3
        return post(port, body)

    def oversize_declared(port):
        return post(port, b"{}", {"Content-Length": str(50 * 2 ** 20)})

    def oversize_streamed(port):  # chunked, no Content-Length: the server must stop at its limit
        body = json.dumps(image_message(data_uri(os.urandom(3 * 2 ** 20)))).encode()
        return request(port, "POST", path, chunked(body), {**json_headers, "Transfer-Encoding": "chunked"})[0]

    def deeply_nested(port):
        return post(port, b"[" * 100000 + b"]" * 100000)

    def wrong_method(port):
        return request(port, "GET", path)[0]

    def unknown_path(port):
        return request(port, "GET", f"/v1/{uuid.uuid4().hex}/../../etc/passwd")[0]

    def unknown_model(port):
        return request(port, "GET", "/v1/models/%00nothing")[0]

    def junk_bytes(port):
        answer = raw(port, b"NOT HTTP AT ALL\r\n\x00\x01\x02\r\n\r\n")
        return int(answer.split()[1]) if answer.startswith(b"HTTP/") else None

    return [malformed_json, not_utf8, json_array, no_messages, empty_messages, messages_not_a_list, unknown_role,
            assistant_last, bad_max_tokens, huge_max_tokens, truncated_image, text_as_image, bomb_image, bad_base64,
            remote_url, path_escape, three_images, oversize_declared, oversize_streamed, deeply_nested,
            wrong_method, unknown_path, unknown_model, junk_bytes]


def test_api_server_survives_bad_requests_and_a_burst(model_dir, tiny_clip_dir, tmp_path):
    script = ROOT / "serve_openai_api.py"
    assert script.is_file(), f"{script} is missing"
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    (image_dir / "cat.png").write_bytes(png())
    port = free_port()
    log = tmp_path / "api.log"
    cmd = [sys.executable, str(script), "--ckpt", str(model_dir / "64_vlm_sft.pth"), "--clip_path",
           str(tiny_clip_dir), "--tokenizer_path", TOKENIZER_PATH, "--host", HOST, "--port", str(port),
           "--image_dir", str(image_dir), "--max_body_mb", "1", "--log_level", "warning"]
    proc = start(cmd, log, "/health", port)
    try:
        rss_100, rss_200, statuses = abuse(proc, port, "/health", api_bad_requests(image_dir), log)
        expected = {"malformed_json": {400}, "no_messages": {400}, "truncated_image": {400}, "bomb_image": {400},
                    "remote_url": {400}, "path_escape": {403}, "oversize_declared": {413}, "deeply_nested": {400},
                    "wrong_method": {405}}
        assert {k: statuses[k] for k in expected} == expected, statuses
        assert statuses["oversize_streamed"] <= {413, None}
        assert rss_200 <= rss_100 * (1 + MAX_RSS_GROWTH), (rss_100, rss_200)

        image = f"data:image/png;base64,{base64.b64encode(png((10, 200, 10))).decode()}"

        def good(i):
            content = [{"type": "image_url", "image_url": {"url": image if i % 2 else "cat.png"}},
                       {"type": "text", "text": f"What is in picture {i}?"}]
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "seed": i,
                    "stream": i % 4 == 0}
            status, data = request(port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                                   {"Content-Type": "application/json"}, timeout=120)
            if body["stream"]:
                return status, data.rstrip().endswith(b"data: [DONE]")
            return status, isinstance(json.loads(data)["choices"][0]["message"]["content"], str)

        with ThreadPoolExecutor(N_GOOD) as pool:
            results = list(pool.map(good, range(N_GOOD), timeout=300))
        assert results == [(200, True)] * N_GOOD, results
        assert request(port, "GET", "/health")[0] == 200 and proc.poll() is None
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]
    finally:
        stop_process(proc)
