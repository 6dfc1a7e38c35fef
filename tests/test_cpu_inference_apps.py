"""--quantize and --cpu_kernel in every chat app: 3-eval_chat.py (answers, --eval_data), serve_openai_api.py (run
in-process, its uvicorn replaced by a test client), the web page's int8 toggle (streamlit AppTest) and the dynamic
batcher on an int8 model. The model is tiny and trained to answer one question about a red square, so its greedy
answer has clear margins and int8 must give fp32's answer (a random model's tokens are near ties)."""
from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, tiny_config
from helpers import load_script, train_to_answer
from PIL import Image

from inference.batcher import DecodeRequest, DynamicBatcher
from inference.chat import GenerationSettings, VLMChat
from checkpoints.checkpoint import save_checkpoint
from model.decoder import count_parameters
from inference.cpu.quantize import is_int8
from checkpoints.tokenizer import encode
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM

QUESTION = "What colour is the square?"
ANSWER = "A red square."  # 8 tokens: --eval_data's answers are 8 tokens long at most
RED = (220, 30, 30)
GREEDY = GenerationSettings(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def answering(tmp_path_factory, tokenizer, tiny_clip_dir) -> dict:
    """A checkpoint trained to answer QUESTION about a red square with ANSWER (the fp32 answer, checked), the
    image file, and the CLIP directory."""
    folder = tmp_path_factory.mktemp("answering")
    image = Image.new("RGB", (32, 32), RED)
    image.save(folder / "red.png")
    torch.manual_seed(0)
    chat = VLMChat(MiniMindVLM(tiny_config(tokenizer)), tokenizer, load_vision_encoder(str(tiny_clip_dir), "cpu"))
    train_to_answer(chat, QUESTION, image, ANSWER)
    out = folder / "out"
    out.mkdir()
    save_checkpoint(chat.model, out / "64_vlm_sft.pth", tokenizer=PROJECT_TOKENIZER)
    fp32 = VLMChat.load(out / "64_vlm_sft.pth", str(tiny_clip_dir), TOKENIZER_PATH)
    assert "".join(fp32.stream(QUESTION, image, settings=GREEDY)) == ANSWER  # the fp32 model learnt it
    return {"ckpt": out / "64_vlm_sft.pth", "out": out, "image": folder / "red.png", "clip": str(tiny_clip_dir)}


# ------------------------------------------------------------------------------------------- 3-eval_chat.py
@pytest.fixture(scope="module")
def eval_chat():
    return load_script("3-eval_chat.py", "eval_chat_cpu_inference")


def _chat_argv(answering: dict, *extra: str) -> list[str]:
    return ["--ckpt", str(answering["ckpt"]), "--clip_path", answering["clip"], "--tokenizer_path", TOKENIZER_PATH,
            "--device", "cpu", "--image", str(answering["image"]), "--prompt", QUESTION, "--temperature", "0",
            "--max_new_tokens", "16", "--no_stream", *extra]


def _kernel_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("CPU kernel: ")]


def test_chat_script_answers_with_int8_weights_and_says_so(answering, eval_chat, capsys):
    code = eval_chat.main(_chat_argv(answering, "--quantize", "int8"))
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    lines = _kernel_lines(stdout)
    assert len(lines) == 1 and lines[0].startswith("CPU kernel: int8 ("), stdout
    assert stdout.index("model: ") < stdout.index(lines[0])  # under the model line
    assert f"[A]: {ANSWER}\n" in stdout  # fp32's answer


def test_chat_script_measures_the_cpu_kernel_by_default(answering, eval_chat, capsys):
    code = eval_chat.main(_chat_argv(answering))
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    lines = _kernel_lines(stdout)
    assert len(lines) == 1 and "(measured a prefill and 24 decode steps" in lines[0], stdout
    assert f"[A]: {ANSWER}\n" in stdout


