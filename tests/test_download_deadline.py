"""scripts/download.py --deadline against a local server on 127.0.0.1 that sends a file one byte at a time.

The file is one of huggingface_hub's 10 MiB write chunks sent at once, then SLOW_BYTES more one at a time (what
arrived is written chunk by chunk, so the first chunk is the progress a resume keeps). The server is bounded
(every response ends after at most SLOW_BYTES x delay seconds) and stops with the test.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST_BYTES = 10 * 1024 * 1024  # huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
SLOW_BYTES = 40
FILE_BYTES = FAST_BYTES + SLOW_BYTES
CONTENT = bytes(range(256)) * (FAST_BYTES // 256) + bytes(range(65, 65 + SLOW_BYTES))


class SlowHub(BaseHTTPRequestHandler):
    """Just enough of the Hub's resolve endpoint for hf_hub_download: HEAD metadata, GET with Range, slowly."""

    def _metadata(self, length: int) -> None:
        self.send_header("X-Repo-Commit", "a" * 40)
        self.send_header("ETag", '"slowfile"')
        self.send_header("Content-Length", str(length))

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self._metadata(FILE_BYTES)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[len("bytes="):].split("-")[0])
        self.server.ranges.append(start)
        self.send_response(206 if start else 200)
        self._metadata(FILE_BYTES - start)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{FILE_BYTES - 1}/{FILE_BYTES}")
        self.end_headers()
        try:
            if start < FAST_BYTES:
                self.wfile.write(CONTENT[start:FAST_BYTES])
            for i in range(max(start, FAST_BYTES), FILE_BYTES):
                self.wfile.write(CONTENT[i:i + 1])
                self.wfile.flush()
                time.sleep(self.server.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (its process ended at the deadline)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def slow_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowHub)
    server.daemon_threads = True
    server.delay, server.ranges = 0.25, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _download(server, root: Path, deadline: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(root / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "download.py"), "--what", "tokenizer", "--root",
                           str(root), "--deadline", str(deadline)], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, time.monotonic() - t0


def test_a_trickling_file_stops_at_the_deadline_in_one_line_and_resumes(slow_hub, tmp_path):
    # the last 40 bytes at one per 0.25 s need 10 s; every single read arrives well within the per-read timeout
    proc, took = _download(slow_hub, tmp_path, deadline=1.5)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "deadline of 1.5 s" in lines[0] and "tokenizer.json" in lines[0], proc.stderr
    assert took < 8, f"ran {took:.1f} s past a 1.5 s deadline"
    target = tmp_path / "model" / "minimind_tokenizer_official" / "tokenizer.json"
    assert not target.exists()
    partial = list(target.parent.glob("tokenizer.json.*.part"))
    assert len(partial) == 1 and partial[0].stat().st_size == FAST_BYTES  # what arrived (whole chunks) is kept

    slow_hub.delay = 0.0
    proc, _ = _download(slow_hub, tmp_path, deadline=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert target.read_bytes() == CONTENT
    # tokenizer.json resumed where it stopped (not restarted), then tokenizer_config.json from its start
    assert slow_hub.ranges == [0, FAST_BYTES, 0], slow_hub.ranges


def test_the_deadline_flag_refuses_nonsense(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "download.py"), "--what", "tokenizer", "--root",
                           str(tmp_path), "--deadline", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--deadline must be a positive" in proc.stderr
