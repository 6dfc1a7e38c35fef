"""The frozen-tower feature cache (--feature_cache): runs sharing one cache at the same time, and a damaged cache.

Every check compares the cached features with the encoder's own output for the same image: a cache that answers
with another image's features is the failure these tests exist for."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_dataset, train_argv
from PIL import Image

from data_pipeline.feature_store import FeatureCacheError, FeatureStore
from data_pipeline.image_decode import open_image
from model.vision import load_vision_encoder
from trainer.config import PRETRAIN
from trainer.loop import main

ROOT = Path(__file__).resolve().parents[1]
FP16_TOLERANCE = 0.02  # fp16 rounding of features of magnitude < 10; another image's features differ by whole units


def noise_images(folder: Path, n: int) -> list[str]:
    """n different random-noise images (solid colours repeat, so a mix-up between them could pass unseen)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"noise_{i:02d}.png")
        paths.append(str(folder / f"noise_{i:02d}.png"))
    return paths


def max_feature_error(store: FeatureStore, encoder, paths: list[str]) -> float:
    """The largest difference between the cached features and the encoder's own output over these images."""
    want = encoder.encode_images([open_image(p) for p in paths])
    got = torch.stack([store.get(p).float() for p in paths])
    return float((got - want).abs().max())


CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from data_pipeline.feature_store import FeatureStore
from data_pipeline.image_decode import open_image
from model.vision import load_vision_encoder

clip, cache, go, paths = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
encoder = load_vision_encoder(clip)
encode = encoder.encode_pixels
def slow_encode(pixels):  # a slow tower: both runs are surely encoding at the same time
    time.sleep(0.05)
    return encode(pixels)
encoder.encode_pixels = slow_encode
store = FeatureStore(cache, encoder.fingerprint)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
encoded = store.ensure(paths, encoder, batch_size=2)
want = torch.cat([encode(torch.stack([encoder.preprocess(open_image(p))])) for p in paths])
got = torch.stack([store.get(p).float() for p in paths])
print(json.dumps({"encoded": encoded, "max_error": float((got - want).abs().max())}), flush=True)
"""


def test_two_processes_filling_one_cache_at_once_store_each_image_s_own_features(tmp_path, tiny_clip_dir):
    paths = noise_images(tmp_path / "images", 16)
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_clip_dir), str(cache), str(go),
                              json.dumps(share)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for share in (paths[:12], paths[4:])]  # 8 images in common
    try:
        for run in runs:
            assert run.stdout.readline().strip() == "ready", run.stderr.read()[-3000:]
        go.touch()  # both start encoding now
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(r["max_error"] < FP16_TOLERANCE for r in results), results
    assert sum(r["encoded"] for r in results) == 16, results  # the images in common were encoded once
    encoder = load_vision_encoder(str(tiny_clip_dir))
    store = FeatureStore(str(cache), encoder.fingerprint)
    assert len(store) == 16
    assert max_feature_error(store, encoder, paths) < FP16_TOLERANCE
    assert not [p.name for p in Path(store.dir).iterdir() if "partial" in p.name or p.suffix == ".tmp"]


# ---------------------------------------------------------------------------------------------- damaged caches
@pytest.fixture()
def cache(tmp_path, tiny_clip_dir):
    """A cache of 6 images in two shards: (cache root, encoder, image paths, the store's folder)."""
    paths = noise_images(tmp_path / "images", 6)
    encoder = load_vision_encoder(str(tiny_clip_dir))
    store = FeatureStore(str(tmp_path / "cache"), encoder.fingerprint)
    assert store.ensure(paths[:4], encoder) == 4 and store.ensure(paths, encoder) == 2
    return str(tmp_path / "cache"), encoder, paths, Path(store.dir)


def read_everything(root: str, encoder, paths: list[str]) -> float:
    store = FeatureStore(root, encoder.fingerprint)
    store.ensure(paths, encoder)
    return max_feature_error(store, encoder, paths)


def expect_cache_error(root: str, encoder, paths: list[str], file: Path, phrase: str) -> None:
    """Reading the cache gives one line naming the damaged file and what to do, nothing else."""
    with pytest.raises(FeatureCacheError) as caught:
        read_everything(root, encoder, paths)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(file)), message
    assert phrase in message, message
    assert f"delete {Path(root) / encoder.fingerprint}" in message, message


def test_undamaged_cache_reads_back_each_image_s_features(cache):
    root, encoder, paths, _ = cache
    assert read_everything(root, encoder, paths) < FP16_TOLERANCE


def test_truncated_shard_is_named(cache):
    root, encoder, paths, folder = cache
    shard = folder / "shard_00000.npy"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # was: mmap length is greater than file size
    expect_cache_error(root, encoder, paths, shard, "truncated")


