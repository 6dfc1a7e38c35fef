"""POPE and MMStar inputs that used to break or mislead a run: a question that is not UTF-8, a hostile
bench_source.json, no usable row, MMStar truths that are not one letter, a stray copy of a file, an output path that
is a directory or a special file, and huge declared image sizes. Each is a counted skip or a one-line refusal,
before the model loads where it can be."""
from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TOKENIZER_PATH, tiny_config
from helpers import load_script
from PIL import Image
from test_benchmarks import MMSTAR_SCHEMA, POPE_SCHEMA, mmstar_rows, pope_rows, write

import evaluation.benchmarks as benchmarks
from checkpoints.files import CheckpointWriteError, atomic_write
from data_pipeline.records import SkipCounter
from evaluation.benchmark_data import DUPLICATE, BenchmarkError, benchmark_files, read_items
from evaluation.benchmark_sources import file_sources
from evaluation.benchmark_specs import MANIFEST_NAME, MMSTAR, POPE
from evaluation.images import decode_for_encoder
from inference.chat import VLMChat
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM


@pytest.fixture(scope="module")
def chat(tokenizer, tiny_clip_dir) -> VLMChat:
    torch.manual_seed(0)
    return VLMChat(MiniMindVLM(tiny_config(tokenizer)), tokenizer, load_vision_encoder(str(tiny_clip_dir)))


@pytest.fixture(scope="module")
def eval_chat():
    return load_script("3-eval_chat.py", "eval_chat_bench_inputs")


def _argv(ckpt, clip, *extra) -> list[str]:
    return ["--ckpt", str(ckpt), "--clip_path", str(clip), "--tokenizer_path", TOKENIZER_PATH, "--device", "cpu",
            "--cpu_kernel", "default", *extra]


def _one_error(capsys) -> tuple[str, str]:
    stdout, stderr = capsys.readouterr()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]  # the rest: progress bars
    assert "Traceback" not in stderr and len(errors) == 1, stderr[-3000:]
    return stdout, errors[0]


# ------------------------------------------------------------------------------------------- rows
def test_a_question_that_is_not_utf8_is_a_counted_skip_naming_the_row(tmp_path, chat):
    rows = pope_rows(4)
    table = pa.Table.from_pylist(rows, schema=POPE_SCHEMA)
    questions = [r["question"].encode() for r in rows]
    questions[1] = b"Is there a \xff\xfe dog in the image?"  # Latin-1 bytes in a string column
    table = table.set_column(2, "question", pa.array(questions, pa.binary()).view(pa.string()))
    path = tmp_path / "pope.parquet"
    pq.write_table(table, path)
    run = benchmarks.run_benchmark(chat, POPE, [str(path)], progress=False)
    assert run.rows_read == 4 and len(run.answers) == 3 and dict(run.skips.counts) == {"not UTF-8 text": 1}
    assert run.skips.examples["not UTF-8 text"] == ["pope.parquet row group 0 row 1 (question_id 1001)"]


@pytest.mark.parametrize("truth", ["", "AB", "ABCD", "a b"])
def test_mmstar_truths_are_one_whole_letter(tmp_path, truth):
    rows = mmstar_rows(3)
    for row in rows:
        row["question"] = "What colour is the square?"  # no written options: the letters A-D are the choices
    rows[1]["answer"] = truth
    path = write(tmp_path / "mmstar.parquet", rows, MMSTAR_SCHEMA)
    skips = SkipCounter()
    items = list(read_items(MMSTAR, [str(path)], skips))
    assert [item is None for item in items] == [False, True, False] and dict(skips.counts) == {"unusable answer": 1}
    assert [item.truth for item in items if item] == ["A", "C"]


