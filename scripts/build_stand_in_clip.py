"""Build a randomly initialised, CLIP ViT-B/32-shaped vision tower.

The real encoder (``openai/clip-vit-base-patch32``) cannot be downloaded in
offline environments, but the rest of MiniMind-V only needs something with the
same interface: a Hugging Face ``CLIPVisionModel`` that maps a 224x224 image to
50 tokens (1 CLS + 7x7 patches) of width 768, plus a ``CLIPImageProcessor``
config. This script writes exactly that, with *random, untrained* weights, so
the training/inference pipeline can be exercised end to end.

It is NOT OpenAI's CLIP: its features carry no learned visual semantics.
The default output path is deliberately different from the real model's
(``model/clip_model/clip-vit-base-patch32``) so the two are never confused.

Usage::

    python scripts/build_stand_in_clip.py [--out DIR] [--layers 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

DEFAULT_OUT = "model/clip_model/stand_in_clip_vit_b32"

# Standard OpenAI CLIP preprocessing (the values published with ViT-B/32).
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.BICUBIC, what CLIP was trained with


def preprocessor_config(image_size: int = 224) -> dict:
    """The ``preprocessor_config.json`` contents of a standard CLIP image processor."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_IMAGE_MEAN),
        "image_std": list(CLIP_IMAGE_STD),
    }


STAND_IN_NOTE = """# Stand-in CLIP vision tower (random, untrained)

This folder holds a **randomly initialised** vision transformer with the shape of
CLIP ViT-B/32's vision tower ({layers} transformer layer(s), hidden size {hidden},
{heads} heads, patch 32, image 224 -> 50 tokens), written by
`scripts/build_stand_in_clip.py` (seed {seed}).

It is **not** OpenAI's CLIP and has never been trained: its image features carry
no learned visual meaning. It exists only so that MiniMind-V's pipeline can run
where the real weights cannot be downloaded. Results obtained with it say
nothing about what the real model can do.

For the real encoder run `python scripts/download.py --what clip`, which writes
`model/clip_model/clip-vit-base-patch32`.
"""


def build_stand_in_clip(
    out_dir: str = DEFAULT_OUT,
    layers: int = 1,
    seed: int = 0,
    hidden_size: int = 768,
    intermediate_size: int = 3072,
    num_attention_heads: int = 12,
) -> str:
    """Write a random ``CLIPVisionModel`` (ViT-B/32 shapes by default) to ``out_dir``.

    The size overrides exist so tests can build tiny towers in milliseconds.
    Returns ``out_dir`` as a string.
    """
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_hidden_layers=layers,
        image_size=224,
        patch_size=32,
        projection_dim=512,
    )
    torch.manual_seed(seed)  # same seed -> byte-identical weights
    model = CLIPVisionModel(config).eval()
    note = STAND_IN_NOTE.format(layers=layers, hidden=hidden_size, heads=num_attention_heads, seed=seed)
    return save_stand_in(model, out_dir, preprocessor_config(config.image_size), note)


def save_stand_in(model: torch.nn.Module, out_dir: str, preprocessor: dict, note: str) -> str:
    """Write a stand-in tower: its weights (save_pretrained), its preprocessor_config.json, and the STAND_IN.md
    note by which every entry point recognises and names it (checkpoints.vision_pairing.is_stand_in)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    with open(out / "preprocessor_config.json", "w", encoding="utf-8") as f:
        json.dump(preprocessor, f, indent=2)
    (out / "STAND_IN.md").write_text(note, encoding="utf-8")
    return str(out)


def main(argv: list[str] | None = None) -> str:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Write a random, untrained CLIP ViT-B/32-shaped vision tower.")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--layers", type=int, default=1, help="transformer layers (real ViT-B/32 has 12)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    out = build_stand_in_clip(args.out, layers=args.layers, seed=args.seed)
    print(
        f"[stand-in] random, untrained CLIP ViT-B/32-shaped vision tower ({args.layers} layers) "
        f"written to {out} ({time.time() - start:.1f}s). This is NOT OpenAI's CLIP."
    )
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
