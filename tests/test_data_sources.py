"""Parquet data in the current MiniMind-V layout, several images per sample, and text-only samples."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config
from helpers import COLORS, make_dataset, run_stage, train_argv
from PIL import Image

from data_pipeline.dataset import VLMDataset, collate
from data_pipeline.feature_store import FeatureStore
from data_pipeline.parquet import ParquetImage, read_parquet_records
from data_pipeline.records import DataError
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM
from trainer.config import PRETRAIN, SFT

MAX_SEQ_LEN = 160


def png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), COLORS[color]).save(buf, format="PNG")
    return buf.getvalue()


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_parquet(path: Path, rows: list[tuple[object, object]], row_group_size: int = 3,
                  list_images: bool = True) -> Path:
    """rows: (conversations as a list or a JSON string, images as bytes / list of bytes / None)."""
    conversations = [c if isinstance(c, str) else json.dumps(c, ensure_ascii=False) for c, _ in rows]
    if list_images:
        images = [None if i is None else (i if isinstance(i, list) else [i]) for _, i in rows]
        image_type = pa.list_(pa.binary())
    else:
        images, image_type = [i for _, i in rows], pa.binary()
    table = pa.table({"conversations": pa.array(conversations, pa.string()),
                      "image_bytes": pa.array(images, image_type)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


GOOD_ROWS = [
    (chat("<image>\nWhat colour is it?", "red"), png("red")),
    (chat("<image>\n<image>\nSame colour?", "no"), [png("red"), png("blue")]),
    (chat("Say hello.", "hello"), None),  # text-only
    (chat("<image>\nWhat colour is it?", "blue"), png("blue")),
    (chat("<image>\n<image>\nSame colour?", "yes"), [png("green"), png("green")]),
]
BAD_ROWS = [
    (chat("<image>\nWhat colour is it?", "green"), b"not an image at all"),  # no image header: skipped when built
    (chat("<image>\n<image>\nq", "a"), png("red")),  # 2 tags, 1 image
    (chat("<image>\nq", "  "), png("red")),  # empty answer
    ("[{\"role\": \"user\", ", png("red")),  # malformed JSON
]
# a whole PNG header but a cut body: only decoding finds it, when the item is fetched
TRUNCATED_ROW = (chat("<image>\nWhat colour is it?", "green"), png("green")[:60])


def test_parquet_rows_multi_image_text_only_and_bad_rows(tmp_path, tokenizer, tiny_clip_dir):
    path = write_parquet(tmp_path / "data.parquet", GOOD_ROWS + BAD_ROWS + [TRUNCATED_ROW])
    assert pq.ParquetFile(path).num_row_groups == 4  # read by row group
    ds = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN)
    assert len(ds) == 6  # the truncated image is found when it is loaded, like a corrupt file
    assert dict(ds.skips.counts) == {"unreadable image": 1, "image count mismatch": 1, "empty answer": 1,
                                     "malformed conversations JSON": 1}
    assert [len(s.images) for s in ds.samples] == [1, 2, 0, 1, 2, 1]
    assert all(isinstance(ref, ParquetImage) for s in ds.samples for ref in s.images)
    # several images: one placeholder span each, in order; the text-only sample has none
    items = [ds[i] for i in range(6)]
    assert [it["pixels"] and len(it["pixels"]) for it in items[:5]] == [1, 2, [], 1, 2]
    assert "corrupt or truncated" in items[5]["error"] and "data.parquet row group 3 row 0" in items[5]["error"]
    batch = collate(items)
    assert [rid for rid, _ in batch.skipped] == [ds.samples[5].id]
    assert batch.pixels.shape == (6, 3, 224, 224) and batch.n_images == 6
    # the images come back in row-major order: the second row's blue is the third image
    blue = ds.preprocess(Image.open(io.BytesIO(png("blue"))).convert("RGB"))
    assert torch.allclose(batch.pixels[2], blue)
    # the feature cache keys parquet images by content: 3 distinct good images (red, blue, green) + 1 that failed
    encoder = load_vision_encoder(str(tiny_clip_dir))
    store = FeatureStore(str(tmp_path / "cache"), encoder.fingerprint)
    assert store.ensure(ds.image_paths(), encoder) == 4
    assert len(store.entries) == 3 and all(k.startswith("blake2b:") for k in store.entries)
    assert len(store.failed) == 1
    ds_cached = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN, feature_store=store)
    cached = collate([ds_cached[i] for i in range(6)])
    assert cached.features.shape == (6, 50, encoder.hidden_size)
    assert len(cached.skipped) == 1


def test_parquet_single_binary_column_and_skip_text_only(tmp_path, tokenizer):
    rows = [(chat("<image>\nWhat colour is it?", "red"), png("red")), (chat("Say hello.", "hello"), None)]
    path = write_parquet(tmp_path / "one.parquet", rows, list_images=False)
    assert [len(s.images) for s in VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN).samples] == [1, 0]
    ds = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN, skip_text_only=True)
    assert len(ds) == 1 and dict(ds.skips.counts) == {"text-only record (skipped under --skip_text_only)": 1}


def test_parquet_is_streamed_by_row_group(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", GOOD_ROWS * 4, row_group_size=2)
    seen = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        table = original(self, i, *args, **kwargs)
        seen.append(table.num_rows)
        return table

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    assert len(list(read_parquet_records(str(path), 1 << 20))) == 20
    assert seen == [2] * 10


def test_multi_image_json_record_both_forms_and_cut_spans(tmp_path, tokenizer):
    two = "<image>\n<image>\nSame colour?"
    extra = [
        {"id": "list", "image": ["img_0.png", "img_1.png"], "conversations": [
            {"from": "human", "value": two}, {"from": "gpt", "value": "no"}]},
        {"id": "comma", "image": "img_0.png, img_2.png", "conversations": [
            {"from": "human", "value": two}, {"from": "gpt", "value": "yes"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
        # the second span would end past max_seq_len: skipped, not cut
        {"id": "cut", "image": ["img_0.png", "img_1.png"], "conversations": [
            {"from": "human", "value": "<image>\n" + "word " * 40 + "<image>"}, {"from": "gpt", "value": "a"}]},
    ]
    data, images = make_dataset(tmp_path, 3, extra_records=extra)
    ds = VLMDataset(str(data), str(images), tokenizer, 140)
    by_id = {s.id: s for s in ds.samples}
    assert [Path(p).name for p in by_id["list"].images] == ["img_0.png", "img_1.png"]
    assert [Path(p).name for p in by_id["comma"].images] == ["img_0.png", "img_2.png"]
    assert by_id["text"].images == []
    assert "cut" not in by_id and "too long" in ds.skips.counts
    with pytest.raises(DataError, match="record cut: too long: .* the image span ends past max_seq_len 140"):
        VLMDataset(str(data), str(images), tokenizer, 140, strict=True)
    placeholder = tokenizer("<" * 25 + ">" * 25, add_special_tokens=False)["input_ids"]
    assert sum(by_id["list"].input_ids[i:i + 50] == placeholder for i in range(len(by_id["list"].input_ids))) == 2


def test_mixed_batch_equals_rows_one_at_a_time(tmp_path, tokenizer, tiny_clip_dir):
    """Text-only, one-image and two-image rows in one padded batch give the loss of the rows run alone."""
    path = write_parquet(tmp_path / "mix.parquet", GOOD_ROWS[:3])
    encoder = load_vision_encoder(str(tiny_clip_dir))
    ds = VLMDataset(str(path), "", tokenizer, MAX_SEQ_LEN, preprocess=encoder.preprocess)
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer, max_seq_len=MAX_SEQ_LEN)).eval()

    @torch.no_grad()
    def loss_of(items):
        batch = collate(items)
        pixels = batch.pixels
        features = encoder.encode_pixels(pixels) if pixels is not None else None
        loss = model(batch.input_ids, features, labels=batch.labels, loss_only=True).loss
        return float(loss), int((batch.labels[:, 1:] != -100).sum())

    items = [ds[i] for i in range(3)]
    mixed, n_mixed = loss_of(items)
    alone = [loss_of([it]) for it in items]
    assert n_mixed == sum(n for _, n in alone)
    weighted = sum(loss * n for loss, n in alone) / n_mixed  # the batch loss is a mean over supervised tokens
    assert abs(mixed - weighted) < 1e-5, (mixed, alone)


def test_training_on_parquet_with_feature_cache_and_exact_resume(tmp_path, tiny_clip_dir):
    path = write_parquet(tmp_path / "train.parquet", GOOD_ROWS * 2)
    argv = train_argv(path, tmp_path, tiny_clip_dir, tmp_path / "o", "--max_seq_len", "160", "--batch_size", "3",
                      "--feature_cache", str(tmp_path / "cache"))
    full = run_stage(SFT, argv)
    assert full["step"] == 8 and full["skipped_records"] == 0
    first = run_stage(SFT, argv + ["--out_dir", str(tmp_path / "r"), "--max_steps", "3"])
    second = run_stage(SFT, argv + ["--out_dir", str(tmp_path / "r"), "--resume"])
    assert first["losses"] + second["losses"] == full["losses"]
    # projection-only training on a batch without images still runs (nothing to learn from it)
    rows = [(chat("Say hello.", "hello"), None)] * 2 + [(chat("<image>\nWhat colour is it?", "red"), png("red"))]
    text_first = write_parquet(tmp_path / "text_first.parquet", rows)
    argv = train_argv(text_first, tmp_path, tiny_clip_dir, tmp_path / "f", "--max_seq_len", "160",
                      "--batch_size", "2", "--freeze_llm", "1", "--epochs", "1")
    assert run_stage(PRETRAIN, argv)["step"] == 2