def test_chat_script_answers_on_the_compiled_step(answering, eval_chat, capsys):
    """--cpu_kernel compiled (and its older name auto_compile): compiled at load, fp32's answer."""
    from inference.cpu.compiled import compiler_missing

    if compiler_missing():
        pytest.skip(compiler_missing())
    code = eval_chat.main(_chat_argv(answering, "--cpu_kernel", "auto_compile"))
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    lines = _kernel_lines(stdout)
    assert len(lines) == 1 and lines[0].startswith("CPU kernel: compiled (the one-row decode step compiled"), stdout
    assert f"[A]: {ANSWER}\n" in stdout


@pytest.mark.parametrize("app", ["3-eval_chat.py", "serve_openai_api.py"])
def test_a_failing_compiler_is_one_line_and_the_app_runs_on_auto(answering, eval_chat, monkeypatch, capsys, app):
    monkeypatch.setenv("CXX", "/bin/false")
    if app == "3-eval_chat.py":
        code = eval_chat.main(_chat_argv(answering, "--cpu_kernel", "compiled"))
        stdout, stderr = capsys.readouterr()
        assert f"[A]: {ANSWER}\n" in stdout
    else:
        code, seen = _serve(answering, monkeypatch, "--cpu_kernel", "compiled")
        stdout, stderr = capsys.readouterr()
        assert seen["reply"]["choices"][0]["message"]["content"] == ANSWER
    assert code == 0 and "Traceback" not in stdout + stderr, stderr
    lines = _kernel_lines(stdout)
    assert len(lines) == 1 and "(compiled not used: the C++ compiler /bin/false fails on a trivial program" in \
        lines[0], stdout


def test_chat_script_refuses_bad_values_in_one_line(answering, eval_chat, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_chat.main(_chat_argv(answering, "--quantize", "int4"))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    assert "error: argument --quantize: invalid choice: 'int4'" in stderr.strip().splitlines()[-1]
    assert eval_chat.main(_chat_argv(answering, "--quantize", "int8", "--cpu_kernel", "onednn")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cpu_kernel onednn applies to fp32 linear layers"), err


def test_eval_data_is_scored_with_int8_weights(answering, eval_chat, tmp_path, capsys):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"image": "red.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}]}]))
    argv = ["--ckpt", str(answering["ckpt"]), "--clip_path", answering["clip"], "--tokenizer_path", TOKENIZER_PATH,
            "--device", "cpu", "--eval_data", str(data), "--eval_images_path", str(answering["image"].parent),
            "--quantize", "int8"]
    code = eval_chat.main(argv)
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert _kernel_lines(stdout)[0].startswith("CPU kernel: int8 (")
    assert "accuracy: 1.000 (n=1" in stdout


# ------------------------------------------------------------------------------------------ serve_openai_api.py
def _serve(answering: dict, monkeypatch, *extra: str) -> tuple[int, dict]:
    """serve_openai_api.main with its uvicorn.run replaced by a test client that asks QUESTION about the red
    square (greedy) and lists the models: (exit code, {"reply": ..., "models": ...})."""
    import uvicorn
    from fastapi.testclient import TestClient

    import serve_openai_api

    png = io.BytesIO()
    Image.open(answering["image"]).save(png, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    body = {"model": "tiny", "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": QUESTION}]}]}
    seen: dict = {}

    def fake_run(app, **_kwargs) -> None:
        with TestClient(app) as client:
            seen["reply"] = client.post("/v1/chat/completions", json=body).json()
            seen["models"] = client.get("/v1/models").json()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    code = serve_openai_api.main(["--ckpt", str(answering["ckpt"]), "--clip_path", answering["clip"],
                                  "--tokenizer_path", TOKENIZER_PATH, "--model_name", "tiny", *extra])
    return code, seen


def test_api_serves_int8_weights_and_says_so_at_start_up(answering, monkeypatch, capsys):
    code, seen = _serve(answering, monkeypatch, "--quantize", "int8")
    stdout = capsys.readouterr().out
    assert code == 0
    start_up = stdout.splitlines()
    assert start_up[0].startswith("serving tiny (") and start_up[1].startswith("CPU kernel: int8 ("), stdout
    assert seen["reply"]["choices"][0]["message"]["content"] == ANSWER  # fp32's answer
    assert [m["id"] for m in seen["models"]["data"]] == ["tiny"]


