"""POPE and MMStar: answer reading and metrics against hand-computed values, malformed files and rows, --limit,
batched against one-by-one answers, and 3-eval_chat.py --benchmark end to end on a tiny model.

The parquet files are generated here in each benchmark's schema (same column names and types; images as a
Hugging Face Image struct of bytes and path)."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TOKENIZER_PATH, tiny_config
from helpers import load_script
from PIL import Image

import evaluation.benchmarks as benchmarks
from data_pipeline.records import SkipCounter
from evaluation.benchmark_data import BenchmarkError, benchmark_files, read_items
from evaluation.benchmark_scoring import (PopeScores, mmstar_report, parse_choice, parse_options, parse_yes_no,
                                     pope_report, pope_scores)
from evaluation.benchmark_specs import MANIFEST_NAME, MMSTAR, POPE
from inference.chat import VLMChat
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
POPE_SCHEMA = pa.schema([("id", pa.string()), ("question_id", pa.string()), ("question", pa.string()),
                         ("answer", pa.string()), ("image_source", pa.string()), ("image", IMAGE),
                         ("category", pa.string())])
MMSTAR_SCHEMA = pa.schema([("index", pa.int64()), ("question", pa.string()), ("image", IMAGE),
                           ("answer", pa.string()), ("category", pa.string()), ("l2_category", pa.string()),
                           ("meta_info", pa.struct([("source", pa.string()), ("split", pa.string()),
                                                    ("image_path", pa.string())]))])
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 20)]
OBJECTS = ["dog", "traffic light in the corner of the street", "cup", "person holding an umbrella", "car"]


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]).save(buf, format="PNG")
    return buf.getvalue()


def pope_rows(n: int) -> list[dict]:
    splits = ["adversarial", "popular", "random"]
    return [{"id": str(i), "question_id": str(1000 + i), "question": f"Is there a {OBJECTS[i % 5]} in the image?",
             "answer": "yes" if i % 2 == 0 else "no", "image_source": f"COCO_val2014_{i:012d}",
             "image": {"bytes": png(i), "path": None}, "category": splits[i % 3]} for i in range(n)]


def mmstar_rows(n: int) -> list[dict]:
    categories = ["coarse perception", "math"]
    return [{"index": i, "question": f"What colour is the square?{' Look closely.' * (i % 3)}\nOptions: A: red, "
                                     f"B: green, C: blue, D: yellow",
             "image": {"bytes": png(i), "path": None}, "answer": "ABCD"[i % 4], "category": categories[i % 2],
             "l2_category": "image scene and topic" if i % 2 == 0 else "geometry",
             "meta_info": {"source": "test", "split": "val", "image_path": f"{i}.png"}} for i in range(n)]


def write(path: Path, rows: list[dict], schema: pa.Schema, row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def chat(tokenizer, tiny_clip_dir) -> VLMChat:
    torch.manual_seed(0)
    return VLMChat(MiniMindVLM(tiny_config(tokenizer)), tokenizer, load_vision_encoder(str(tiny_clip_dir)))


# ------------------------------------------------------------------------------------------- answers and metrics
@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"), ("yes, there is a dog.", "yes"), ("No.", "no"), ('  "No"', "no"), ("NO", "no"),
    ("是的，有一只狗", "yes"), ("有", "yes"), ("没有", "no"), ("不是", "no"), ("否", "no"),
    ("There is a dog.", None), ("Noah", None), ("yesterday", None), ("", None), ("maybe yes", None)])
def test_yes_no_is_read_from_the_first_word(answer, expected):
    assert parse_yes_no(answer) == expected


OPTIONS = parse_options("Which is it?\nOptions: A: a red apple, B: a blue car, C: The suitcase is on the book., "
                        "D: green")


def test_options_are_read_from_the_question():
    assert OPTIONS == {"A": "a red apple", "B": "a blue car", "C": "The suitcase is on the book.", "D": "green"}
    assert parse_options("What is it?") == {}


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("B.", "B"), ("b", "B"), ("(C) the suitcase", "C"), ("D) green", "D"), ("Option D", "D"),
    ("The answer is A", "A"), ("Answer: C", "C"), ("a red apple", "A"), ("A blue car.", "B"),
    ("The suitcase is on the book", "C"), ("A dog is here", None), ("the answer is a cat", None), ("E", None),
    ("Option E", None), ("", None), ("purple", None)])
def test_choice_is_read_as_a_letter_or_an_option_text(answer, expected):
    assert parse_choice(answer, OPTIONS) == expected


def test_prompts_are_the_sources_wording():
    assert POPE.prompt(" Is there a dog in the image? ") == ("Is there a dog in the image?\nAnswer the question using "
                                                             "a single word or phrase.")
    assert MMSTAR.prompt("Is it red? Please answer yes or no.\nOptions: A: yes, B: no") == (
        "Is it red?\nOptions: A: yes, B: no\nAnswer with the option's letter from the given choices directly")


def test_pope_metrics_by_hand():
    truths = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    predictions = ["yes", "no", None, "yes", "no", "no", "yes", None]
    s = pope_scores(truths, predictions)
    # TP: 0, 6; FN: 1 and the unparseable 2; FP: 3; TN: 4, 5; the unparseable 7 is wrong and no "yes"
    assert (s.tp, s.fn, s.fp, s.tn, s.n, s.unparseable) == (2, 2, 1, 2, 8, 2)
    assert s.accuracy == 4 / 8 and s.precision == 2 / 3 and s.recall == 2 / 4 and s.yes_ratio == 3 / 8
    assert s.f1 == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2)) == pytest.approx(4 / 7)


def test_pope_split_with_only_no_has_no_recall():
    s = pope_scores(["no"] * 4, ["no", "yes", None, "no"])
    assert (s.accuracy, s.precision, s.recall, s.f1, s.yes_ratio, s.unparseable) == (0.5, 0.0, None, 0.0, 0.25, 1)
    assert "precision 0.000, recall n/a, F1 0.000" in s.line("random")
    silent = pope_scores(["no"] * 3, ["no"] * 3)  # never "yes" and nothing to find: only accuracy is defined
    assert (silent.accuracy, silent.precision, silent.recall, silent.f1) == (1.0, None, None, None)
    assert "precision n/a, recall n/a, F1 n/a" in silent.line("random")
    never_yes = pope_scores(["yes", "no"], ["no", None])  # every "yes" missed: no precision, but F1 is 0
    assert (never_yes.precision, never_yes.recall, never_yes.f1) == (None, 0.0, 0.0)
    report = pope_report(["random"] * 4 + ["popular"] * 2, ["no"] * 4 + ["yes", "no"],
                         ["no", "yes", None, "no", "yes", "no"])
    assert report["splits"]["popular"]["f1"] == 1.0 and report["splits"]["random"]["recall"] is None
    assert report["mean_f1_over_splits"] == 0.5 and report["overall"]["tp"] == 1 and report["overall"]["fp"] == 1
    report = pope_report(["random", "random", "popular"], ["no", "no", "yes"], ["no", "no", "yes"])
    assert report["mean_f1_over_splits"] is None  # not averaged over a split whose F1 is undefined


def test_pope_report_averages_f1_over_splits():
    report = pope_report(["a", "a", "b", "b"], ["yes", "no", "yes", "no"], ["yes", "no", "yes", "yes"])
    assert report["splits"]["a"]["f1"] == 1.0 and report["splits"]["b"]["f1"] == pytest.approx(2 / 3)
    assert report["mean_f1_over_splits"] == pytest.approx((1 + 2 / 3) / 2)


def test_mmstar_metrics_by_hand():
    report = mmstar_report(["x", "x", "x", "y", "y", "y"], ["p", "p", "q", "q", "q", "q"],
                           list("ABCDAB"), ["A", "C", None, "D", None, "B"])
    assert report["overall"] == {"n": 6, "accuracy": 0.5, "unparseable": 2}
    assert report["categories"]["x"] == {"n": 3, "accuracy": 1 / 3, "unparseable": 1}
    assert report["categories"]["y"] == {"n": 3, "accuracy": 2 / 3, "unparseable": 1}
    assert report["l2_categories"]["q"] == {"n": 4, "accuracy": 0.5, "unparseable": 2}


# ------------------------------------------------------------------------------------------- malformed input
def test_file_errors_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(BenchmarkError, match="benchmark file not found: .*nothing.parquet.*--what bench"):
        benchmark_files(str(tmp_path / "nothing.parquet"), POPE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkError, match="no .parquet file in this folder"):
        benchmark_files(str(tmp_path / "empty"), POPE)
    rows = pope_rows(2)
    (tmp_path / "text.parquet").write_text("question,answer\nIs there a dog?,yes\n")
    write(tmp_path / "no_answer.parquet", [{k: v for k, v in r.items() if k != "answer"} for r in rows],
          pa.schema([f for f in POPE_SCHEMA if f.name != "answer"]))
    write(tmp_path / "int_question.parquet", [{**r, "question": 7} for r in rows],
          POPE_SCHEMA.set(2, pa.field("question", pa.int64())))
    write(tmp_path / "str_image.parquet", [{**r, "image": "x.jpg"} for r in rows],
          POPE_SCHEMA.set(5, pa.field("image", pa.string())))
    cases = {"text.parquet": "not a readable parquet file",
             "no_answer.parquet": "no 'answer' column, which pope needs",
             "int_question.parquet": "column 'question' holds int64, not text",
             "str_image.parquet": "column 'image' holds string, not image bytes"}
    for name, phrase in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(BenchmarkError) as err:
            list(read_items(POPE, benchmark_files(path, POPE), SkipCounter()))
        message = str(err.value)
        assert "\n" not in message and path in message and phrase in message, message


def test_bad_rows_are_counted_and_the_rest_scored(tmp_path, chat):
    rows = pope_rows(8)
    rows[1]["image"] = {"bytes": b"not an image at all", "path": None}
    rows[2]["image"] = None
    rows[3]["answer"] = "maybe"
    rows[4]["question"] = "   "
    rows[5]["category"] = None
    path = write(tmp_path / "pope.parquet", rows, POPE_SCHEMA)
    run = benchmarks.run_benchmark(chat, POPE, [str(path)], batch_size=4, progress=False)
    assert run.rows_read == 8 and len(run.answers) == 3 and run.skips.total == 5
    assert dict(run.skips.counts) == {"undecodable image": 1, "not one image": 1, "unusable answer": 1,
                                      "no question": 1, "no category": 1}
    assert [a.row_id for a in run.answers] == [f"pope.parquet row group {i // 4} row {i % 4} (question_id "
                                               f"{1000 + i})" for i in (0, 6, 7)]
    assert run.scores["overall"]["n"] == 3


# ------------------------------------------------------------------------------------------- running
def test_limit_reads_only_the_first_rows(tmp_path, chat, monkeypatch):
    path = write(tmp_path / "mmstar.parquet", mmstar_rows(10), MMSTAR_SCHEMA, row_group_size=2)
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: reads.append(i) or original(self, i, **kw))
    run = benchmarks.run_benchmark(chat, MMSTAR, [str(path)], limit=3, progress=False)
    assert run.rows_read == 3 and len(run.answers) == 3
    assert reads == [0, 1]  # row group by row group, and no further than the limit


def test_batched_answers_equal_row_by_row(tmp_path, chat):
    path = write(tmp_path / "mmstar.parquet", mmstar_rows(7), MMSTAR_SCHEMA)
    prompts = {len(chat.build_prompt(MMSTAR.prompt(r["question"]), (), 1)) for r in mmstar_rows(7)}
    assert len(prompts) == 3  # the batch really mixes prompt lengths
    batched = benchmarks.run_benchmark(chat, MMSTAR, [str(path)], batch_size=16, progress=False)
    alone = benchmarks.run_benchmark(chat, MMSTAR, [str(path)], batch_size=1, progress=False)
    assert len(batched.answers) == 7
    assert [vars(a) for a in batched.answers] == [vars(a) for a in alone.answers]
    assert batched.scores == alone.scores


def test_scores_follow_the_answers_given(tmp_path, chat, monkeypatch):
    """With the model's replies scripted, the scores are those computed by hand."""
    replies = iter(["Yes", "no", "Yes.", "yes", "I think so", "No"])
    monkeypatch.setattr(benchmarks, "greedy_answers",
                        lambda model, prompts, *args, **kwargs: [next(replies) for _ in prompts])
    path = write(tmp_path / "pope.parquet", pope_rows(6), POPE_SCHEMA, row_group_size=6)
    run = benchmarks.run_benchmark(chat, POPE, [str(path)], batch_size=1, progress=False)
    # truths yes,no,yes,no,yes,no; splits adversarial,popular,random,adversarial,popular,random
    overall = PopeScores(**run.scores["overall"])
    assert (overall.tp, overall.fp, overall.tn, overall.fn, overall.unparseable) == (2, 1, 2, 1, 1)
    assert run.scores["splits"]["random"]["accuracy"] == 1.0  # rows 2 ("Yes." to yes) and 5 ("No" to no)
    lines = benchmarks.summary_lines(run)
    assert lines[0].startswith("pope: F1 ") and "unparseable 1" in lines[0]