def test_a_stray_copy_of_a_file_is_warned_about_and_counted_once(tmp_path, chat):
    bench = tmp_path / "mmstar"
    write(bench / "mmstar.parquet", mmstar_rows(12), MMSTAR_SCHEMA)
    write(bench / "old" / "mmstar.parquet", mmstar_rows(12), MMSTAR_SCHEMA)  # the same 12 questions again
    files = benchmark_files(str(bench), MMSTAR)
    assert len(files) == 2
    run = benchmarks.run_benchmark(chat, MMSTAR, files, progress=False)
    assert run.rows_read == 24 and len(run.answers) == 12 and run.scores["overall"]["n"] == 12
    assert run.skips.counts[DUPLICATE] == 12
    assert len({a.row_id for a in run.answers}) == 12
    warning = [line for line in benchmarks.summary_lines(run) if line.startswith("warning: ")]
    assert len(warning) == 1 and "12 row(s) repeat a question already read" in warning[0]


def test_pope_question_ids_repeat_across_splits_without_being_duplicates(tmp_path, chat):
    """POPE's question_id restarts in each split: the category is part of what makes a question distinct."""
    rows = pope_rows(6)
    for row in rows:
        row["question_id"], row["id"] = "1", None
    path = write(tmp_path / "pope.parquet", rows[:3], POPE_SCHEMA)  # three splits, question_id 1 in each
    run = benchmarks.run_benchmark(chat, POPE, [str(path)], progress=False)
    assert len(run.answers) == 3 and run.skips.total == 0


# ------------------------------------------------------------------------------------------- no score over nothing
@pytest.mark.parametrize("rows", [0, "unusable"])
def test_no_usable_row_is_refused_not_scored_zero(tmp_path, chat, eval_chat, tiny_ckpt, tiny_clip_dir, capsys,
                                                  rows):
    data = [] if rows == 0 else [{**r, "answer": "maybe"} for r in pope_rows(3)]
    path = write(tmp_path / "pope.parquet", data, POPE_SCHEMA)
    with pytest.raises(BenchmarkError, match="no pope question could be scored"):
        benchmarks.run_benchmark(chat, POPE, [str(path)], progress=False)
    out = tmp_path / "pope.json"
    code = eval_chat.main(_argv(tiny_ckpt, tiny_clip_dir, "--benchmark", "pope", "--bench_path", str(path),
                                "--bench_out", str(out)))
    stdout, error = _one_error(capsys)
    assert code == 1 and "accuracy" not in stdout and "F1" not in stdout and not out.exists()
    assert str(path) in error and "no pope question could be scored" in error
    assert ("3 skipped: 3 unusable answer" in error) if rows else ("0 row(s) read" in error)


def test_held_out_data_with_no_usable_record_is_refused(tmp_path, eval_chat, tiny_ckpt, tiny_clip_dir, capsys):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"image": "none.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}]))
    code = eval_chat.main(_argv(tiny_ckpt, tiny_clip_dir, "--eval_data", str(data)))
    stdout, error = _one_error(capsys)
    assert code == 1 and "accuracy:" not in stdout
    assert error.startswith(f"error: {data}: no question could be scored") and "1 unusable image" in error