def test_junk_shards_are_named(cache):
    root, encoder, paths, folder = cache
    shard = folder / "shard_00001.npy"
    np.save(shard, np.array([{"features": 1}], dtype=object), allow_pickle=True)  # was: pickled (object) data
    expect_cache_error(root, encoder, paths, shard, "dtype object")
    shard.write_bytes(b"these are not features\n" * 40)
    expect_cache_error(root, encoder, paths, shard, "not a .npy array")


def test_shard_of_another_width_is_named(cache):
    root, encoder, paths, folder = cache
    shard = folder / "shard_00000.npy"
    np.save(shard, np.zeros((4, 50, 32), np.float16))  # was: mat1 and mat2 shapes cannot be multiplied, in training
    expect_cache_error(root, encoder, paths, shard, "(4, 50, 32)")


def test_shard_with_fewer_rows_than_the_index_names_is_named(cache):
    root, encoder, paths, folder = cache
    shard = folder / "shard_00000.npy"
    np.save(shard, np.zeros((2, 50, encoder.hidden_size), np.float16))
    expect_cache_error(root, encoder, paths, shard, "(2, 50, 64)")


def test_missing_shard_is_named(cache):
    root, encoder, paths, folder = cache
    (folder / "shard_00001.npy").unlink()
    expect_cache_error(root, encoder, paths, folder / "shard_00001.npy", "missing")


def test_torn_index_is_named(cache):
    root, encoder, paths, folder = cache
    index = folder / "index.json"
    index.write_bytes(index.read_bytes()[:40])  # was: JSONDecodeError
    expect_cache_error(root, encoder, paths, index, "unreadable")


@pytest.mark.parametrize("damage", ["no entries", "entry of 2 fields", "shard number past the shards",
                                    "row number past the shard's rows", "failed list", "newer version"])
def test_index_of_the_wrong_schema_is_named(cache, damage):
    root, encoder, paths, folder = cache
    index = folder / "index.json"
    data = json.loads(index.read_text())
    if damage == "no entries":
        del data["entries"]  # was: KeyError
    elif damage == "entry of 2 fields":
        data["entries"][os.path.realpath(paths[0])] = [0, 1]
    elif damage == "shard number past the shards":
        data["entries"][os.path.realpath(paths[0])][0] = 7
    elif damage == "row number past the shard's rows":
        data["entries"][os.path.realpath(paths[0])][1] = 4
    elif damage == "newer version":
        data["version"] = 3
    else:
        data["failed"] = ["x"]
    index.write_text(json.dumps(data))
    expect_cache_error(root, encoder, paths, index, "index")


def test_damaged_cache_stops_training_with_one_line(tmp_path, tiny_clip_dir, capsys):
    data, images = make_dataset(tmp_path, 4)
    cache_dir = tmp_path / "cache"
    argv = train_argv(data, images, tiny_clip_dir, tmp_path / "o", "--max_steps", "1", "--epochs", "1",
                      "--feature_cache", str(cache_dir))
    main(PRETRAIN, argv)
    (shard,) = cache_dir.glob("*/shard_00000.npy")
    shard.write_bytes(shard.read_bytes()[:200])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(PRETRAIN, argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err
    assert re.fullmatch(rf"error: {re.escape(str(shard))}: truncated: .*; delete .*\n", err), err


def test_a_killed_writer_s_leftovers_are_removed_and_the_cache_is_used(cache):
    root, encoder, paths, folder = cache
    leftover = folder / ".shard_00002.x1y2z3.partial.npy"
    leftover.write_bytes(b"half a shard")
    store = FeatureStore(root, encoder.fingerprint)
    more = noise_images(folder.parent.parent / "more", 8)[6:]
    assert store.ensure(paths + more, encoder) == 2
    assert not leftover.exists()
    assert max_feature_error(FeatureStore(root, encoder.fingerprint), encoder, paths + more) < FP16_TOLERANCE


def test_index_of_the_earlier_layout_is_still_read(cache):
    """Caches written before the index recorded shard sizes ({"entries", "failed", "n_shards"}) stay usable."""
    root, encoder, paths, folder = cache
    index = folder / "index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({"entries": data["entries"], "failed": data["failed"],
                                 "n_shards": len(data["shards"])}))
    assert read_everything(root, encoder, paths) < FP16_TOLERANCE
    np.save(folder / "shard_00001.npy", np.zeros((2, 50, 32), np.float16))
    expect_cache_error(root, encoder, paths, folder / "shard_00001.npy", "(2, 50, 32)")


def test_store_sent_to_a_spawned_worker_reopens_its_shards(cache):
    """A DataLoader worker started by spawn gets the store pickled: the shards go as names, not as copies."""
    import pickle

    root, encoder, paths, _ = cache
    store = FeatureStore(root, encoder.fingerprint)
    store.get(paths[0])
    sent = pickle.dumps(store)
    assert len(sent) < 4096, len(sent)  # the 6 images' features alone are 38 KB
    assert max_feature_error(pickle.loads(sent), encoder, paths) < FP16_TOLERANCE
