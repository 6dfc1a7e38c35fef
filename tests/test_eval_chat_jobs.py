"""3-eval_chat.py runs one job per command, chosen by the flags given: its flags are grouped by job (model loading,
answering and chat, held-out evaluation, benchmarks), a flag of another job is refused in one line before the model
loads, "the first N" is one flag (--eval_limit; the old --limit is an alias with a one-line note), and more images
than a question can take are refused in one line, with the text the web page and the API use."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TOKENIZER_PATH
from helpers import load_script
from PIL import Image

from inference.chat import GenerationSettings


@pytest.fixture(scope="module")
def eval_chat():
    return load_script("3-eval_chat.py", "eval_chat_jobs")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / f"img_{i}.png" for i in range(9)]
    for i, path in enumerate(paths):
        Image.new("RGB", (32, 32), (20 * i, 30, 30)).save(path)
    return paths


def _model(ckpt, clip, *extra) -> list[str]:
    return ["--ckpt", str(ckpt), "--clip_path", str(clip), "--tokenizer_path", TOKENIZER_PATH, "--device", "cpu",
            "--cpu_kernel", "default", *extra]


def _stderr_lines(capsys) -> tuple[str, list[str]]:
    stdout, stderr = capsys.readouterr()
    assert "Traceback" not in stderr, stderr[-3000:]
    return stdout, [line for line in stderr.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- flag groups
def test_help_lists_the_flags_by_job_and_hides_the_old_limit(eval_chat, capsys):
    with pytest.raises(SystemExit):
        eval_chat.main(["--help"])
    text = capsys.readouterr().out
    titles = ["model loading (every job):", "answering and chat (the default job):",
              "held-out evaluation (--eval_data):", "benchmarks (--benchmark):"]
    at = [text.index(title) for title in titles]
    assert at == sorted(at)
    sections = dict(zip(titles, [text[a:b] for a, b in zip(at, at[1:] + [len(text)])]))
    assert "--ckpt" in sections[titles[0]] and "--cpu_kernel" in sections[titles[0]]
    assert "--interactive" in sections[titles[1]] and "--max_new_tokens" in sections[titles[1]]
    assert "--eval_limit" in sections[titles[2]] and "--image_prefix" in sections[titles[2]]
    assert "--bench_out" in sections[titles[3]] and "--limit" not in text.replace("--eval_limit", "")


def test_every_flag_belongs_to_one_job_group(eval_chat):
    parser, job_of = eval_chat.build_parser()
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    assert set(job_of) == flags and set(job_of.values()) == {"model", "answer", "held-out", "benchmark"}


@pytest.mark.parametrize("argv, job", [
    ([], "answer"), (["--image", "a.png", "--interactive", "--temperature", "0"], "answer"),
    (["--eval_data", "t.json", "--eval_limit", "3", "--quantize", "int8"], "held-out"),
    (["--benchmark", "pope", "--eval_limit", "3", "--bench_out", "x.json", "--seed", "1"], "benchmark"),
])
def test_the_job_is_chosen_by_the_flags_given(eval_chat, argv, job):
    args = eval_chat.parse_args(argv)
    assert args.job == job and not args.refusal


@pytest.mark.parametrize("argv, phrase", [
    (["--benchmark", "pope", "--eval_data", "t.json"], "--benchmark and --eval_data are two jobs"),
    (["--eval_data", "t.json", "--max_new_tokens", "9"], "--max_new_tokens is for answering questions"),
    (["--benchmark", "mmstar", "--image", "a.png"], "--image is for answering questions"),
    (["--bench_out", "x.json"], "--bench_out is for a benchmark (--benchmark); this command runs answering"),
    (["--eval_limit", "5"], "--eval_limit is for a benchmark (--benchmark) or held-out evaluation"),
    (["--eval_data", "t.json", "--bench_batch_size", "4"], "--bench_batch_size is for a benchmark"),
])
def test_a_flag_of_another_job_is_refused_in_one_line_before_the_model_loads(eval_chat, capsys, tmp_path, argv,
                                                                             phrase):
    code = eval_chat.main(["--ckpt", str(tmp_path / "never_loaded.pth"), *argv])
    stdout, lines = _stderr_lines(capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {phrase}"), lines
    assert "model" not in stdout


def test_the_old_limit_is_eval_limit_with_a_one_line_note(eval_chat, capsys):
    args = eval_chat.parse_args(["--benchmark", "pope", "--limit", "7"])
    _, lines = _stderr_lines(capsys)
    assert (args.job, args.eval_limit) == ("benchmark", 7)
    assert lines == ["note: --limit is the old name of --eval_limit; use --eval_limit"]
    args = eval_chat.parse_args(["--benchmark", "pope", "--limit", "7", "--eval_limit", "7"])
    assert args.job is None and args.refusal.startswith("--limit and --eval_limit are the same flag")
    with pytest.raises(SystemExit):
        eval_chat.parse_args(["--eval_data", "t.json", "--eval_limit", "0"])  # at least 1, as --limit was


def test_eval_limit_reads_the_first_records_of_held_out_data(tmp_path, eval_chat, tiny_ckpt, tiny_clip_dir, capsys,
                                                             images):
    records = [{"image": images[i].name, "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                           {"from": "gpt", "value": "red"}]} for i in range(4)]
    records.insert(1, {"image": images[0].name, "conversations": []})  # skipped, and counts toward the limit
    data = tmp_path / "qa.json"
    data.write_text(json.dumps(records))
    code = eval_chat.main(_model(tiny_ckpt, tiny_clip_dir, "--eval_data", str(data), "--eval_images_path",
                                 str(images[0].parent), "--eval_limit", "3"))
    stdout, _ = _stderr_lines(capsys)
    assert code == 0 and "accuracy: " in stdout and "(n=2," in stdout, stdout


# ------------------------------------------------------------------------------------------- too many images
def _api_refusal(n_images: int, max_images: int, context: int) -> str:
    """The API's message for the same count (its own suffix dropped): the web page shows the same text."""
    from inference.openai_request import APIError, parse_request

    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"messages": [{"role": "user", "content": [part] * n_images + [{"type": "text", "text": "hi"}]}]}
    with pytest.raises(APIError) as err:
        parse_request(body, None, GenerationSettings(), 64, None, max_images, context)
    return err.value.message.split(" (this server counts")[0]


