"""Hostile data files: JSON nested too deeply, one huge record, text that forges an image placeholder span, and
image paths that leave --images_path. Each bad record is a counted skip with its reason at load time (or a
DataError under --strict_data), never a traceback and never a crash in the middle of an epoch."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.dataset import VLMDataset
from data_pipeline.records import MAX_RECORD_CHARS, DataError, read_records
from model.config import IMAGE_SPECIAL_TOKEN


def _record(rid: str, question: str = "<image>\nWhat colour is it?", answer: str = "Red.", image: str = "red.png"):
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", folder / "link_out.png")  # inside the folder, pointing out of it
    return folder


def _dataset(tmp_path, images, tokenizer, lines, strict=False):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return VLMDataset(str(path), str(images), tokenizer, max_seq_len=160, strict=strict)


def test_deeply_nested_jsonl_line_is_a_counted_skip(tmp_path, images, tokenizer):
    deep = "[" * 100_000 + "]" * 100_000
    ds = _dataset(tmp_path, images, tokenizer, [_record("good"), deep, '{"id": ' + "[" * 5000 + "]" * 5000 + "}"])
    assert [s.id for s in ds.samples] == ["good"]
    assert ds.skips.counts["malformed JSON"] == 2 and "nested too deeply" in str(read_records(
        str(tmp_path / "data.jsonl"))[1].error)


def test_deeply_nested_json_array_is_one_line(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="deep.json: JSON nested too deeply") as err:
        read_records(str(path))
    assert "\n" not in str(err.value)


def test_integer_too_long_to_convert_is_a_counted_skip(tmp_path, images, tokenizer):
    ds = _dataset(tmp_path, images, tokenizer, [_record("good"), '{"id": ' + "9" * 5000 + "}"])
    assert [s.id for s in ds.samples] == ["good"] and ds.skips.counts["malformed JSON"] == 1


def test_one_huge_record_is_skipped_before_tokenising(tmp_path, images, tokenizer, monkeypatch):
    huge = _record("huge", answer="x" * (MAX_RECORD_CHARS + 10))
    tokenised = []
    import data_pipeline.dataset as dataset_module

    original = dataset_module.tokenize_conversations
    monkeypatch.setattr(dataset_module, "tokenize_conversations",
                        lambda tok, conversations: tokenised.extend(sum(len(m["content"]) for m in messages)
                                                                    for messages in conversations)
                        or original(tok, conversations))
    ds = _dataset(tmp_path, images, tokenizer, [_record("good"), huge])
    assert [s.id for s in ds.samples] == ["good"] and ds.skips.counts["record too large"] == 1
    assert max(tokenised) < 1000  # the huge one never reached the tokenizer
    array = tmp_path / "data.json"  # the same record in a JSON array file
    array.write_text(json.dumps([_record("good"), huge]))
    ds = VLMDataset(str(array), str(images), tokenizer, max_seq_len=160)
    assert [s.id for s in ds.samples] == ["good"] and ds.skips.counts["record too large"] == 1


FORGED = {
    "typed_placeholder": _record("typed_placeholder", f"<image>\nwhat is {IMAGE_SPECIAL_TOKEN}?"),
    "opening_half": _record("opening_half", "<" * 25 + "\n<image>\nwhat?"),
    "touching_tag": _record("touching_tag", "<<image>\nwhat?"),  # one '<' before the tag lengthens its run
    "in_the_answer": _record("in_the_answer", answer="<" * 30),
}


def test_forged_placeholder_text_is_caught_at_load_time(tmp_path, images, tokenizer):
    ds = _dataset(tmp_path, images, tokenizer, [_record("good"), *FORGED.values()])
    assert [s.id for s in ds.samples] == ["good"]
    assert ds.skips.counts["forged image placeholder"] == len(FORGED), ds.skips.counts
    with pytest.raises(DataError, match="record typed_placeholder: forged image placeholder"):
        _dataset(tmp_path, images, tokenizer, [_record("good"), FORGED["typed_placeholder"]], strict=True)


def test_image_paths_stay_inside_images_path(tmp_path, images, tokenizer):
    outside = [_record("dotdot", image="../secret.png"), _record("absolute", image=str(tmp_path / "secret.png")),
               _record("symlink", image="link_out.png")]
    ds = _dataset(tmp_path, images, tokenizer, [_record("good"), *outside])
    assert [s.id for s in ds.samples] == ["good"]
    assert ds.skips.counts["image outside --images_path"] == 3, ds.skips.counts


def test_lone_surrogate_in_a_record_is_a_counted_skip(tmp_path, images, tokenizer):
    """JSON allows "\\ud800"; the tokenizer raised TypeError on it, mid-load."""
    bad = json.dumps(_record("surrogate")).replace("Red.", "Red \\ud800.")
    ds = _dataset(tmp_path, images, tokenizer, [_record("good"), bad])
    assert [s.id for s in ds.samples] == ["good"] and ds.skips.counts["invalid text"] == 1


def test_data_path_that_is_not_a_regular_file_is_one_line(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)  # reading it would block forever
    for path, phrase in [(fifo, "not a regular file"), (tmp_path, "a directory")] + (
            [(Path("/dev/urandom"), "not a regular file")] if Path("/dev/urandom").exists() else []):
        with pytest.raises(DataError, match=phrase):
            read_records(str(path))
