"""web_server.py through streamlit's AppTest (no browser) with a tiny random checkpoint and a tiny CLIP.

AppTest runs the script in this process with pytest's sys.argv, so the app is configured through the
environment variables it reads as argparse defaults (MINIMIND_OUT_DIR, MINIMIND_CLIP_PATH, ...).
"""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TOKENIZER_PATH, save_tiny_vlm
from helpers import count_prompt_images
from PIL import Image

from inference.chat import VLMChat
from model.decoder import count_parameters
from data_pipeline.image_decode import ImageError

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import web_server  # noqa: E402
from inference import web_support  # noqa: E402

APP = str(ROOT / "web_server.py")


def png_bytes(color=(200, 30, 30), size=(40, 32), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer) -> tuple[Path, int]:
    """A tiny random VLM saved the way training saves it: (path, parameter count)."""
    path = tmp_path_factory.mktemp("ckpt") / "64_vlm_sft.pth"
    return path, count_parameters(save_tiny_vlm(path, tokenizer))


@pytest.fixture
def out_dir(tmp_path, tiny_ckpt) -> Path:
    """A private out/ per test (some tests delete or add files in it)."""
    out = tmp_path / "out"
    out.mkdir()
    for src in tiny_ckpt[0].parent.iterdir():
        shutil.copy(src, out / src.name)
    return out


@pytest.fixture
def app(monkeypatch, out_dir, tiny_clip_dir) -> AppTest:
    monkeypatch.setenv("MINIMIND_OUT_DIR", str(out_dir))
    monkeypatch.setenv("MINIMIND_CLIP_PATH", str(tiny_clip_dir))
    monkeypatch.setenv("MINIMIND_TOKENIZER_PATH", TOKENIZER_PATH)
    monkeypatch.setenv("MINIMIND_DEVICE", "cpu")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    at.slider(key="max_new_tokens").set_value(16)
    return at


def upload(at: AppTest, name: str, data: bytes, mime: str = "image/png", *more: tuple[str, bytes, str]) -> AppTest:
    at.file_uploader(key="uploader").set_value([(name, data, mime), *more])
    at.run()
    assert not at.exception, at.exception
    return at


def ask(at: AppTest, question: str) -> AppTest:
    torch.manual_seed(0)  # sampling uses the global generator: fixed answers
    at.chat_input(key="question").set_value(question)
    at.run()
    assert not at.exception, at.exception
    return at


def messages(at: AppTest) -> list[tuple[str, str]]:
    return [(m.name, "".join(md.value for md in m.markdown)) for m in at.chat_message]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


@pytest.fixture
def one_turn(app) -> AppTest:
    """The app after an uploaded image and one answered question."""
    upload(app, "red.png", png_bytes())
    ask(app, "What colour is the square?")
    assert len(app.session_state["history"]) == 1
    assert len(messages(app)) == 2
    return app


def assert_conversation_kept(at: AppTest, n_turns: int = 1) -> None:
    assert len(at.session_state["history"]) == n_turns
    assert len(messages(at)) == 2 * n_turns
    assert messages(at)[0] == ("user", "What colour is the square?")


# ------------------------------------------------------------------------------------------ plain functions