def test_nine_images_are_refused_in_one_line_like_the_api(eval_chat, tiny_ckpt, tiny_clip_dir, images, capsys):
    argv = _model(tiny_ckpt, tiny_clip_dir, "--no_stream", "--max_new_tokens", "2")
    for path in images:
        argv += ["--image", str(path)]
    code = eval_chat.main(argv)
    stdout, lines = _stderr_lines(capsys)
    assert code == 1 and "[A]" not in stdout and len(lines) == 1, lines
    assert lines[0] == f"error: {_api_refusal(9, 8, 1024)}"  # --max_seq_len's default context holds 8
    assert lines[0] == "error: 9 images are too many: at most 8 images per question"


def test_a_context_too_small_for_one_image_is_refused_in_one_line(eval_chat, tiny_ckpt, tiny_clip_dir, images,
                                                                  capsys):
    code = eval_chat.main(_model(tiny_ckpt, tiny_clip_dir, "--max_seq_len", "60", "--image", str(images[0]),
                                 "--no_stream", "--max_new_tokens", "2"))
    stdout, lines = _stderr_lines(capsys)
    assert code == 1 and "[A]" not in stdout and len(lines) == 1, lines
    assert lines[0] == f"error: {_api_refusal(1, 0, 60)}"
    assert lines[0].startswith("error: 1 image is too many: this model's context (60 tokens) holds at most 0 ")
