"""Bad parquet data files and rows: a file that cannot be read at all is one line `error: <file>: ...` from the
training scripts (through --data_path and --val_data alike), a path that is not a regular file is refused before
any reader opens it, and a bad image cell is a counted skip naming the row, found when the dataset is built."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from helpers import make_dataset, train_argv
from test_data_sources import chat, png, write_parquet

from data_pipeline.dataset import VLMDataset, collate
from data_pipeline.records import MAX_RECORD_CHARS, DataError
from model.config import IMAGE_SPECIAL_TOKEN
from trainer.config import PRETRAIN
from trainer.loop import main

MAX_SEQ_LEN = 160
QUESTION = chat("<image>\nWhat colour is it?", "red")


def _good_file(path: Path) -> Path:
    return write_parquet(path, [(QUESTION, png("red"))] * 4, row_group_size=2)


def _truncated(path: Path) -> Path:
    raw = _good_file(path).read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    return path


def _corrupt_row_group(path: Path) -> Path:
    """A file whose footer is intact but whose first row group's data pages are overwritten."""
    raw = bytearray(_good_file(path).read_bytes())
    raw[4:200] = b"\xff" * 196
    path.write_bytes(bytes(raw))
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _no_conversations(path: Path) -> Path:
    pq.write_table(pa.table({"text": ["hello"], "image_bytes": pa.array([png("red")], pa.binary())}), path)
    return path


# name -> (how to make the file, a phrase of its one-line error)
UNREADABLE = {
    "truncated": (_truncated, "not a readable parquet file"),
    "not_parquet": (lambda p: p.write_text("id,text\n1,hello\n") and p, "not a readable parquet file"),
    "empty": (lambda p: p.write_bytes(b"") is not None and p, "not a readable parquet file"),
    "directory": (_directory, "a directory"),
    "no_conversations": (_no_conversations, "no 'conversations' column"),
    "corrupt_row_group": (_corrupt_row_group, "row group 0"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_parquet_file_is_a_data_error(tmp_path, tokenizer, case):
    make, phrase = UNREADABLE[case]
    path = make(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=phrase) as err:
        VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("flag", ["--data_path", "--val_data"])
@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_parquet_file_is_one_line_from_the_trainer(tmp_path, tiny_clip_dir, capsys, case, flag):
    make, phrase = UNREADABLE[case]
    bad = make(tmp_path / "bad.parquet")
    data, images = make_dataset(tmp_path, 2)
    argv = train_argv(data, images, tiny_clip_dir, tmp_path / "out", "--epochs", "1") + [flag, str(bad)]
    with pytest.raises(SystemExit) as code:
        main(PRETRAIN, argv)
    err = capsys.readouterr().err
    assert code.value.code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and phrase in lines[0], err


def test_fifo_named_parquet_is_refused_by_the_script_without_blocking(tmp_path, tiny_clip_dir):
    """Through the real 2-sft_vlm.py: a FIFO would block any reader forever; it is refused before one opens it."""
    fifo = tmp_path / "data.parquet"
    os.mkfifo(fifo)
    _, images = make_dataset(tmp_path, 1)
    argv = train_argv(fifo, images, tiny_clip_dir, tmp_path / "out")
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "2-sft_vlm.py"), *argv], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO named .parquet blocked")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {fifo}: not a regular file" in proc.stderr, proc.stderr


def _struct_column(value_type: pa.DataType, values: list) -> pa.Array:
    """An image column in the Hugging Face {"bytes", "path"} struct form, with `bytes` of the given type."""
    return pa.array([{"bytes": v, "path": "x.png"} for v in values],
                    pa.struct([("bytes", value_type), ("path", pa.string())]))


@pytest.mark.parametrize("value_type, value, named", [(pa.string(), "not binary", "str"),
                                                      (pa.float64(), 1.5, "float"),
                                                      (pa.int64(), 2 ** 62, "int")])
def test_image_struct_whose_bytes_are_not_binary_is_a_counted_skip(tmp_path, tokenizer, caplog, value_type, value,
                                                                    named):
    path = tmp_path / "struct.parquet"
    table = pa.table({"conversations": [json.dumps(QUESTION)] * 2,
                      "image_bytes": _struct_column(value_type, [value, value])})
    pq.write_table(table, path)
    with caplog.at_level("WARNING", logger="minimind"):
        ds = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN)
    assert len(ds) == 0 and dict(ds.skips.counts) == {"bad image_bytes": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "struct.parquet:rg0:0" in warnings[0] and f"'bytes' is a {named}" in warnings[0], warnings


def test_junk_images_are_skipped_when_the_dataset_is_built(tmp_path, tokenizer):
    truncated_png = png("blue")[:60]  # the header is whole, the pixels are not: found when the image is decoded
    rows = [(QUESTION, png("red")), (QUESTION, b"junk bytes, no image"), (QUESTION, b""),
            (chat("<image>\n<image>\nSame?", "no"), [png("red"), b"\x89PNG\r\n\x1a\n broken"]),
            (QUESTION, truncated_png)]
    path = write_parquet(tmp_path / "mixed.parquet", rows)
    ds = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN)
    assert len(ds) == 2 and dict(ds.skips.counts) == {"unreadable image": 3}
    assert "error" in ds[1] and "mixed.parquet row group 1 row 1 image 0" in ds[1]["error"]
    with pytest.raises(DataError, match=r"record mixed.parquet:rg0:1: unreadable image: .*row 1 image 0: not an "
                                        r"image .*--strict_data"):
        VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN, strict=True)


