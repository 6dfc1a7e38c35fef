"""Validation while training (--val_data, --eval_interval, --val_samples, --save_best) and --group_by_length."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config
from helpers import make_dataset, run_stage, train_argv

from data_pipeline.dataset import VLMDataset, collate
from data_pipeline.records import DataError
from data_pipeline.samplers import LengthGroupedSampler, ResumableSampler
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM
from checkpoints.weights import read_state_dict
from trainer.config import PRETRAIN
from trainer.distributed import Distributed
from trainer.validation import Validator, answer_span


def test_validator_matches_one_at_a_time_scoring(tmp_path, tokenizer, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 6)
    encoder = load_vision_encoder(str(tiny_clip_dir))
    ds = VLMDataset(str(data), str(images), tokenizer, 96, preprocess=encoder.preprocess)
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer))
    batch = collate([ds[i] for i in range(len(ds))])
    features = encoder.encode_pixels(batch.pixels)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):  # learn the answers of 4 of the 6 records, roughly
        loss = model(batch.input_ids[:4], features[:4], labels=batch.labels[:4]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    result = Validator(ds, tokenizer, encoder, Distributed(False, 0, 1, torch.device("cpu")), batch_size=4,
                       max_scored=5, autocast=contextlib.nullcontext).run(model)
    # the same numbers, one sample at a time, no padding
    with torch.no_grad():
        expected_loss = float(model(batch.input_ids, features, labels=batch.labels, loss_only=True).loss)
    correct = 0
    for i in range(5):
        start, end = answer_span(ds.samples[i])
        ids = torch.tensor([ds.samples[i].input_ids[:start]])
        out = model.generate(ids, features[i:i + 1], max_new_tokens=12, temperature=0.0,
                             eos_token_id=tokenizer.eos_token_id)[0].tolist()
        if tokenizer.eos_token_id in out:
            out = out[:out.index(tokenizer.eos_token_id)]
        answer = tokenizer.decode(ds.samples[i].input_ids[start:end], skip_special_tokens=True)
        correct += tokenizer.decode(out, skip_special_tokens=True).strip().rstrip(".").lower() == \
            answer.strip().rstrip(".").lower()
    assert result.n_samples == 6 and result.n_scored == 5
    assert abs(result.loss - expected_loss) < 1e-4, (result.loss, expected_loss)
    assert result.accuracy == correct / 5 and 0 < correct, correct


def test_validation_and_save_best_on_a_tiny_run(tmp_path, tiny_clip_dir, capsys):
    data, images = make_dataset(tmp_path, 8)
    val, _ = make_dataset(tmp_path, 4, name="val")
    out = tmp_path / "o"
    run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, out, "--max_steps", "4", "--eval_interval", "2",
                             "--val_data", str(val), "--val_samples", "3", "--save_best", "--learning_rate", "3e-3"))
    lines = [json.loads(line) for line in (out / "64_vlm_pretrain_log.jsonl").read_text().splitlines()]
    vals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(0 <= r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in vals)
    assert any("validation: val_loss" in line for line in capsys.readouterr().out.splitlines())
    best = read_state_dict(out / "64_vlm_pretrain_best.pth")
    final = read_state_dict(out / "64_vlm_pretrain.pth")
    scores = [r["val_accuracy"] for r in vals]
    same = all(torch.equal(best[k], final[k]) for k in final)
    assert same == (scores[1] > scores[0]), scores  # the best file holds the weights of the best validation
    # the best score is in the resume state: a resumed run keeps comparing against it
    state = torch.load(out / "64_vlm_pretrain_resume.pth", weights_only=True)
    assert state["best"] == max(scores)


def test_validation_with_nothing_scored_says_so_and_is_never_the_best(tmp_path, tiny_clip_dir, monkeypatch,
                                                                        capsys):
    data, images = make_dataset(tmp_path, 8)
    val = tmp_path / "val.json"
    val.write_text(json.dumps([{"id": f"val{i}", "image": f"img_{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]}
        for i in range(3)]))
    real = VLMDataset.__getitem__

    def val_images_fail(self, index):  # every validation image fails to decode; the training images are fine
        item = real(self, index)
        if item["id"].startswith("val"):
            item.pop("pixels", None)
            item["error"] = "cannot identify image file"
        return item

    monkeypatch.setattr(VLMDataset, "__getitem__", val_images_fail)
    out = tmp_path / "o"
    run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, out, "--max_steps", "2", "--eval_interval", "1",
                                   "--val_data", str(val), "--save_best"))
    reports = [line for line in capsys.readouterr().out.splitlines() if "validation:" in line]
    assert [r.split(" (")[0] for r in reports] == ["step 1 validation: no samples scored",
                                                   "step 2 validation: no samples scored"], reports
    assert not any("(best)" in r for r in reports)
    lines = [json.loads(line) for line in (out / "64_vlm_pretrain_log.jsonl").read_text().splitlines()]
    assert [r for r in lines if "val_status" in r] == [
        {"step": s, "epoch": e, "val_status": "no samples scored", "val_samples": 0} for s, e in ((1, 0), (2, 1))]
    assert not [r for r in lines if "val_loss" in r]  # no 0.0 loss for plots to draw
    assert not (out / "64_vlm_pretrain_best.pth").exists()
    assert torch.load(out / "64_vlm_pretrain_resume.pth", weights_only=True)["best"] is None


def test_save_best_needs_val_data(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 4)
    with pytest.raises(DataError, match="--save_best needs --val_data"):
        run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, tmp_path / "o", "--save_best"))


def varied_lengths_dataset(tmp_path, n: int = 24):
    words = ["a", "a b c d e f", "a b c d e f g h i j k l m n o p"]
    extra = [{"id": f"v{i}", "image": f"img_{i % 4}.png", "conversations": [
        {"from": "human", "value": "<image>\n" + words[i % 3]}, {"from": "gpt", "value": "x " * (1 + 4 * (i % 3))}]}
        for i in range(n)]
    return make_dataset(tmp_path, 4, extra_records=extra)


def test_length_grouped_sampler_pads_less_and_covers_every_sample(tmp_path, tokenizer):
    data, images = varied_lengths_dataset(tmp_path, 96)
    ds = VLMDataset(str(data), str(images), tokenizer, 128)
    lengths = [len(s.input_ids) for s in ds.samples]

    def padding(order, batch=4):
        total = 0
        for i in range(0, len(order), batch):
            rows = [lengths[j] for j in order[i:i + batch]]
            total += max(rows) * len(rows) - sum(rows)
        return total

    grouped = LengthGroupedSampler(ds, lengths, 4, num_replicas=1, rank=0, seed=3)
    shuffled = ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
    grouped.set_epoch(0)
    order = list(grouped)
    assert sorted(order) == list(range(len(ds)))
    assert padding(order) < 0.5 * padding(list(shuffled))
    grouped.set_epoch(1)
    assert list(grouped) != order  # a new order each epoch
    # two ranks: disjoint shares that cover everything
    shares = [list(LengthGroupedSampler(ds, lengths, 4, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(len(ds)))


def test_group_by_length_resume_is_exact(tmp_path, tiny_clip_dir):
    data, images = varied_lengths_dataset(tmp_path, 20)
    argv = train_argv(data, images, tiny_clip_dir, tmp_path / "full", "--group_by_length", "--max_seq_len", "128")
    full = run_stage(PRETRAIN, argv)
    part = train_argv(data, images, tiny_clip_dir, tmp_path / "part", "--group_by_length", "--max_seq_len", "128")
    first = run_stage(PRETRAIN, part + ["--max_steps", "4"])
    second = run_stage(PRETRAIN, part + ["--resume"])
    assert full["step"] == 12 and first["losses"] + second["losses"] == full["losses"]
    log = [json.loads(line) for line in (tmp_path / "full" / "64_vlm_pretrain_log.jsonl").read_text().splitlines()]
    assert all(0 <= r["padding_pct"] < 100 for r in log)


def test_ddp_validation_every_rank_takes_part(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 8)
    val, _ = make_dataset(tmp_path, 5, name="val")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           str(ROOT / "1-pretrain_vlm.py"), *train_argv(data, images, tiny_clip_dir, tmp_path / "o", "--max_steps",
                                                        "2", "--val_data", str(val), "--save_best")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = [line for line in res.stdout.splitlines() if line.startswith("step ") and "validation:" in line]
    assert len(reports) == 1 and "on 5 samples" in reports[0] and "(n=5)" in reports[0], res.stdout[-2000:]
    assert (tmp_path / "o" / "64_vlm_pretrain_best.pth").exists()