# ------------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def eval_chat():
    return load_script("3-eval_chat.py", "eval_chat_benchmarks")


def _argv(ckpt, clip, *extra) -> list[str]:
    return ["--ckpt", str(ckpt), "--clip_path", str(clip), "--tokenizer_path", TOKENIZER_PATH, "--device", "cpu",
            *extra]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pope_on_the_command_line(tmp_path, eval_chat, tiny_ckpt, tiny_clip_dir, capsys):
    bench = tmp_path / "bench" / "pope"
    files = [write(bench / POPE.files[i], pope_rows(6)[3 * i:3 * i + 3], POPE_SCHEMA) for i in range(2)]
    (bench / MANIFEST_NAME).write_text(json.dumps({"repo": POPE.repo, "revision": POPE.revision,
                                                   "files": list(POPE.files)}))
    out = tmp_path / "pope.json"
    code = eval_chat.main(_argv(tiny_ckpt, tiny_clip_dir, "--benchmark", "pope", "--bench_path", str(bench),
                                "--bench_out", str(out)))
    stdout, stderr = capsys.readouterr()
    assert code == 0 and "Traceback" not in stderr, stderr
    assert "pope: F1 " in stdout and "  adversarial: accuracy " in stdout and f"results: {out}" in stdout
    record = json.loads(out.read_text())
    assert record["benchmark"] == "pope" and record["questions"]["scored"] == 6
    assert record["model"]["weights_file_sha256"] == _sha256(tiny_ckpt)
    assert len(record["model"]["state_dict_sha256"]) == 64
    assert [f["sha256"] for f in record["benchmark_files"]] == [_sha256(f) for f in files]
    assert {f["revision"] for f in record["benchmark_files"]} == {POPE.revision}
    assert record["prompt"]["template"] == "{question}\nAnswer the question using a single word or phrase."
    assert record["decoding"] == {"greedy": True, "max_new_tokens": POPE.max_new_tokens}
    assert len(record["answers"]) == 6 and set(record["scores"]) == {"overall", "mean_f1_over_splits", "splits"}


