"""The shared training loop: learning, checkpoints in the v1 layout, exact resume, bad records, cache, DDP."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config
from helpers import make_dataset, run_stage, train_argv
from safetensors.torch import load_file

from data_pipeline.dataset import VLMDataset, collate
from data_pipeline.records import DataError
from checkpoints.checkpoint import load_model, load_object
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM
from trainer.config import PRETRAIN, SFT, ConfigError, RunConfig, build_parser, checkpoint_stem, model_size
from trainer.step import lr_at


def test_tiny_model_overfits_a_fixed_batch(tmp_path, tokenizer, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 4)
    encoder = load_vision_encoder(str(tiny_clip_dir))
    ds = VLMDataset(str(data), str(images), tokenizer, 96, preprocess=encoder.preprocess)
    batch = collate([ds[i] for i in range(4)])
    features = encoder.encode_pixels(batch.pixels)
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = model(batch.input_ids, features, labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_labels_cover_only_the_assistant_answer(tokenizer, tmp_path):
    data, images = make_dataset(tmp_path, 1)
    s = VLMDataset(str(data), str(images), tokenizer, 96).samples[0]
    supervised = [t for t, label in zip(s.input_ids, s.labels) if label != -100]
    assert tokenizer.decode(supervised) == "It is red.</s>\n"
    assert len(s.input_ids) == len(s.labels)


def test_batch_padding_is_batch_longest(tokenizer, tmp_path):
    data, images = make_dataset(tmp_path, 2, extra_records=[{"id": "long", "image": "img_0.png", "conversations": [
        {"from": "human", "value": "<image>\nPlease describe this image in many words"},
        {"from": "gpt", "value": "A square of a single colour filling the whole frame."}]}])
    ds = VLMDataset(str(data), str(images), tokenizer, 96)
    batch = collate([ds[0], ds[1]])
    longest = max(len(ds.samples[0].input_ids), len(ds.samples[1].input_ids))
    assert batch.input_ids.shape[1] == longest < 96
    assert collate([ds[0], ds[2]]).input_ids.shape[1] == len(ds.samples[2].input_ids)


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    assert lr_at(0, 100, 1.0, 10) == 0.0 and lr_at(5, 100, 1.0, 10) == 0.5
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(150, 100, 1.0, 10) == pytest.approx(0.1)


def test_preset_picks_the_size_and_size_flags_override_it():
    args = build_parser(PRETRAIN).parse_args(["--preset", "minimind-v"])
    assert model_size(args) == {"dim": 768, "n_layers": 16, "n_heads": 16, "n_kv_heads": 8, "use_moe": False,
                                     "max_seq_len": 200}
    assert checkpoint_stem(args) == "768"  # file names follow the preset
    args = build_parser(SFT).parse_args(["--preset", "minimind-v", "--n_layers", "2", "--use_moe"])
    assert (model_size(args)["dim"], model_size(args)["n_layers"], checkpoint_stem(args)) == (768, 2, "768_moe")
    assert model_size(build_parser(SFT).parse_args([]))["dim"] == 512  # minimind-v-small by default


def test_flags_resolve_once_into_a_frozen_run_config():
    args = build_parser(PRETRAIN).parse_args(["--preset", "minimind-v", "--n_layers", "2"])
    config = RunConfig.from_args(args)
    assert (config.dim, config.n_layers, checkpoint_stem(config)) == (768, 2, "768")
    assert args.dim is None and args.n_layers == 2  # the parsed flags are read, never written
    model_size(args)
    assert args.dim is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 64  # type: ignore[misc]
    for stage in (PRETRAIN, SFT):  # every flag of both stages has its field
        assert RunConfig.from_args(build_parser(stage).parse_args([])).as_dict().keys() == \
            vars(build_parser(stage).parse_args([])).keys()
    with pytest.raises(ConfigError, match="--eval_interval must be at least 0"):
        RunConfig.from_args(build_parser(SFT).parse_args(["--eval_interval", "-1"]))


def test_pretrain_checkpoint_is_v1_layout_and_loads_strictly(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 8)
    out = tmp_path / "out"
    summary = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, out, "--max_steps", "3"))
    ckpt = out / "64_vlm_pretrain.pth"
    assert summary["checkpoint"] == str(ckpt) and ckpt.exists()
    sd = torch.load(ckpt, weights_only=True)
    fixture = load_file(str(ROOT / "tests/fixtures/v1_parity/dense/weights.safetensors"))
    # the v1 layout: the same keys as the reference (2 layers), v1 shapes for our dims (vision_dim 64 here)
    assert set(sd) == set(fixture)
    fresh = MiniMindVLM(tiny_config(vision_dim=64, max_seq_len=96))
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in
                                                          fresh.state_dict().items()} | {
        "vision_proj.vision_proj.0.bias": (64,)}
    load_model(ckpt)  # strict
    # SFT continues from it by name
    summary = run_stage(SFT, train_argv(data, images, tiny_clip_dir, out, "--max_steps", "2", "--image_prefix", "")[1:])
    assert (out / "64_vlm_sft.pth").exists()


def test_missing_start_checkpoint_says_where_to_get_it(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="64_llm.pth.*scripts/download.py --what llm.*--from_scratch"):
        run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "o")[1:])


def test_resume_gives_the_same_loss_trace(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 12)
    full = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "a", "--max_steps", "7", "--epochs", "3"))
    first = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "b", "--max_steps", "4", "--epochs", "3"))
    second = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "b", "--max_steps", "7", "--epochs", "3",
                                      "--resume"))
    assert len(full["losses"]) == 7
    assert first["losses"] + second["losses"] == full["losses"]  # exact, CPU fp32


def test_steps_count_optimizer_updates_under_accumulation(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 12)  # 6 micro-batches of 2 per epoch
    out = tmp_path / "o"
    summary = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, out, "--batch_size", "2",
                                       "--accumulation_steps", "2", "--max_steps", "3"))
    assert summary["step"] == 3 and summary["micro_batches"] == 6 and len(summary["losses"]) == 3
    metrics = [json.loads(line) for line in (out / "64_vlm_pretrain_log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # the run record beside the checkpoint (read by export_model.py's model card)
    record = json.loads((out / "64_vlm_pretrain_run.json").read_text())
    assert record["stage"] == "pretrain" and record["samples"] == 12 and record["data_path"] == str(data)
    assert record["batch_size"] == 2 and record["accumulation_steps"] == 2
    state = load_object(out / "64_vlm_pretrain_resume.pth")
    assert (state["step"], state["epoch"], state["batches_in_epoch"]) == (3, 1, 0)  # the epoch is done
    # an epoch ends a step early: 6 micro-batches in steps of 4 are 2 optimizer steps (4 + 2)
    summary = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "p", "--batch_size", "2",
                                       "--accumulation_steps", "4", "--epochs", "1"))
    assert summary["step"] == 2 and summary["micro_batches"] == 6


def test_bad_records_are_skipped_counted_and_strict_fails(tmp_path, tiny_clip_dir):
    good = [{"id": "x", "image": "img_0.png", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]
    bad = [
        {"id": "no_image_file", "image": "nope.png", "conversations": good[0]["conversations"]},
        {"id": "no_tag", "image": "img_0.png", "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "empty_answer", "image": "img_0.png", "conversations": [
            {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "  "}]},
        {"id": "no_conversations", "image": "img_0.png"},
        {"id": "wrong_role", "image": "img_0.png", "conversations": [
            {"from": "gpt", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "two_images", "image": "img_0.png", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "too_long", "image": "img_0.png", "conversations": [
            {"from": "human", "value": "word " * 80 + "<image>"}, {"from": "gpt", "value": "a"}]},
        {"id": "corrupt_image", "image": "corrupt.png", "conversations": good[0]["conversations"]},
        "{broken json line",
    ]
    data, images = make_dataset(tmp_path, 6, extra_records=bad, jsonl=True)
    (images / "corrupt.png").write_bytes((images / "img_0.png").read_bytes()[:50])
    summary = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "o", "--epochs", "1"))
    assert summary["step"] == 2  # 7 usable records in batches of 4: trained to the end
    assert summary["skipped_records"] == 8 and summary["skipped_images"] == 1
    with pytest.raises(DataError, match="record no_image_file: missing image"):
        run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "o", "--strict_data"))


def test_cached_and_online_features_give_equal_losses(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 8)
    online = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "a", "--max_steps", "4"))
    cache = tmp_path / "cache"
    cached = run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "b", "--max_steps", "4",
                                      "--feature_cache", str(cache)))
    assert len(online["losses"]) == len(cached["losses"]) == 4
    for a, b in zip(online["losses"], cached["losses"]):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a)), (online["losses"], cached["losses"])
    shards = list(cache.glob("*/shard_*.npy"))
    assert len(shards) == 1
    # a second run reuses the store (no new shard); a different encoder gets its own store
    run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "c", "--max_steps", "1",
                             "--feature_cache", str(cache)))
    assert len(list(cache.glob("*/shard_*.npy"))) == 1


def test_ddp_two_processes_on_cpu_end_identical(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "1-pretrain_vlm.py"), *train_argv(data, images, tiny_clip_dir, tmp_path / "o",
                                                        "--max_steps", "3")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sums = re.findall(r"rank \d weights checksum (\S+?)(?=rank|\s|$)", res.stdout)
    assert len(sums) == 2 and sums[0] == sums[1], res.stdout[-2000:]
    assert "replicas identical across 2 ranks" in res.stdout
    load_model(tmp_path / "o" / "64_vlm_pretrain.pth")


def test_wandb_offline_logging(tmp_path, tiny_clip_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    data, images = make_dataset(tmp_path, 4)
    run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "o", "--max_steps", "2", "--use_wandb"))
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    metrics = [json.loads(line) for line in (tmp_path / "o" / "64_vlm_pretrain_log.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["tokens_per_s"] > 0 for m in metrics)