def test_list_checkpoints_sorted_with_sizes(tmp_path):
    assert web_server.list_checkpoints(str(tmp_path / "missing")) == []
    (tmp_path / "a_llm.pth").write_bytes(b"x" * 2**20)
    (tmp_path / "512_vlm_sft.pth").write_bytes(b"x" * (2**20 // 2))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "64_vlm_sft.config.json").write_text("{}")
    found = web_server.list_checkpoints(str(tmp_path))
    assert [c.name for c in found] == ["512_vlm_sft.pth", "a_llm.pth"]
    assert [c.label for c in found] == ["512_vlm_sft.pth (0.5 MB)", "a_llm.pth (1.0 MB)"]


def test_validate_upload():
    assert web_support.validate_upload("ok.png", png_bytes()).size == (40, 32)
    with pytest.raises(ImageError, match=r"big.png: 10.0 MB is over the 10 MB upload limit"):
        web_support.validate_upload("big.png", b"\0" * (10 * 2**20 + 1))
    with pytest.raises(ImageError, match="notes.txt: not an accepted image type"):
        web_support.validate_upload("notes.txt", png_bytes())
    with pytest.raises(ImageError, match="fake.jpg: not an image"):
        web_support.validate_upload("fake.jpg", b"hello world")
    with pytest.raises(ImageError, match="cut.png: corrupt or truncated"):
        web_support.validate_upload("cut.png", png_bytes(size=(200, 200))[:-200])
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = web_support.validate_upload("anim.gif", buf.getvalue())
    assert first.mode == "RGB" and first.getpixel((8, 8))[0] > 200  # the first (red) frame


def test_parse_args_env_defaults_and_flags():
    env = {"MINIMIND_OUT_DIR": "/env/out", "MINIMIND_DEVICE": "cpu"}
    args = web_support.parse_args(["-q", "tests/x.py", "--clip_path", "/my/clip"], ROOT, env)
    assert (args.out_dir, args.clip_path, args.device) == ("/env/out", "/my/clip", "cpu")
    assert args.tokenizer_path is None  # the checkpoint's own tokenizer
    assert web_support.parse_args(["--out_dir", "/flag/out"], ROOT, env).out_dir == "/flag/out"


def test_stand_in_clip_only_with_a_warning(tmp_path):
    default = str(tmp_path / web_support.DEFAULT_CLIP_PATH)
    assert web_support.resolve_clip_path(default, tmp_path) == (default, None)  # nothing to fall back to
    stand_in = tmp_path / web_support.STAND_IN_CLIP_PATH
    stand_in.mkdir(parents=True)
    (stand_in / "config.json").write_text("{}")
    path, warning = web_support.resolve_clip_path(default, tmp_path)
    assert path == str(stand_in) and "UNTRAINED stand-in" in warning
    assert web_support.resolve_clip_path("/explicit/clip", tmp_path) == ("/explicit/clip", None)  # given: kept


# ------------------------------------------------------------------------------------------------- the page


def test_page_title_checkpoint_picker_and_controls(app, tiny_ckpt):
    assert app.title[0].value == f"MiniMind-V ({tiny_ckpt[1] / 1e6:.2f} M)"
    picker = app.sidebar.selectbox(key="checkpoint")
    assert len(picker.options) == 1 and picker.options[0].startswith("64_vlm_sft.pth (") and " MB)" in picker.value
    ranges = {key: (app.slider(key=key).min, app.slider(key=key).max)
              for key in ["temperature", "top_k", "top_p", "max_new_tokens"]}
    assert ranges == {"temperature": (0.0, 1.5), "top_k": (1, 50), "top_p": (0.1, 1.0), "max_new_tokens": (16, 1024)}
    assert "10 MB" in app.file_uploader(key="uploader").label
    assert not errors(app)


def test_upload_ask_and_answer_streams_into_history(app):
    upload(app, "red.png", png_bytes())
    assert len(app.image) == 1 and app.session_state["image_names"] == ["red.png"]
    ask(app, "What colour is the square?")
    (role_q, text_q), (role_a, text_a) = messages(app)
    assert (role_q, text_q, role_a) == ("user", "What colour is the square?", "assistant")
    question, answer = app.session_state["history"][0]
    assert question == "What colour is the square?"
    assert text_a.strip() == (answer or "_(empty answer)_")
    assert not errors(app)


def test_answer_is_streamed_piece_by_piece(app, monkeypatch):
    pieces = []

    def fake_stream(self, question, image=None, history=(), settings=None, stats=None):
        for piece in ["It ", "is ", "red."]:
            pieces.append(piece)
            yield piece

    monkeypatch.setattr(VLMChat, "stream", fake_stream)
    upload(app, "red.png", png_bytes())
    ask(app, "What colour?")
    assert pieces == ["It ", "is ", "red."]
    assert messages(app)[1] == ("assistant", "It is red.")
    assert app.session_state["history"] == [("What colour?", "It is red.")]


def test_multi_turn_feeds_history_to_the_model(one_turn, monkeypatch):
    seen = []
    original = VLMChat.build_prompt

    def spy(self, question, history=(), has_image=True, reserve=0):
        ids = original(self, question, history, has_image, reserve)
        seen.append((question, list(history), has_image, self.tokenizer.decode(ids)))
        return ids

    monkeypatch.setattr(VLMChat, "build_prompt", spy)
    first = one_turn.session_state["history"][0]
    ask(one_turn, "And its shape?")
    question, history, has_image, prompt = seen[-1]
    assert (question, history, has_image) == ("And its shape?", [first], True)
    assert "What colour is the square?" in prompt and prompt.index("What colour") < prompt.index("And its shape?")
    assert [q for q, _ in one_turn.session_state["history"]] == ["What colour is the square?", "And its shape?"]
    assert [role for role, _ in messages(one_turn)] == ["user", "assistant"] * 2


def test_clear_chat(one_turn):
    one_turn.button(key="clear_chat").click().run()
    assert one_turn.session_state["history"] == [] and not messages(one_turn)
    assert one_turn.session_state["images"]  # the image stays: ask again about it
    ask(one_turn, "Again?")
    assert len(one_turn.session_state["history"]) == 1


def test_new_image_starts_a_new_conversation(one_turn):
    upload(one_turn, "blue.png", png_bytes(color=(0, 0, 220)))
    assert one_turn.session_state["history"] == [] and not messages(one_turn)
    assert one_turn.session_state["image_names"] == ["blue.png"]
    assert any("new conversation" in i.value for i in one_turn.info)


def test_several_uploads_are_asked_about_together(app, monkeypatch):
    seen = count_prompt_images(monkeypatch)
    upload(app, "red.png", png_bytes(), "image/png", ("blue.png", png_bytes(color=(0, 0, 220)), "image/png"))
    assert app.session_state["image_names"] == ["red.png", "blue.png"] and len(app.session_state["images"]) == 2
    ask(app, "Are they the same colour?")
    assert seen == [2] and len(app.session_state["history"]) == 1 and not errors(app)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, data, mime, expected", [
    ("notes.txt", b"just some text", "text/plain", "notes.txt: not an accepted image type"),
    ("notes.png", b"just some text", "image/png", "notes.png: not an image"),
    ("cut.png", png_bytes(size=(200, 200))[:-200], "image/png", "cut.png: corrupt or truncated"),
    ("big.png", b"\0" * (10 * 2**20 + 1), "image/png", "over the 10 MB upload limit"),
])
def test_bad_upload_shows_error_and_keeps_conversation(one_turn, name, data, mime, expected):
    upload(one_turn, name, data, mime)
    assert any(expected in e and "Still using the previous image (red.png)" in e for e in errors(one_turn)), \
        errors(one_turn)
    assert_conversation_kept(one_turn)
    assert one_turn.session_state["image_names"] == ["red.png"]
    ask(one_turn, "Still there?")  # the previous image and conversation go on
    assert len(one_turn.session_state["history"]) == 2


