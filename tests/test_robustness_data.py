"""Bad data files and records: each bad record is skipped and counted by reason (training goes on), and under
--strict_data it is an error naming the data file and the record. A file that cannot be read at all is a
one-line DataError naming the file (and the line, for malformed JSON)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_dataset, run_stage, train_argv

from data_pipeline.dataset import VLMDataset
from data_pipeline.records import DataError
from trainer.config import PRETRAIN
from trainer.loop import main

MAX_SEQ_LEN = 96


def turns(question: str = "<image>\nWhat colour is it?", answer: str = "It is red.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# id -> (record or raw JSONL line, reason key it is counted under, phrase of its message)
BAD = {
    "broken_json": ('{"id": "broken_json", "image": "img_0.png", "conversations": [', "malformed JSON",
                    "malformed JSON"),
    "not_an_object": ("[1, 2, 3]", "not a JSON object", "not a JSON object"),
    "no_conversations": ({"id": "no_conversations", "image": "img_0.png"}, "no conversations", "no conversations"),
    "empty_conversations": ({"id": "empty_conversations", "image": "img_0.png", "conversations": []},
                            "no conversations", "no conversations"),
    "wrong_role": ({"id": "wrong_role", "image": "img_0.png", "conversations": [
        {"from": "gpt", "value": "<image>\nq"}, {"from": "human", "value": "a"}]}, "wrong role", "wrong role: turn 0"),
    "unknown_role": ({"id": "unknown_role", "image": "img_0.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "robot", "value": "a"}]}, "wrong role", "'robot'"),
    "malformed_turn": ({"id": "malformed_turn", "image": "img_0.png", "conversations": ["<image> q", "a"]},
                       "malformed turn", "malformed turn"),
    "image_span_cut": ({"id": "image_span_cut", "image": "img_0.png",
                        "conversations": turns("word " * 40 + "<image>", "a")}, "too long", "image span ends past"),
    "answer_cut": ({"id": "answer_cut", "image": "img_0.png",
                    "conversations": turns("<image>\n" + "word " * 40, "a")}, "too long", "no answer token left"),
    "two_tags_one_image": ({"id": "two_tags_one_image", "image": "img_0.png",
                            "conversations": turns("<image>\n<image>\nq")},
                           "image count mismatch", "2 <image> tag(s) but 1 image(s)"),
    "no_image_tag": ({"id": "no_image_tag", "image": "img_0.png", "conversations": turns("q")},
                     "image count mismatch", "0 <image> tag(s) but 1 image(s)"),
    "no_image_field": ({"id": "no_image_field", "conversations": turns()}, "image count mismatch",
                       "1 <image> tag(s) but 0 image(s)"),
    "image_not_a_name": ({"id": "image_not_a_name", "image": {"a": 1}, "conversations": turns()},
                         "'image' is a dict", "expected a file name or a list"),
    "second_image_missing": ({"id": "second_image_missing", "image": ["img_0.png", "nope2.png"],
                              "conversations": turns("<image>\n<image>\nq")}, "missing image", "nope2.png"),
    "missing_image": ({"id": "missing_image", "image": "nope.png", "conversations": turns()}, "missing image",
                      "nope.png"),
    "empty_answer": ({"id": "empty_answer", "image": "img_0.png", "conversations": turns(answer="  ")},
                     "empty answer", "empty answer"),
}
N_GOOD = 4


def write_data(root: Path, bad_ids: list[str], jsonl: bool = True) -> tuple[Path, Path]:
    """N_GOOD good records, then the bad ones; the broken line's id is 'line N' (its line number)."""
    extra = [BAD[b][0] for b in bad_ids]
    return make_dataset(root, N_GOOD, extra_records=extra, jsonl=jsonl)


def record_name(bad_id: str) -> str:
    """How the record is named in messages: its id, or its line for a line that is not a JSON object."""
    return {"broken_json": "line", "not_an_object": "line"}.get(bad_id, bad_id)