def test_api_measures_the_cpu_kernel_by_default(answering, monkeypatch, capsys):
    code, seen = _serve(answering, monkeypatch)
    assert code == 0
    assert "(measured a prefill and 24 decode steps" in capsys.readouterr().out.splitlines()[1]
    assert seen["reply"]["choices"][0]["message"]["content"] == ANSWER


def test_api_refuses_bad_values_in_one_line(answering, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _serve(answering, monkeypatch, "--cpu_kernel", "fastest")
    assert exit_info.value.code == 2
    assert "error: argument --cpu_kernel: invalid choice: 'fastest'" in capsys.readouterr().err.splitlines()[-1]
    code, seen = _serve(answering, monkeypatch, "--quantize", "int8", "--cpu_kernel", "transposed")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and seen == {}
    assert len(err) == 1 and "--cpu_kernel transposed applies to fp32 linear layers" in err[0], err


def test_batched_int8_greedy_answers_equal_alone_and_fp32(answering, tokenizer):
    """Prefixes of the trained answer, decoded together by the dynamic batcher (left padding, one image each)
    on the int8 model, continue exactly as each does alone and as fp32 does."""
    fp32 = VLMChat.load(answering["ckpt"], answering["clip"], TOKENIZER_PATH)
    int8 = VLMChat.load(answering["ckpt"], answering["clip"], TOKENIZER_PATH, quantize="int8")
    assert is_int8(int8.model) and not is_int8(fp32.model)
    assert int8.n_params == fp32.n_params == count_parameters(fp32.model)  # the weights as loaded
    prompt = fp32.build_prompt(QUESTION, (), 1, reserve=64)
    answer = encode(tokenizer, ANSWER)
    features = fp32.image_features([Image.open(answering["image"])])
    prompts = [prompt + answer[:n] for n in (0, 3, 1, 5)]

    def alone(chat: VLMChat, ids: list[int]) -> list[int]:
        return chat.model.generate(torch.tensor([ids]), features, max_new_tokens=12, temperature=0.0,
                                   eos_token_id=fp32.eos_id)[0].tolist()

    batcher = DynamicBatcher(int8.model, int8.eos_id, int8.eos_id, max_batch=8, max_wait_s=2.0)
    requests = [DecodeRequest(ids, features, 12) for ids in prompts]
    for request in requests:
        batcher.submit(request)
    got = [list(request.tokens()) for request in requests]
    assert batcher.batch_sizes == [4]
    for ids, tokens in zip(prompts, got):
        assert tokens == alone(int8, ids) == alone(fp32, ids) == answer[len(ids) - len(prompt):]


# ------------------------------------------------------------------------------------------------ web page
@pytest.fixture
def page(monkeypatch, answering):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MINIMIND_OUT_DIR", str(answering["out"]))
    monkeypatch.setenv("MINIMIND_CLIP_PATH", answering["clip"])
    monkeypatch.setenv("MINIMIND_TOKENIZER_PATH", TOKENIZER_PATH)
    monkeypatch.setenv("MINIMIND_DEVICE", "cpu")

    def start() -> AppTest:
        at = AppTest.from_file(str(ROOT / "web_server.py"), default_timeout=60)
        at.run()
        assert not at.exception, at.exception
        return at
    return start


def _kernel_caption(at) -> str:
    lines = [line for c in at.sidebar.caption for line in c.value.splitlines() if "CPU kernel: " in line]
    assert len(lines) == 1, [c.value for c in at.sidebar.caption]
    return lines[0]


def _ask_red_square(at, answering: dict) -> str:
    at.slider(key="temperature").set_value(0.0)
    at.file_uploader(key="uploader").set_value([("red.png", answering["image"].read_bytes(), "image/png")])
    at.run()
    at.chat_input(key="question").set_value(QUESTION)
    at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    return at.session_state["history"][-1][1]


def test_web_int8_toggle_reloads_a_quantised_model_that_still_answers(page, answering):
    at = page()
    toggle = at.sidebar.toggle(key="int8")
    assert toggle.label == "int8 weights (CPU)" and toggle.value is False and not toggle.disabled
    assert "(measured a prefill and 24 decode steps" in _kernel_caption(at)  # --cpu_kernel auto by default
    assert _ask_red_square(at, answering) == ANSWER
    at.sidebar.button(key="clear_chat").click().run()
    at.sidebar.toggle(key="int8").set_value(True).run()
    assert not at.exception, at.exception
    assert "CPU kernel: int8 (" in _kernel_caption(at)
    assert _ask_red_square(at, answering) == ANSWER  # fp32's answer
    at.sidebar.toggle(key="int8").set_value(False).run()
    assert "CPU kernel: int8" not in _kernel_caption(at)


def test_web_quantize_flag_starts_the_toggle_on(page, monkeypatch):
    monkeypatch.setenv("MINIMIND_QUANTIZE", "int8")  # how AppTest passes --quantize int8
    at = page()
    assert at.sidebar.toggle(key="int8").value is True
    assert "CPU kernel: int8 (" in _kernel_caption(at)


def test_web_int8_toggle_works_on_a_page_started_with_another_kernel(page, monkeypatch):
    """Started with --cpu_kernel compiled (or bf16, ...) and the toggle on: int8 takes the kernel's place."""
    monkeypatch.setenv("MINIMIND_QUANTIZE", "int8")
    monkeypatch.setenv("MINIMIND_CPU_KERNEL", "compiled")
    at = page()
    assert at.sidebar.toggle(key="int8").value is True and not at.error, [e.value for e in at.error]
    assert "CPU kernel: int8 (" in _kernel_caption(at)


def test_web_toggle_is_disabled_off_the_cpu(page, monkeypatch):
    monkeypatch.setenv("MINIMIND_DEVICE", "cuda")
    at = page()
    assert at.sidebar.toggle(key="int8").disabled
    assert any("int8 weights run on the CPU only" in c.value for c in at.sidebar.caption)


def test_web_bad_quantize_value_is_a_one_line_page_error(page, monkeypatch):
    monkeypatch.setenv("MINIMIND_QUANTIZE", "int4")
    at = page()
    assert len(at.error) == 1 and "MINIMIND_QUANTIZE='int4' is not one of none, int8" in at.error[0].value


def test_web_launch_checks_its_flags_before_starting_streamlit(monkeypatch, capsys):
    pytest.importorskip("streamlit")
    import web_server

    started: list[list[str]] = []
    monkeypatch.setattr(web_server.os, "execv", lambda _exe, command: started.append(command))
    monkeypatch.setattr(web_server.os, "chdir", lambda _path: None)
    web_server.launch_streamlit(["--server.port", "8600", "--quantize", "int8", "--cpu_kernel", "default"])
    assert started and started[0][-5:] == ["--", "--quantize", "int8", "--cpu_kernel", "default"]
    for bad in (["--quantize", "int4"], ["--quantise", "int8"]):
        with pytest.raises(SystemExit) as exit_info:
            web_server.launch_streamlit(bad)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("web_server.py: error: ")
    assert len(started) == 1


def test_web_args_carry_the_cpu_inference_flags():
    from inference import web_support

    args = web_support.parse_args(["--quantize", "int8", "--cpu_kernel", "transposed"], ROOT, {})
    assert (args.quantize, args.cpu_kernel) == ("int8", "transposed")
    assert web_support.parse_args([], ROOT, {"MINIMIND_CPU_KERNEL": "onednn_bf16"}).cpu_kernel == "bf16"
    compiled = web_support.parse_args(["--cpu_kernel", "compiled"], ROOT, {})
    assert web_support.kernel_to_load(compiled, True) == ("none", "int8")
    assert web_support.kernel_to_load(compiled, False) == ("none", "compiled")
    assert (web_support.parse_args([], ROOT, {}).quantize, web_support.parse_args([], ROOT, {}).cpu_kernel) == \
        ("none", "auto")

