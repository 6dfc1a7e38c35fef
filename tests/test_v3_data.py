"""minimind-3v data: upstream's parquet rows -> the ids and labels upstream's dataset makes (the reference in
tests/fixtures/v3_parity/data, copied from the upstream run), SigLIP pixels, and 64-token cached features."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from checkpoints.tokenizer import load_tokenizer
from data_pipeline.dataset import VLMDataset, collate
from data_pipeline.feature_store import FeatureStore
from data_pipeline.v3_tokens import keeps_empty_think, tokenize_v3, v3_messages
from model.vision import load_vision_encoder

ROOT = Path(__file__).resolve().parents[1]
V3 = ROOT / "tests" / "fixtures" / "v3_parity"
DATA = V3 / "data"
PAD = 12  # <|image_pad|>


@pytest.fixture(scope="module")
def v3_tokenizer():
    return load_tokenizer(str(V3 / "tokenizer"))


@pytest.fixture(scope="module")
def cases() -> dict:
    if not (DATA / "data_cases.json").exists():
        pytest.skip("the 3v data reference (data_cases.json) is not available")
    return json.loads((DATA / "data_cases.json").read_text(encoding="utf-8"))


def padded(values: list[int], length: int, fill: int) -> list[int]:
    return values[:length] + [fill] * (length - len(values[:length]))


def test_ids_and_labels_equal_upstreams_for_every_reference_case(v3_tokenizer, cases):
    assert len(cases["cases"]) == 10
    for case in cases["cases"]:
        messages = v3_messages({"conversations": cases["rows"][case["row"]]})
        ids, labels = tokenize_v3(v3_tokenizer, messages, case["think_block_kept"])
        n = case["max_length"]  # upstream cuts to max_length and pads with id 0, labels -100
        assert padded(ids, n, 0) == case["input_ids"], case["row"]
        assert padded(labels, n, -100) == case["labels"], case["row"]
    # the cases do differ: with and without the empty think block, cut at 40 inside the image run
    assert cases["cases"][0]["input_ids"] != cases["cases"][4]["input_ids"]
    assert cases["cases"][8]["input_ids"].count(PAD) == 40 - 4


def test_the_dataset_reads_upstreams_parquet_as_upstream(v3_tokenizer, cases, tmp_path):
    encoder = load_vision_encoder(str(V3 / "vision"))
    ds = VLMDataset(str(DATA / cases["parquet"]), str(tmp_path), v3_tokenizer, 192, preprocess=encoder.preprocess,
                    generation="3v")
    assert len(ds) == 4 and ds.skips.total == 0
    by_row = {(c["row"], c["think_block_kept"]): c for c in cases["cases"] if c["max_length"] == 192}
    for row, sample in enumerate(ds.samples):
        case = by_row[(row, keeps_empty_think(sample.id))]
        assert padded(sample.input_ids, 192, 0) == case["input_ids"]
        assert padded(sample.labels, 192, -100) == case["labels"]
    # row 2 is text-only: upstream stores an 8x8 black image that no placeholder uses
    assert [len(s.images) for s in ds.samples] == [1, 1, 0, 1]
    item = ds[0]
    reference = load_file(str(V3 / "dense" / "cases.safetensors"))["single.pixel_values"][0]
    assert torch.equal(item["pixels"][0], reference)  # upstream's SigLIP preprocessing, bit for bit
    batch = collate([ds[i] for i in range(4)])
    assert batch.pixels.shape == (3, 3, 256, 256)
    assert batch.image_rows.tolist() == [0, 1, 3]
    assert batch.image_starts.tolist() == [ds.samples[i].input_ids.index(PAD) for i in (0, 1, 3)]


def write_rows(path: Path, rows: list[tuple[list, object]]) -> Path:
    table = pa.table({"conversations": [json.dumps(c, ensure_ascii=False) for c, _ in rows],
                      "image_bytes": [b if b is None or isinstance(b, list) else [b] for _, b in rows]})
    pq.write_table(table, path)
    return path


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def test_several_images_forged_runs_and_cuts(v3_tokenizer, tmp_path):
    qa = [{"role": "user", "content": "<image> and <image>: which is red?"}, {"role": "assistant", "content": "A"}]
    forged = [{"role": "user", "content": "<image><|image_pad|> q"}, {"role": "assistant", "content": "a"}]
    touching = [{"role": "user", "content": "<image><image> q"}, {"role": "assistant", "content": "a"}]
    missing = [{"role": "user", "content": "<image> <image> q"}, {"role": "assistant", "content": "a"}]
    system_late = [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]
    path = write_rows(tmp_path / "d.parquet", [(qa, [png((255, 0, 0)), png((0, 0, 255))]),
                                               (forged, png((1, 2, 3))), (touching, [png((1, 1, 1)), png((2, 2, 2))]),
                                               (missing, png((3, 3, 3))), (system_late, None)])
    ds = VLMDataset(str(path), str(tmp_path), v3_tokenizer, 400, generation="3v")
    assert len(ds) == 1 and len(ds.samples[0].images) == 2
    assert ds.skips.counts == {"forged image placeholder": 2, "image count mismatch": 1, "wrong role": 1}
    assert ds[0]["image_starts"] == [4, 4 + 64 + len(v3_tokenizer(" and ", add_special_tokens=False)["input_ids"])]
    # an answer cut away is a skip; a later image's run cut short keeps that image (the model takes its first
    # rows), one cut away entirely is not used
    starts = ds[0]["image_starts"]
    cut = VLMDataset(str(path), str(tmp_path), v3_tokenizer, starts[1] + 10, generation="3v")
    assert cut.skips.counts["too long"] == 1
    two_turns = [{"role": "user", "content": "<image> q"}, {"role": "assistant", "content": "a"},
                 {"role": "user", "content": "and <image>?"}, {"role": "assistant", "content": "b"}]
    path2 = write_rows(tmp_path / "e.parquet", [(two_turns, [png((9, 9, 9)), png((8, 8, 8))])])
    full = VLMDataset(str(path2), str(tmp_path), v3_tokenizer, 400, generation="3v").samples[0]
    second = full.input_ids.index(PAD, full.input_ids.index(PAD) + 64)
    inside = VLMDataset(str(path2), str(tmp_path), v3_tokenizer, second + 10, generation="3v").samples[0]
    before = VLMDataset(str(path2), str(tmp_path), v3_tokenizer, second - 1, generation="3v").samples[0]
    assert (len(inside.images), inside.input_ids.count(PAD), len(before.images)) == (2, 74, 1)
    with pytest.raises(Exception, match="record"):
        VLMDataset(str(path), str(tmp_path), v3_tokenizer, 400, generation="3v", strict=True)


def test_the_feature_cache_holds_64_features_per_image(v3_tokenizer, cases, tmp_path):
    encoder = load_vision_encoder(str(V3 / "vision"))
    store = FeatureStore(str(tmp_path / "cache"), encoder.fingerprint)
    ds = VLMDataset(str(DATA / cases["parquet"]), str(tmp_path), v3_tokenizer, 192, preprocess=encoder.preprocess,
                    feature_store=store, generation="3v")
    assert store.ensure(ds.image_paths(), encoder) == 2  # rows 0 and 3 hold the same image
    reopened = FeatureStore(str(tmp_path / "cache"), encoder.fingerprint)
    assert reopened.tokens == 64
    features = reopened.get(ds.samples[0].images[0])
    assert features.shape == (64, encoder.hidden_size) and features.dtype == torch.float16
    pixels = encoder.preprocess(Image.open(io.BytesIO(ds.samples[0].images[0].read())).convert("RGB"))
    expected = encoder.encode_pixels(pixels[None])[0].half()
    assert torch.equal(features, expected)
    assert collate([ds[0], ds[1]]).features.shape == (2, 64, encoder.hidden_size)
    # a shard whose rows are not 64 features wide is damage, named with the rebuild hint
    shard = next((tmp_path / "cache" / encoder.fingerprint).glob("shard_*.npy"))
    import numpy as np

    np.save(shard, np.zeros((2, 50, encoder.hidden_size), np.float16))
    with pytest.raises(Exception, match="shape .*64.*delete"):
        FeatureStore(str(tmp_path / "cache"), encoder.fingerprint)
    shutil.rmtree(tmp_path / "cache")