# ------------------------------------------------------------------------------------------- the manifest
HOSTILE = {"files-int": ('{"repo": "r", "revision": "v", "files": 7}', "field 'files'"),
           "files-null": ('{"repo": "r", "revision": "v", "files": null}', "field 'files'"),
           "files-of-numbers": ('{"repo": "r", "revision": "v", "files": [1, 2]}', "field 'files'"),
           "revision-list": ('{"repo": "r", "revision": ["v"], "files": []}', "field 'revision'"),
           "nested": ('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
           "not-json": ("{files: ", "unreadable benchmark manifest"),
           "list": ("[1, 2]", "not a JSON object")}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_manifest_is_refused_before_the_model_loads(tmp_path, eval_chat, capsys, name):
    text, phrase = HOSTILE[name]
    bench = tmp_path / "pope"
    write(bench / POPE.files[0], pope_rows(3), POPE_SCHEMA)
    (bench / MANIFEST_NAME).write_text(text)
    with pytest.raises(BenchmarkError) as err:
        file_sources([str(bench / POPE.files[0])])
    assert str(bench / MANIFEST_NAME) in str(err.value) and phrase in str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    code = eval_chat.main(["--ckpt", str(tmp_path / "never_loaded.pth"), "--benchmark", "pope", "--bench_path",
                           str(bench)])
    stdout, error = _one_error(capsys)
    assert code == 1 and "model" not in stdout and str(bench / MANIFEST_NAME) in error and phrase in error


def test_a_good_manifest_still_records_the_revision(tmp_path):
    bench = tmp_path / "pope"
    write(bench / POPE.files[0], pope_rows(3), POPE_SCHEMA)
    write(bench / "extra.parquet", pope_rows(3), POPE_SCHEMA)
    (bench / MANIFEST_NAME).write_text(json.dumps({"repo": POPE.repo, "revision": POPE.revision,
                                                   "files": [POPE.files[0]]}))
    sources = file_sources([str(bench / POPE.files[0]), str(bench / "extra.parquet")])
    assert sources == {str(bench / POPE.files[0]): {"repo": POPE.repo, "revision": POPE.revision},
                       str(bench / "extra.parquet"): None}  # not listed: no revision recorded


# ------------------------------------------------------------------------------------------- the output file
def _special_targets(tmp_path: Path) -> dict[str, Path]:
    targets = {"directory": tmp_path / "results_dir"}
    targets["directory"].mkdir()
    os.mkfifo(tmp_path / "fifo")
    targets["fifo"] = tmp_path / "fifo"
    try:  # a character device like /dev/null, made here (never the machine's own)
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets["device"] = tmp_path / "null"
    except (PermissionError, OSError):
        pass
    return targets


def test_atomic_write_never_replaces_a_directory_or_a_special_file(tmp_path):
    targets = _special_targets(tmp_path)
    for kind, target in targets.items():
        mode = os.lstat(target).st_mode
        with pytest.raises(CheckpointWriteError) as err:
            atomic_write(target, lambda f: f.write(b"{}"))
        assert str(target) in str(err.value) and "\n" not in str(err.value), kind
        assert os.lstat(target).st_mode == mode, kind  # still what it was
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in targets.values())  # no temp file
    regular = tmp_path / "results.json"
    regular.write_text("old")
    atomic_write(regular, lambda f: f.write(b"new"))
    assert regular.read_text() == "new"


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_bench_out_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, eval_chat, tiny_ckpt,
                                                                     tiny_clip_dir, capsys, kind):
    path = write(tmp_path / "data" / "pope.parquet", pope_rows(2), POPE_SCHEMA)
    target = _special_targets(tmp_path)[kind]
    code = eval_chat.main(_argv(tiny_ckpt, tiny_clip_dir, "--benchmark", "pope", "--bench_path", str(path),
                                "--bench_out", str(target)))
    stdout, error = _one_error(capsys)
    assert code == 1 and error.startswith(f"error: cannot write {target}: ") and "F1" in stdout
    assert (target.is_dir() if kind == "directory" else stat.S_ISFIFO(os.lstat(target).st_mode))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))  # no DIR.tmp left behind


# ------------------------------------------------------------------------------------------- image sizes
def _big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_each_image_is_held_at_the_towers_size_not_its_declared_size(tmp_path, chat, monkeypatch):
    """Two images declared 3000x3000 (a few KB each): the batch holds them at 224x224, as the API does."""
    big = _big_png(3000)
    assert len(big) < 100_000
    rows = pope_rows(2)
    for row in rows:
        row["image"] = {"bytes": big, "path": None}
    path = write(tmp_path / "pope.parquet", rows, POPE_SCHEMA)
    seen = []
    original = chat.encoder.encode_images
    monkeypatch.setattr(chat.encoder, "encode_images",
                        lambda images, *a, **k: seen.extend(i.size for i in images) or original(images, *a, **k))
    run = benchmarks.run_benchmark(chat, POPE, [str(path)], batch_size=2, progress=False)
    size = chat.encoder.preprocess.size
    assert len(run.answers) == 2 and seen == [(size, size)] * 2


def test_resizing_at_decode_leaves_the_features_unchanged(chat):
    data = _big_png(500)
    from data_pipeline.image_decode import open_image

    early = chat.encoder.encode_images([decode_for_encoder(chat.encoder, data)])
    late = chat.encoder.encode_images([open_image(data)])
    assert torch.equal(early, late)
