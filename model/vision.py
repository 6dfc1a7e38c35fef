"""The frozen CLIP vision tower: loading it, preprocessing a decoded image, and feature extraction.

Features are the encoder output before the post-layernorm: CLS + 49 patches = 50 x 768 for ViT-B/32,
taken with a forward hook on the encoder (as v1 does).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

DEFAULT_CLIP_PATH = "model/clip_model/clip-vit-base-patch32"
STAND_IN_CLIP_PATH = "model/clip_model/stand_in_clip_vit_b32"
V3_TOWER_PATH = "model/siglip2-base-p32-256-ve"  # minimind-3v's SigLIP2 tower (scripts/download.py --generation 3v)
IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MissingVisionEncoderError(FileNotFoundError):
    pass


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (transparent areas become white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        if img.mode.startswith("I;16") or hi > 255:
            scale = 65535.0
        elif img.mode == "F" and hi <= 1.0:
            scale = 1.0  # float images usually hold [0, 1]: scaling them by 255 would make them black
        else:
            scale = 255.0
        img = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


class ImagePreprocessor:
    """v1 preprocessing: resize to 224x224 (bicubic), scale to [0, 1], normalise with the CLIP mean/std.

    mean/std/size are read from the encoder directory's preprocessor_config.json when present.
    """

    def __init__(self, size: int = IMAGE_SIZE, mean=CLIP_MEAN, std=CLIP_STD):
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "ImagePreprocessor":
        cfg_file = Path(path) / "preprocessor_config.json"
        if not cfg_file.exists():
            return cls()
        cfg = json.loads(cfg_file.read_text())
        size = cfg.get("crop_size", cfg.get("size", IMAGE_SIZE))
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge", IMAGE_SIZE))
        return cls(size, cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD))

    def fingerprint(self) -> str:
        return f"resize{self.size}-bicubic-mean{self.mean}-std{self.std}"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> [3, size, size] float32."""
        img = image.resize((self.size, self.size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class VisionEncoder(nn.Module):
    """A frozen CLIP vision tower returning pre-post-layernorm features [B, 50, hidden]."""

    kind = "clip"  # the tower family: v1 checkpoints go with CLIP, 3v ones with SigLIP (checkpoints.vision_pairing)
    tokens = 50

    def __init__(self, clip_vision: nn.Module, preprocess: ImagePreprocessor, fingerprint: str,
                 path: Optional[str] = None):
        super().__init__()
        self.clip = clip_vision
        self.preprocess = preprocess
        self.fingerprint = fingerprint  # identifies weights + preprocessing (keys the feature cache)
        self.path = path  # the directory it was loaded from (None when built in memory)
        self.clip.eval().requires_grad_(False)
        self.hidden_size = clip_vision.config.hidden_size
        self.train(False)

    def train(self, mode: bool = True) -> "VisionEncoder":
        return super().train(False)  # always frozen and in eval mode

    @property
    def tower(self) -> nn.Module:
        """The module holding embeddings/encoder/post_layernorm (nested under .vision_model in older transformers)."""
        return getattr(self.clip, "vision_model", self.clip)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 224, 224] -> features [B, 50, hidden] (fp32, before post-layernorm)."""
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = self.tower.encoder.register_forward_hook(hook)
        try:
            self.clip(pixel_values=pixel_values.to(self.device, torch.float32))
        finally:
            handle.remove()
        return captured[0].float()

    def encode_images(self, images: Iterable[Image.Image], batch_size: int = 64) -> torch.Tensor:
        pixels = [self.preprocess(img) for img in images]
        out = [self.encode_pixels(torch.stack(pixels[i:i + batch_size]))
               for i in range(0, len(pixels), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.tokens, self.hidden_size)


class SiglipEncoder(VisionEncoder):
    """3v's frozen SigLIP2 tower (base, patch 32, 256x256): `last_hidden_state`, i.e. after the post-layernorm,
    [B, 64, hidden]; no CLS token, and the pooling head is not used."""

    kind = "siglip"
    tokens = 64

    @property
    def tower(self) -> nn.Module:
        return self.clip

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, 256, 256] -> features [B, 64, hidden] (fp32, after post-layernorm)."""
        return self.clip(pixel_values=pixel_values.to(self.device, torch.float32)).last_hidden_state.float()


class SiglipPreprocessor(ImagePreprocessor):
    """3v preprocessing: RGBA/LA lose their alpha channel (no compositing, as 3v does), then the processor
    config's resize (bicubic, no crop), rescale and normalise (mean = std = 0.5 for SigLIP)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB") if image.mode in ("RGBA", "LA") else to_rgb(image)
        return super().__call__(image)

    def fingerprint(self) -> str:
        return "siglip-" + super().fingerprint()


def tower_family(path: str) -> str:
    """'siglip' or 'clip': the model_type in a tower directory's config.json (never its Python files)."""
    try:
        model_type = str(json.loads((Path(path) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError, AttributeError):
        model_type = ""
    return "siglip" if model_type.startswith("siglip") else "clip"


def load_siglip_encoder(path: str, device: Union[str, torch.device] = "cpu") -> SiglipEncoder:
    """Load a local Hugging Face SigLIP/SigLIP2 vision tower (3v's), frozen, in float32."""
    from transformers import SiglipVisionModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tower = SiglipVisionModel.from_pretrained(path, dtype=torch.float32)
    preprocess = SiglipPreprocessor.from_dir(path)
    return SiglipEncoder(tower, preprocess, encoder_fingerprint(path, preprocess), path).to(device)


def missing_encoder_message(path: str) -> str:
    if os.path.normpath(path).endswith(os.path.normpath(V3_TOWER_PATH)):
        return (f"SigLIP2 vision tower not found at '{path}' (a minimind-3v checkpoint needs it): `python "
                f"scripts/download.py --generation 3v --what clip` puts it there; for offline tests, build the "
                f"untrained stand-in with `python scripts/build_stand_in_siglip.py` and pass its folder as --clip_path")
    return (f"CLIP vision encoder not found at '{path}'. Put a Hugging Face CLIP ViT-B/32 directory there: "
            f"`python scripts/download.py --what clip` (or `git clone https://huggingface.co/openai/"
            f"clip-vit-base-patch32 {DEFAULT_CLIP_PATH}`); for offline tests, build the untrained stand-in with "
            f"`python scripts/build_stand_in_clip.py` and pass --clip_path {STAND_IN_CLIP_PATH}")


def load_vision_encoder(path: str = DEFAULT_CLIP_PATH, device: Union[str, torch.device] = "cpu") -> VisionEncoder:
    """Load the vision tower of a local Hugging Face CLIP directory (full CLIP or vision-only), frozen."""
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise MissingVisionEncoderError(missing_encoder_message(path))
    if tower_family(path) == "siglip":
        return load_siglip_encoder(path, device)
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIP directory also holds the text tower, which we skip on purpose
    hf_logging.disable_progress_bar()
    try:
        clip = CLIPVisionModel.from_pretrained(path, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    preprocess = ImagePreprocessor.from_dir(path)
    return VisionEncoder(clip, preprocess, encoder_fingerprint(path, preprocess), path).to(device)


def encoder_fingerprint(path: str, preprocess: ImagePreprocessor) -> str:
    """A short hash of the encoder's weight files and config plus the preprocessing."""
    h = hashlib.sha256(preprocess.fingerprint().encode())
    for name in sorted(os.listdir(path)):
        if name.endswith((".json", ".safetensors", ".bin")) and name != "preprocessor_config.json":
            st = os.stat(os.path.join(path, name))
            h.update(f"{name}:{st.st_size}".encode())
            with open(os.path.join(path, name), "rb") as f:  # head and tail: fast even for 600 MB files
                h.update(f.read(1 << 20))
                f.seek(max(0, st.st_size - (1 << 20)))
                h.update(f.read())
    return h.hexdigest()[:16]