@pytest.mark.parametrize("bad_id", list(BAD))
def test_bad_record_is_skipped_and_counted_and_strict_names_it(tmp_path, tokenizer, caplog, bad_id):
    data, images = write_data(tmp_path, [bad_id])
    record, reason_key, phrase = BAD[bad_id]
    with caplog.at_level("WARNING", logger="minimind"):
        ds = VLMDataset(str(data), str(images), tokenizer, MAX_SEQ_LEN)
    assert len(ds) == N_GOOD and ds.skips.total == 1
    assert list(ds.skips.counts.values()) == [1] and next(iter(ds.skips.counts)).startswith(reason_key)
    expected_name = f"line {N_GOOD + 1}" if bad_id == "broken_json" else record_name(bad_id)
    if bad_id == "not_an_object":
        expected_name = f"#{N_GOOD}"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and expected_name in warnings[0] and phrase in warnings[0], warnings
    assert expected_name in ds.skips.summary()

    with pytest.raises(DataError) as err:
        VLMDataset(str(data), str(images), tokenizer, MAX_SEQ_LEN, strict=True)
    message = str(err.value)
    assert message.startswith(f"{data}: record {expected_name}: ") and phrase in message, message
    assert "--strict_data" in message and "\n" not in message


def test_long_answer_is_truncated_not_dropped(tmp_path, tokenizer):
    data, images = make_dataset(tmp_path, 1, extra_records=[
        {"id": "long_answer", "image": "img_0.png", "conversations": turns(answer="word " * 40)}])
    ds = VLMDataset(str(data), str(images), tokenizer, MAX_SEQ_LEN)
    assert len(ds) == 2 and ds.skips.total == 0
    long = ds.samples[1]
    assert len(long.input_ids) == len(long.labels) == MAX_SEQ_LEN
    assert sum(label != -100 for label in long.labels) > 5  # the part of the answer that fits is trained on


def test_all_kinds_together_training_skips_and_counts_them(tmp_path, tiny_clip_dir):
    data, images = write_data(tmp_path, list(BAD))
    summary = run_stage(PRETRAIN, 
        train_argv(data, images, tiny_clip_dir, tmp_path / "out", "--epochs", "1"))
    assert summary["skipped_records"] == len(BAD) and summary["skipped_images"] == 0
    assert summary["step"] == 1 and len(summary["losses"]) == 1  # the 4 good records: one batch


def test_strict_data_through_the_command_line_is_one_line(tmp_path, tiny_clip_dir, capsys):
    data, images = write_data(tmp_path, ["wrong_role", "two_tags_one_image"])
    with pytest.raises(SystemExit) as code:
        main(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "out", "--strict_data"))
    assert code.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"{data}: record wrong_role: wrong role" in lines[0], err


def test_malformed_json_array_names_the_file_and_line(tmp_path, tokenizer, tiny_clip_dir, capsys):
    data, images = make_dataset(tmp_path, 2)
    records = json.loads(data.read_text())
    text = "[\n" + ",\n".join(json.dumps(r) for r in records) + ",\n{\"id\": \"cut\", \"image\": \"img_0.png\"\n]\n"
    data.write_text(text)  # the last object lacks its closing brace: the parser stops on line 5
    with pytest.raises(DataError, match=rf"^{data}: malformed JSON at line 5 column 1: ") as err:
        VLMDataset(str(data), str(images), tokenizer, MAX_SEQ_LEN)
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit) as code:  # the trainer says the same in one line, no traceback
        main(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code.value.code == 1 and "Traceback" not in err
    assert f"error: {data}: malformed JSON at line 5" in err


def test_file_that_is_not_utf8_is_a_data_error(tmp_path, tokenizer, tiny_clip_dir, capsys):
    data, images = make_dataset(tmp_path, 2, jsonl=True)
    raw = data.read_bytes().split(b"\n")
    raw.insert(1, b'{"id": "latin1", "image": "img_0.png", "conversations": "caf\xe9"}')
    data.write_bytes(b"\n".join(raw))
    with pytest.raises(DataError, match=rf"^{data}: not UTF-8 text \(line 2: ") as err:
        VLMDataset(str(data), str(images), tokenizer, MAX_SEQ_LEN)
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit):
        main(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: {data}: not UTF-8 text" in err


@pytest.mark.parametrize("content", ["", "\n\n", "[]", '{"id": "a",\n "image": "x.png"}\n'])
def test_file_with_no_usable_records(tmp_path, tiny_clip_dir, capsys, content):
    data, images = make_dataset(tmp_path, 1)
    data.write_text(content)
    with pytest.raises(SystemExit) as code:
        main(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code.value.code == 1 and "Traceback" not in err
    assert f"error: {data}: no usable records" in err


def test_missing_data_file(tmp_path, tiny_clip_dir, capsys):
    with pytest.raises(SystemExit):
        main(PRETRAIN, train_argv(tmp_path / "none.json", tmp_path, tiny_clip_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: data file not found: {tmp_path / 'none.json'}" in err
