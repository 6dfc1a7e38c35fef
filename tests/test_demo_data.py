"""Tests for the offline demo assets: the easy-vqa demo dataset and the stand-in CLIP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.build_demo_data import COLORS, SHAPES, build  # noqa: E402
from scripts.build_stand_in_clip import build_stand_in_clip  # noqa: E402


def _check_v1_records(records: list, image_dir: Path) -> None:
    assert isinstance(records, list) and records
    ids = set()
    for rec in records:
        assert set(rec) == {"id", "image", "conversations"}
        assert isinstance(rec["id"], str) and rec["id"] not in ids
        ids.add(rec["id"])
        assert "/" not in rec["image"] and (image_dir / rec["image"]).is_file()
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and len(human["value"]) > len("<image>\n")
        assert gpt["value"].strip()


def test_build_demo_data_small(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    summary = build(str(out), max_train_images=20, max_test_questions=30, seed=0)
    demo = out / "demo"
    pretrain = json.loads((demo / "pretrain.json").read_text())
    sft = json.loads((demo / "sft.json").read_text())
    test = json.loads((demo / "test.json").read_text())

    assert len(pretrain) == 20 and summary["train_images"] == 20
    assert len(test) == 30
    _check_v1_records(pretrain, demo / "images/train")
    _check_v1_records(sft, demo / "images/train")
    _check_v1_records(test, demo / "images/test")
    assert len(list((demo / "images/train").glob("train_*.png"))) == 20

    # Captions name exactly one known colour and shape.
    for rec in pretrain:
        caption = rec["conversations"][1]["value"]
        words = caption.rstrip(".").split()
        assert words[0] == "a" and words[1] in COLORS and words[2] in SHAPES, caption
    # SFT/test answers are single words from easy-vqa's answer set.
    answers = set(summary["answers"])
    assert {r["conversations"][1]["value"] for r in sft + test} <= answers
    assert 0 < summary["majority_baseline_accuracy"] < 1

    # Real photos: a dozen-ish, reasonably large, and not flat images.
    photos = sorted((out / "eval_images").iterdir())
    assert len(photos) >= 8
    for path in photos:
        with Image.open(path) as img:
            assert min(img.size) >= 100, path.name
            assert np.asarray(img.convert("L")).std() > 10, path.name

    # Idempotent: a second, smaller run leaves folders matching the JSON.
    build(str(out), max_train_images=5, max_test_questions=5, seed=0, with_eval_images=False)
    assert len(list((demo / "images/train").glob("train_*.png"))) == 5
    _check_v1_records(json.loads((demo / "pretrain.json").read_text()), demo / "images/train")


def test_stand_in_clip_loads(tmp_path: Path) -> None:
    from transformers import CLIPVisionModel

    out = build_stand_in_clip(
        str(tmp_path / "clip"), layers=1, seed=0, hidden_size=64, intermediate_size=128, num_attention_heads=4
    )
    folder = Path(out)
    assert (folder / "model.safetensors").exists()
    assert "not" in (folder / "STAND_IN.md").read_text().lower()
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor"
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]

    model = CLIPVisionModel.from_pretrained(out).eval()
    with torch.no_grad():
        hidden = model(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert hidden.shape == (1, 50, 64)

    # Same seed -> same weights.
    again = build_stand_in_clip(
        str(tmp_path / "clip2"), layers=1, seed=0, hidden_size=64, intermediate_size=128, num_attention_heads=4
    )
    assert (Path(again) / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