def test_mmstar_on_the_command_line_with_a_limit(tmp_path, eval_chat, tiny_ckpt, tiny_clip_dir, capsys):
    path = write(tmp_path / "mmstar.parquet", mmstar_rows(9), MMSTAR_SCHEMA)
    code = eval_chat.main(_argv(tiny_ckpt, tiny_clip_dir, "--benchmark", "mmstar", "--bench_path", str(path),
                                "--limit", "5", "--out_dir", str(tmp_path / "out")))
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    out = tmp_path / "out" / "bench_mmstar_64_vlm_sft.json"
    assert f"results: {out}" in stdout and "mmstar: accuracy " in stdout and "  math: accuracy " in stdout
    record = json.loads(out.read_text())
    assert record["questions"]["rows_read"] == 5 and record["questions"]["limit"] == 5
    assert record["benchmark_files"][0]["revision"] is None  # no manifest beside a hand-made file
    assert record["scores"]["overall"]["n"] == 5



@pytest.mark.parametrize("flags, kernel", [(["--quantize", "int8"], "CPU kernel: int8 ("),
                                           (["--cpu_kernel", "transposed"], "CPU kernel: transposed (")],
                         ids=["int8", "transposed"])
def test_a_benchmark_on_converted_weights_records_them_and_the_loaded_fingerprint(tmp_path, eval_chat, tiny_ckpt,
                                                                                  tiny_clip_dir, capsys, flags,
                                                                                  kernel):
    """--quantize/--cpu_kernel replace the decode weights: the record names the kernel, and fingerprints and
    counts the weights as loaded (the same as on the default kernel)."""
    path = write(tmp_path / "pope.parquet", pope_rows(2), POPE_SCHEMA)
    records = []
    for name, extra in (("plain", ["--cpu_kernel", "default"]), ("converted", flags)):
        out = tmp_path / f"{name}.json"
        code = eval_chat.main(_argv(tiny_ckpt, tiny_clip_dir, "--benchmark", "pope", "--bench_path", str(path),
                                    "--bench_out", str(out), *extra))
        assert code == 0, capsys.readouterr().err
        records.append(json.loads(out.read_text())["model"])
    plain, converted = records
    assert plain["cpu_inference"] == "CPU kernel: default (asked for)" and converted["cpu_inference"].startswith(kernel)
    assert converted["state_dict_sha256"] == plain["state_dict_sha256"]
    assert converted["parameters"] == plain["parameters"]


