"""Shared fixtures: tiny configs, a tiny random CLIP saved in Hugging Face format, the project tokenizer."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(2)

from model.config import LMConfig  # noqa: E402
from checkpoints.tokenizer import image_token_ids, load_tokenizer, tokenizer_record  # noqa: E402

TOKENIZER_PATH = str(ROOT / "model" / "minimind_tokenizer")
# The sidecar record of a checkpoint trained with the project's tokenizer (save_checkpoint(..., tokenizer=...)).
PROJECT_TOKENIZER = tokenizer_record(TOKENIZER_PATH)
OFFICIAL_TOKENIZER_FIXTURE = str(ROOT / "tests" / "fixtures" / "v1_official_tokenizer")


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TOKENIZER_PATH)


def tiny_config(tokenizer=None, **overrides) -> LMConfig:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400, max_seq_len=160, vision_dim=64)
    if tokenizer is not None:
        fields["image_ids"] = image_token_ids(tokenizer)
    fields.update(overrides)
    return LMConfig(**fields)


def save_tiny_vlm(path: Path, tokenizer, seed: int = 0, **record):
    """A tiny random VLM (seeded) saved as training saves it, recording the project tokenizer; returns the model."""
    from checkpoints.checkpoint import save_checkpoint
    from model.vlm import MiniMindVLM

    torch.manual_seed(seed)
    model = MiniMindVLM(tiny_config(tokenizer))
    save_checkpoint(model, path, tokenizer=PROJECT_TOKENIZER, **record)
    return model


def build_tiny_clip(path: Path, hidden: int = 64, layers: int = 1) -> Path:
    """A randomly initialised CLIP (text + vision) at the ViT-B/32 geometry, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=224, patch_size=32),
        projection_dim=32,
    )
    CLIPModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer) -> Path:
    """A tiny random VLM saved the way training saves it (with its sidecar), one per test module."""
    path = tmp_path_factory.mktemp("ckpt") / "64_vlm_sft.pth"
    save_tiny_vlm(path, tokenizer)
    return path
