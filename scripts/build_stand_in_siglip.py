"""Build a randomly initialised, SigLIP2-base-p32-256-shaped vision tower (minimind-3v's tower shape).

minimind-3v's tower (``jingyaogong/siglip2-base-p32-256-ve``) cannot be downloaded in offline environments, but
the rest of the 3v pipeline only needs something with its interface: a Hugging Face ``SiglipVisionModel`` that
maps a 256x256 image to 64 tokens (8x8 patches, no CLS) of width 768, plus a ``SiglipImageProcessor`` config
(bicubic resize to 256x256, mean = std = 0.5). This script writes exactly that, with *random, untrained* weights,
so that 3v training and chat can be exercised end to end.

It is NOT the SigLIP2 tower: its features carry no learned visual semantics. It is marked with ``STAND_IN.md``
(as scripts/build_stand_in_clip.py marks the CLIP stand-in), so every entry point says so loudly. The default
output path differs from the real tower's (``model/siglip2-base-p32-256-ve``) so the two are never confused.

Usage::

    python scripts/build_stand_in_siglip.py [--out DIR] [--layers 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from scripts.build_stand_in_clip import save_stand_in  # noqa: E402

DEFAULT_OUT = "model/clip_model/stand_in_siglip2_base_p32_256"
IMAGE_SIZE = 256
BICUBIC = 3  # PIL.Image.BICUBIC


def preprocessor_config(image_size: int = IMAGE_SIZE) -> dict:
    """The ``preprocessor_config.json`` contents of SigLIP's image processor at this size (HF's defaults)."""
    return {"image_processor_type": "SiglipImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": BICUBIC, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]}


STAND_IN_NOTE = """# Stand-in SigLIP2 vision tower (random, untrained)

This folder holds a **randomly initialised** vision transformer with the shape of minimind-3v's SigLIP2 tower
(`siglip2-base-p32-256-ve`): {layers} transformer layer(s), hidden size {hidden}, {heads} heads, patch 32,
image 256 -> 64 tokens, written by `scripts/build_stand_in_siglip.py` (seed {seed}).

It is **not** the SigLIP2 tower and has never been trained: its image features carry no learned visual meaning.
It exists only so that minimind-3v's pipeline can run where the real weights cannot be downloaded. Results
obtained with it say nothing about what the real model can do.

For the real tower run `python scripts/download.py --what clip --generation 3v`, which writes
`model/siglip2-base-p32-256-ve`.
"""


def build_stand_in_siglip(out_dir: str = DEFAULT_OUT, layers: int = 1, seed: int = 0, hidden_size: int = 768,
                          intermediate_size: int = 3072, num_attention_heads: int = 12) -> str:
    """Write a random ``SiglipVisionModel`` (base, patch 32, 256 px by default) to ``out_dir``; the size overrides
    let tests build tiny towers. Returns ``out_dir`` as a string."""
    config = SiglipVisionConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                num_attention_heads=num_attention_heads, num_hidden_layers=layers,
                                image_size=IMAGE_SIZE, patch_size=32, vision_use_head=False)
    torch.manual_seed(seed)  # same seed -> the same weights
    model = SiglipVisionModel(config).eval()
    note = STAND_IN_NOTE.format(layers=layers, hidden=hidden_size, heads=num_attention_heads, seed=seed)
    return save_stand_in(model, out_dir, preprocessor_config(), note)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Write a random, untrained SigLIP2-shaped vision tower (3v).")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--layers", type=int, default=1, help="transformer layers (the real tower has 12)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    out = build_stand_in_siglip(args.out, layers=args.layers, seed=args.seed)
    print(f"[stand-in] random, untrained SigLIP2-shaped vision tower ({args.layers} layers) written to {out} "
          f"({time.time() - start:.1f}s). This is NOT the SigLIP2 tower.")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
