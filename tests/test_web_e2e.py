"""web_server.py in a real headless browser: `streamlit run` as a subprocess, Debian's chromium via playwright.

Uploads an image through the page's file input, asks a question in the chat input and waits for the streamed
answer; saves a screenshot (to images/web_server.png when run against a trained model, see E2E_OUT_DIR). Needs /usr/bin/chromium (`apt-get install -y chromium`)
and the `playwright` package (its own browser downloads are never used). Without them the test is skipped,
except under CI (CI=true), where it fails.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, tiny_config
from helpers import free_port, stop_process
from PIL import Image, ImageDraw

from checkpoints.checkpoint import save_checkpoint
from model.vlm import MiniMindVLM

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
README_SCREENSHOT = ROOT / "images" / "web_server.png"
README_INSIDE_SCREENSHOT = ROOT / "images" / "web_inside_the_model.png"
# With a trained model (MINIMIND_E2E_OUT_DIR + MINIMIND_E2E_CLIP, e.g. out/ and the demo's encoder after
# `make demo`) the test also refreshes the README's screenshot; with the tiny random model it keeps its own copy.
E2E_OUT_DIR = os.environ.get("MINIMIND_E2E_OUT_DIR")
E2E_CLIP = os.environ.get("MINIMIND_E2E_CLIP")
QUESTION = os.environ.get("MINIMIND_E2E_QUESTION", "What is in this picture?")


def require_browser() -> None:
    missing = [what for what, ok in [(CHROMIUM, os.path.exists(CHROMIUM)),
                                     ("the playwright package", importlib.util.find_spec("playwright") is not None)]
               if not ok]
    if not missing:
        return
    reason = (f"missing {' and '.join(missing)}: `apt-get install -y chromium` and "
              f"`pip install playwright` (never `playwright install`)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)




def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"streamlit not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def demo_image(path: Path) -> Path:
    img = Image.new("RGB", (320, 240), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 170, 320, 240], fill=(90, 160, 80))
    draw.ellipse([230, 25, 290, 85], fill=(250, 210, 60))
    draw.rectangle([60, 110, 170, 190], fill=(200, 60, 50))
    draw.polygon([(50, 110), (115, 60), (180, 110)], fill=(120, 60, 40))
    img.save(path)
    return path


@pytest.fixture
def server(tmp_path, tokenizer, tiny_clip_dir):
    """`streamlit run web_server.py` on a free port with a tiny random model; always stopped afterwards."""
    require_browser()
    out, clip = tmp_path / "out", tiny_clip_dir
    if E2E_OUT_DIR and E2E_CLIP:
        out, clip = Path(E2E_OUT_DIR).resolve(), Path(E2E_CLIP).resolve()
    else:
        torch.manual_seed(0)
        save_checkpoint(MiniMindVLM(tiny_config(tokenizer)), out / "64_vlm_sft.pth", tokenizer=PROJECT_TOKENIZER)
    port = free_port()
    log = tmp_path / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", "web_server.py", "--server.address", "127.0.0.1",
           "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
           "--browser.gatherUsageStats", "false",
           "--", "--out_dir", str(out), "--clip_path", str(clip),
           "--tokenizer_path", "model/minimind_tokenizer", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINIMIND_")}
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", proc, log)
        yield f"http://127.0.0.1:{port}", log
    finally:
        stop_process(proc, timeout=10)


def test_upload_ask_and_see_the_answer_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, log = server
    image = Path(os.environ["MINIMIND_E2E_IMAGE"]) if os.environ.get("MINIMIND_E2E_IMAGE") else \
        demo_image(tmp_path / "house.png")
    screenshot = README_SCREENSHOT if E2E_OUT_DIR else tmp_path / "web_server.png"
    inside_shot = README_INSIDE_SCREENSHOT if E2E_OUT_DIR else tmp_path / "web_inside_the_model.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(30_000)
            page.goto(url)
            expect(page.locator("h1")).to_contain_text("MiniMind-V (", timeout=120_000)  # model load; slow on a busy CPU
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(image))
            expect(page.locator('[data-testid="stImage"] img')).to_be_visible()

            chat_box = page.locator('[data-testid="stChatInputTextArea"]')
            chat_box.fill(QUESTION)
            chat_box.press("Enter")
            user = page.locator('[data-testid="stChatMessage"]:has([data-testid="stChatMessageAvatarUser"])')
            expect(user.first).to_contain_text(QUESTION)
            answer = page.locator('[data-testid="stChatMessage"]:has([data-testid="stChatMessageAvatarAssistant"]) '
                                  '[data-testid="stChatMessageContent"]').first
            expect(answer).to_have_text(re.compile(r"\S"))
            wait_until_stable(answer)
            assert not page.locator('[data-testid="stAlertContentError"]').count(), log.read_text()[-3000:]
            page.evaluate("document.querySelector('[data-testid=\"stMain\"]')?.scrollTo(0, 0)")  # title in view
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)

            # the "inside the model" panel under the answer: open it, wait for its heat map, screenshot it
            panel = page.locator('[data-testid="stExpander"]').filter(has_text="Inside the model").first
            panel.locator("summary").click()
            expect(panel.locator('[data-testid="stImage"] img')).to_be_visible(timeout=60_000)
            expect(panel).to_contain_text("Attention to the image:")
            expect(panel.locator("span.image-pos")).to_have_count(50)  # the marked image positions of the prompt
            assert not page.locator('[data-testid="stAlertContentError"]').count(), log.read_text()[-3000:]
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(inside_shot))
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    assert inside_shot.stat().st_size > 10_000


def wait_until_stable(locator, timeout: float = 30.0, quiet: float = 1.0) -> str:
    """The text once it has stopped changing for `quiet` seconds (the answer is still streaming before that)."""
    deadline = time.monotonic() + timeout
    text, since = locator.inner_text(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = locator.inner_text()
        if now != text:
            text, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return text
    return text