def test_file_of_junk_images_is_no_usable_records(tmp_path, tiny_clip_dir, capsys):
    """It used to train on nothing but placeholders to a loss of nan and exit 0."""
    path = write_parquet(tmp_path / "junk.parquet", [(QUESTION, b"junk %d" % i) for i in range(6)])
    with pytest.raises(SystemExit) as code:
        main(PRETRAIN, train_argv(path, tmp_path, tiny_clip_dir, tmp_path / "out", "--max_seq_len", "160"))
    err = capsys.readouterr().err
    assert code.value.code == 1 and "Traceback" not in err
    assert f"error: {path}: no usable records (6 records skipped: 6 unreadable image" in err, err


def test_record_over_the_limit_once_tags_are_expanded_is_skipped_before_tokenising(tmp_path, tokenizer,
                                                                                  monkeypatch):
    """25,000 `<image>` tags are 175,000 characters but 1.25 M once each is the 50-token placeholder: skipped
    before the placeholders are written in and tokenised, in JSON and parquet alike."""
    import data_pipeline.dataset as dataset_module

    tags = 25_000
    assert tags * len("<image>") < MAX_RECORD_CHARS < tags * len(IMAGE_SPECIAL_TOKEN)
    seen: list[int] = []
    original = dataset_module.with_placeholders
    monkeypatch.setattr(dataset_module, "with_placeholders",
                        lambda messages: seen.append(sum(len(m["content"]) for m in messages)) or original(messages))
    many = chat("<image>" * tags + "\nWhat colours?", "red")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png("red"))
    json_file = tmp_path / "many.json"
    json_file.write_text(json.dumps([{"id": "good", "image": "a.png", "conversations": QUESTION},
                                     {"id": "many", "image": ["a.png"] * tags, "conversations": many}]))
    parquet_file = write_parquet(tmp_path / "many.parquet", [(QUESTION, png("red")), (many, [png("red")] * tags)])
    for path in (json_file, parquet_file):
        seen.clear()
        ds = VLMDataset(str(path), str(images), tokenizer, MAX_SEQ_LEN)
        assert len(ds) == 1 and dict(ds.skips.counts) == {"record too large": 1}, ds.skips.summary()
        assert len(seen) == 1 and seen[0] < 100  # only the good record reached the placeholders and tokenizer



def test_parquet_file_changed_after_the_dataset_was_built_is_a_skipped_image(tmp_path, tokenizer):
    """Reading an image back from a row group that is no longer readable is the item's image error, counted by
    collate (or a DataError under --strict_data), not an arrow exception in the middle of an epoch."""
    path = _good_file(tmp_path / "changing.parquet")
    ds = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN)
    strict = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN, strict=True)
    path.write_bytes(b"no longer parquet")
    assert "changing.parquet row group 0 row 0 image 0: cannot be read back" in ds[0]["error"]
    with pytest.raises(DataError, match="record changing.parquet:rg0:0: .*cannot be read back"):
        strict[0]


def test_dataset_options_are_keyword_only(tmp_path, tokenizer):
    """Eleven positional arguments (one a bare False) read as anything; past the first four they must be named."""
    red = png("red")
    path = write_parquet(tmp_path / "data.parquet", [(chat("<image>\nWhat colour is it?", "red"), red),
                                                     (chat("<image>\nIs it red?", "yes"), red)])
    with pytest.raises(TypeError, match="positional"):
        VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN, "", False)
    packed = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN, pack_same_image=2)
    assert [s.segment_ids is not None for s in packed.samples] == [True]
    assert "segment_ids" in packed[0] and collate([packed[0]]).segment_ids is not None


@pytest.mark.parametrize("width, height", [(20000, 20000), (9000, 9000)])  # Pillow's own limit; only ours
def test_decompression_bomb_in_a_parquet_cell_is_refused_as_a_file_is(tmp_path, tokenizer, width, height):
    """One guard for image files and parquet cells: the same refusal, from the header, before any pixel."""
    from test_robustness_images import bomb_png

    from data_pipeline.image_decode import ImageError, open_image
    from data_pipeline.parquet import image_header_problem

    bomb = bomb_png(width, height)
    problem = image_header_problem(bomb)
    assert problem is not None and problem.startswith("refused, image too large"), problem
    with pytest.raises(ImageError) as refused:
        open_image(bomb, name="bomb.png")
    assert str(refused.value) == f"bomb.png: {problem}"
    path = write_parquet(tmp_path / "bomb.parquet", [(QUESTION, bomb), (QUESTION, png("red"))])
    ds = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN)
    assert len(ds) == 1 and dict(ds.skips.counts) == {"unreadable image": 1}, ds.skips.summary()