def test_bad_first_upload(app):
    upload(app, "notes.png", b"not an image")
    assert any("notes.png: not an image" in e and "Upload an image" in e for e in errors(app))
    assert app.session_state["images"] == []


@pytest.mark.parametrize("size", [(700, 1), (1, 700), (5000, 2), (1, 1)])
def test_an_image_of_any_aspect_ratio_is_shown_and_asked_about(app, size):
    """A 700x1 PNG raised 'height and width must be > 0' in the page's image display on every rerun, and the
    question box never rendered until the upload was cleared."""
    upload(app, "line.png", png_bytes(size=size))
    assert len(app.image) == 1 and not errors(app)
    app.run()  # a rerun shows it again
    assert not app.exception and len(app.image) == 1
    ask(app, "What is this?")
    assert len(app.session_state["history"]) == 1 and not errors(app)


def test_display_copy_keeps_every_side_at_least_one_pixel():
    line = Image.new("RGB", (700, 1))
    assert web_support.display_copy(line, 320).size == (320, 1)
    small = Image.new("RGB", (40, 32))
    assert web_support.display_copy(small, 320) is small  # narrow enough: shown as it is


def test_more_images_than_the_model_takes_are_refused_before_decoding(one_turn, monkeypatch):
    """300 tiny uploads made a 15,312-token prompt for a 200-token model. The page applies the API's rule: at
    most 8 per question, fewer when the context cannot hold their spans (the tiny model's 160 holds 2)."""
    decoded = []
    monkeypatch.setattr(web_support, "open_image", lambda data, name: decoded.append(name))
    files = [(f"{i}.png", png_bytes(color=(i, 0, 0)), "image/png") for i in range(300)]
    for n in (300, 3):
        expected = f"{n} images are too many: this model's context (160 tokens) holds at most 2 image(s)"
        upload(one_turn, *files[0], *files[1:n])
        assert any(expected in e and "Still using the previous image (red.png)" in e for e in errors(one_turn)), \
            errors(one_turn)
        assert decoded == [] and one_turn.session_state["image_names"] == ["red.png"]
        assert_conversation_kept(one_turn)
    assert "up to 2 are asked about together" in one_turn.file_uploader(key="uploader").label
    ask(one_turn, "Still there?")  # the chat input is there and the previous image goes on
    assert len(one_turn.session_state["history"]) == 2