def test_the_fingerprint_refuses_converted_weights(tokenizer):
    from inference.cpu.prepare import prepare_for_cpu_inference

    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer)).eval()
    prepare_for_cpu_inference(model, "int8", "default")
    with pytest.raises(ValueError, match="runs on the int8 CPU kernel: fingerprint its weights before converting"):
        benchmarks.state_dict_sha256(model)

def _bad_parquet(folder: Path) -> Path:
    (folder / "bad.parquet").write_bytes(b"PAR1 not really a parquet file")
    return folder / "bad.parquet"


def _no_category(folder: Path) -> Path:
    rows = [{k: v for k, v in r.items() if k != "category"} for r in mmstar_rows(2)]
    return write(folder / "nocat.parquet", rows, pa.schema([f for f in MMSTAR_SCHEMA if f.name != "category"]))


@pytest.mark.parametrize("make, phrase", [
    (lambda d: d / "missing.parquet", "benchmark file not found"),
    (_bad_parquet, "not a readable parquet file"),
    (_no_category, "no 'category' column, which mmstar needs"),
], ids=["missing", "not-parquet", "missing-column"])
def test_command_line_errors_are_one_line(tmp_path, eval_chat, tiny_ckpt, tiny_clip_dir, capsys, make, phrase):
    path = make(tmp_path)
    code = eval_chat.main(_argv(tiny_ckpt, tiny_clip_dir, "--benchmark", "mmstar", "--bench_path", str(path)))
    stdout, stderr = capsys.readouterr()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in stderr and len(errors) == 1, stderr
    assert str(path) in errors[0] and phrase in errors[0], errors


def test_a_missing_benchmark_file_is_reported_before_the_model_loads(tmp_path, eval_chat, capsys):
    code = eval_chat.main(["--ckpt", str(tmp_path / "no_model.pth"), "--benchmark", "pope", "--bench_path",
                           str(tmp_path / "none")])
    stdout, stderr = capsys.readouterr()
    assert code == 1 and "benchmark file not found" in stderr and "model" not in stdout


def test_an_unreadable_row_group_is_one_line(tmp_path, chat, monkeypatch):
    path = write(tmp_path / "pope.parquet", pope_rows(6), POPE_SCHEMA, row_group_size=3)
    original = pq.ParquetFile.read_row_group

    def damaged(self, i, **kwargs):
        if i == 1:
            raise OSError("Couldn't deserialize thrift: TProtocolException: Invalid data\nmore detail")
        return original(self, i, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", damaged)
    with pytest.raises(BenchmarkError) as err:
        benchmarks.run_benchmark(chat, POPE, [str(path)], progress=False)
    assert str(err.value) == (f"{path}: row group 1 cannot be read (Couldn't deserialize thrift: "
                              f"TProtocolException: Invalid data)")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pope.parquet"
    os.mkfifo(fifo)
    with pytest.raises(BenchmarkError, match="not a regular file"):
        benchmark_files(str(fifo), POPE)


def test_the_state_dict_fingerprint_follows_the_weights(tokenizer):
    torch.manual_seed(0)
    a = MiniMindVLM(tiny_config(tokenizer))
    b = MiniMindVLM(tiny_config(tokenizer))
    b.load_state_dict(a.state_dict())
    assert benchmarks.state_dict_sha256(a) == benchmarks.state_dict_sha256(b)
    with torch.no_grad():
        b.output.weight[0, 0] += 1e-3
    assert benchmarks.state_dict_sha256(a) != benchmarks.state_dict_sha256(b)


def test_a_question_longer_than_the_context_is_cut_and_counted(tmp_path, chat):
    assert chat.model.config.max_seq_len == 160
    rows = mmstar_rows(2)
    rows[0]["question"] = "Colour?\nOptions: A: red, B: green"  # fits the tiny model's 160 tokens with its image
    rows[0]["answer"] = "A"
    rows[1]["question"] = "Describe every detail you can see. " * 40 + rows[1]["question"]
    path = write(tmp_path / "mmstar.parquet", rows, MMSTAR_SCHEMA)
    run = benchmarks.run_benchmark(chat, MMSTAR, [str(path)], progress=False)
    assert len(run.answers) == 2 and run.cut_to_fit == 1
    assert "cut to fit the context 1" in benchmarks.summary_lines(run)[0]


def test_an_unwritable_results_file_is_one_line(tmp_path, eval_chat, tiny_ckpt, tiny_clip_dir, capsys):
    path = write(tmp_path / "mmstar.parquet", mmstar_rows(2), MMSTAR_SCHEMA)
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "results.json"  # a folder that is a file
    code = eval_chat.main(_argv(tiny_ckpt, tiny_clip_dir, "--benchmark", "mmstar", "--bench_path", str(path),
                                "--bench_out", str(out)))
    stdout, stderr = capsys.readouterr()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 1 and "Traceback" not in stderr and len(errors) == 1
    assert errors[0].startswith(f"error: cannot write {out}: "), errors
    assert "mmstar: accuracy" in stdout  # the scores were printed before the write failed