@pytest.mark.parametrize("question", ["", "   \n\t "])
def test_empty_question(one_turn, question):
    ask(one_turn, question)
    assert any("The question is empty" in e for e in errors(one_turn))
    assert_conversation_kept(one_turn)


def test_missing_checkpoint_keeps_server_and_conversation(one_turn, out_dir):
    for f in out_dir.iterdir():
        f.unlink()
    one_turn.run()
    assert not one_turn.exception
    assert any("No checkpoint (*.pth or model directory) in" in e and "make demo" in e for e in errors(one_turn)), errors(one_turn)
    assert one_turn.title[0].value == "MiniMind-V (no model loaded)"
    assert_conversation_kept(one_turn)
    ask(one_turn, "Anyone there?")
    assert any("No model is loaded" in e for e in errors(one_turn))
    assert_conversation_kept(one_turn)


def test_missing_out_dir_from_the_start(monkeypatch, tmp_path, tiny_clip_dir):
    monkeypatch.setenv("MINIMIND_OUT_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("MINIMIND_CLIP_PATH", str(tiny_clip_dir))
    monkeypatch.setenv("MINIMIND_DEVICE", "cpu")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    assert any("No checkpoint (*.pth or model directory) in" in e for e in errors(at))


def test_corrupt_checkpoint(one_turn, out_dir):
    (out_dir / "64_vlm_sft.pth").write_bytes(b"PK\x03\x04 not really a checkpoint")
    one_turn.run()
    assert not one_turn.exception
    assert any("Could not load the model" in e and "corrupt or truncated checkpoint" in e for e in errors(one_turn))
    assert_conversation_kept(one_turn)


def test_missing_clip_keeps_server_and_conversation(one_turn, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMIND_CLIP_PATH", str(tmp_path / "no_clip"))
    one_turn.run()
    assert not one_turn.exception
    assert any("CLIP vision encoder not found" in e and "scripts/download.py --what clip" in e
               for e in errors(one_turn)), errors(one_turn)
    assert_conversation_kept(one_turn)


def test_generation_error_is_shown_and_conversation_kept(one_turn, monkeypatch):
    def broken(self, *args, **kwargs):
        yield "partial "
        raise RuntimeError("out of memory")

    monkeypatch.setattr(VLMChat, "stream", broken)
    ask(one_turn, "Will this fail?")
    assert any("Generation failed: RuntimeError: out of memory" in e for e in errors(one_turn))
    assert messages(one_turn)[2:] == [("user", "Will this fail?"), ("assistant", "partial")]  # shown where it failed
    assert len(one_turn.session_state["history"]) == 1  # but not kept as a turn
    one_turn.run()
    assert_conversation_kept(one_turn)


def test_typed_image_placeholder_cannot_forge_a_span(one_turn):
    """A question holding the placeholder (or just its 25 '<') is answered; before, the model refused the prompt."""
    from model.config import IMAGE_SPECIAL_TOKEN

    for question in ["<" * 25 + " what is this?", IMAGE_SPECIAL_TOKEN]:
        ask(one_turn, question)
        assert not errors(one_turn), errors(one_turn)
    assert len(one_turn.session_state["history"]) == 3
    assert one_turn.session_state["history"][-1][0] == IMAGE_SPECIAL_TOKEN  # shown and kept as typed


# ------------------------------------------------------------------------------------ inside the model panel


def open_inside_panel(at: AppTest, turn: int = 0) -> AppTest:
    """Open the panel under answer `turn` the way a click does: its keyed expander state, then a rerun."""
    keys = list(at.session_state["turn_ids"])
    at.session_state[f"inside_{keys[turn]}"] = True
    at.run()
    assert not at.exception, at.exception
    return at


def test_inside_panel_is_closed_and_computes_nothing_until_opened(one_turn):
    at = one_turn
    assert [e.label for e in at.expander] == ["Inside the model: where this answer looks in the image"]
    assert not at.expander[0].get("select_slider") and at.session_state["inspections"] == {}
    ask(at, "And its shape?")  # a second answer: still nothing computed, one panel per answer
    assert len(at.expander) == 2 and at.session_state["inspections"] == {}


def test_inside_panel_shows_heat_map_token_and_layer_choice_and_the_prompt(one_turn):
    at = open_inside_panel(one_turn)
    (key,) = at.session_state["inspections"]
    maps = at.session_state["inspections"][key]
    panel = at.expander[0]
    token, layer = panel.select_slider
    assert token.label == "Answer token" and token.value == "whole answer"
    assert layer.label == "Layer" and layer.value == "all layers (mean)"
    assert len(token.options) == 1 + len(at.session_state["turn_ids"][key][1])
    assert layer.options == ["all layers (mean)", "layer 0", "layer 1"]
    assert len(panel.get("image")) == 1
    share = f"{100 * float(maps.image_share().mean()):.1f}%"
    assert any(f"**Attention to the image:** {share}" in m.value for m in panel.markdown)
    prompt = panel.markdown[-1].value
    assert prompt.count('class="image-pos"') == 50 and 'title="position ' + str(maps.image_start) + ': CLS"' in prompt

    layer.set_value("layer 1")
    token.set_value(token.options[1])
    at.run()
    assert not at.exception, at.exception
    grid, cls = maps.patch_grid(layer=1, query=0), maps.cls_weight(layer=1, query=0)
    one = f"{100 * (cls + float(grid.sum())):.1f}%"
    assert any(f"**Attention to the image:** {one}" in m.value for m in at.expander[0].markdown)
    assert list(at.session_state["inspections"]) == [key]  # computed once, reused when the choice changes


def test_inside_panel_is_reset_with_the_conversation(one_turn):
    at = open_inside_panel(one_turn)
    assert at.session_state["inspections"]
    upload(at, "blue.png", png_bytes(color=(20, 40, 220)))
    assert at.session_state["inspections"] == {} and at.session_state["turn_ids"] == {} and not at.expander
