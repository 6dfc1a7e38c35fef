"""MiniMindVProcessor: the tokenizer, the v1 chat template and the image preprocessing in one object.

    processor = AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)
    inputs = processor(images=[image], text=[{"role": "user", "content": "What is in the picture?"}],
                       return_tensors="pt")
    new_ids = model.generate(**inputs, max_new_tokens=64)

This file is copied into an exported model directory (export_model.py) and registered there for AutoProcessor
(processor_config.json); like hf_model.py it imports only relatively. Images go through exactly the native
pipeline: model.vision.to_rgb (EXIF rotation, transparency over white) and ImagePreprocessor (224x224
bicubic, CLIP mean/std), with the size, mean and std of the directory's preprocessor_config.json. A minimind-3v
export (processor_config.json `generation: "3v"`) uses its tokenizer's own chat template, 64 x `<|image_pad|>` per
image and SiglipPreprocessor (alpha dropped, not composited, as upstream; 256x256, mean = std = 0.5).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from model.config import IMAGE_SPECIAL_TOKEN, V3_IMAGE_SPECIAL_TOKEN, V3_IMAGE_TOKENS
from model.vision import ImagePreprocessor, SiglipPreprocessor, to_rgb
from model.vlm import pad_rows

# What marks an image in a prompt or message: v1's data tag, or the placeholder itself.
IMAGE_TAG = "<image>"
PROCESSOR_CONFIG = "processor_config.json"
ROLES = ("system", "user", "assistant")  # what the v1 chat template renders; it drops any other role silently
Messages = list[dict[str, Any]]
ImageInput = Union[Image.Image, np.ndarray, torch.Tensor]
ACCEPTED_IMAGES = ("PIL images, HxWxC (C = 1, 3 or 4) or HxW numpy arrays, or CxHxW or HxWxC tensors; "
                   "uint8 values, or floats in [0, 1]")


class MiniMindVProcessor:
    """Turns images and a prompt (or chat messages) into input_ids, attention_mask and pixel_values."""

    def __init__(self, tokenizer, image_preprocessor: Optional[ImagePreprocessor] = None,
                 padding_side: str = "left", generation: str = "v1"):
        if generation not in ("v1", "3v"):
            raise ValueError(f"generation must be 'v1' or '3v', got {generation!r}")
        self.tokenizer = tokenizer
        self.generation = generation
        # the prompt text of one image: v1's 50-character span, minimind-3v's run of 64 <|image_pad|>
        self.placeholder = V3_IMAGE_SPECIAL_TOKEN * V3_IMAGE_TOKENS if generation == "3v" else IMAGE_SPECIAL_TOKEN
        default = SiglipPreprocessor(256, (0.5,) * 3, (0.5,) * 3) if generation == "3v" else ImagePreprocessor()
        self.image_preprocessor = image_preprocessor or default
        self.padding_side = padding_side  # left: generation appends at the end of every row

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """Called by AutoProcessor on remote code; save_pretrained writes the auto_map entry itself."""
        cls._auto_class = auto_class

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **kwargs: Any) -> "MiniMindVProcessor":
        """The tokenizer (with its chat template) and the preprocessing settings of an exported directory."""
        from transformers import PreTrainedTokenizerFast

        path = str(path)
        if not os.path.isdir(path):  # a Hub repo id: fetch the small files
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, allow_patterns=["*.json", "*.jinja", "*.txt"])
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"{path}: no tokenizer.json; export the model with export_model.py")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        saved: dict[str, Any] = {}
        config_file = os.path.join(path, PROCESSOR_CONFIG)
        if os.path.exists(config_file):
            saved = json.loads(open(config_file, encoding="utf-8").read())
        generation = saved.get("generation", "v1")
        preprocessor = (SiglipPreprocessor if generation == "3v" else ImagePreprocessor).from_dir(path)
        return cls(tokenizer, preprocessor, saved.get("padding_side", "left"), generation)

    def save_pretrained(self, path: Union[str, os.PathLike], **kwargs: Any) -> None:
        """The tokenizer and processor_config.json (registering this class for AutoProcessor); the image
        settings live in preprocessor_config.json, which export_model.py writes."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        config = {"processor_class": type(self).__name__, "padding_side": self.padding_side,
                  "auto_map": {"AutoProcessor": f"processing_minimind_v.{type(self).__name__}"}}
        if self.generation != "v1":  # v1's file stays as it was
            config["generation"] = self.generation
        with open(os.path.join(path, PROCESSOR_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2) + "\n")

    # ------------------------------------------------------------------ text
    def apply_chat_template(self, messages: Messages, has_image: bool = False, n_images: Optional[int] = None,
                            **kwargs: Any) -> str:
        """The v1 chat template, ending with the assistant header. Message content is a string, or a list of
        {"type": "text", "text": ...} and {"type": "image"} parts; roles are system, user and assistant. With
        n_images (or has_image: one) and no image marker in any message, that many placeholders, each on its own
        line, lead the first user message (as the native chat does)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        rendered = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
            if message["role"] not in ROLES:
                raise ValueError(f"message {i}: role {message['role']!r} is not supported (use {', '.join(ROLES)})")
            rendered.append({"role": message["role"], "content": _content_text(message.get("content"), i)})
        n_images = int(has_image) if n_images is None else n_images
        if n_images and not any(_count_images(m["content"], self.placeholder) for m in rendered):
            first_user = next((m for m in rendered if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError("an image was given but no message has role 'user' to hold it")
            first_user["content"] = f"{self.placeholder}\n" * n_images + first_user["content"]
        return self.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)

    def _row_texts(self, rows: list[Union[str, Messages]], n_images: int,
                   per_row: Optional[list[int]]) -> list[str]:
        """Each row as text with image markers. A message list without markers gets its images' placeholders
        (per_row[i] of them): all images when it is the only row, one each when every row is a message list
        and there are as many images as rows, or as the nested images list says. Prompts are used as written."""
        texts = [row if isinstance(row, str) else self.apply_chat_template(row) for row in rows]
        markers = [_count_images(t, self.placeholder) for t in texts]
        if per_row is None and n_images and not any(markers):
            if len(rows) == 1:
                per_row = [n_images]
            elif n_images == len(rows) and not any(isinstance(r, str) for r in rows):
                per_row = [1] * len(rows)
        if per_row is not None:
            texts = [self.apply_chat_template(row, n_images=k) if k and not m and not isinstance(row, str) else t
                     for row, k, m, t in zip(rows, per_row, markers, texts)]
        texts = [t.replace(IMAGE_TAG, self.placeholder) for t in texts]
        counts = [t.count(self.placeholder) for t in texts]
        if per_row is not None:
            for i, (found, given) in enumerate(zip(counts, per_row)):
                if found != given:
                    raise ValueError(f"text row {i} holds {found} image marker(s) ({IMAGE_TAG}) but {given} "
                                     f"image(s) were given for it")
        elif sum(counts) != n_images:
            raise ValueError(f"the text holds {sum(counts)} image marker(s) ({IMAGE_TAG}) but {n_images} image(s) "
                             f"were given")
        return texts

    # ------------------------------------------------------------------ call
    def __call__(self, images: Optional[Union[ImageInput, Sequence[ImageInput], Sequence[Sequence[ImageInput]]]] = None,
                 text: Optional[Union[str, Messages, Sequence[Union[str, Messages]]]] = None,
                 return_tensors: Optional[str] = "pt", padding_side: Optional[str] = None,
                 **kwargs: Any):
        """input_ids and attention_mask (padded on the padding side), plus pixel_values [N, 3, H, W] when
        images are given: one image per image marker, in row order.

        text: a prompt string (used as written; `<image>` marks the image), a list of chat messages (rendered
        with the chat template), or a list of either for a batch. images: one image or a list of them (see
        ACCEPTED_IMAGES), or for a batch a list with one list of images per row. A batch of message lists
        gets its placeholders as a single conversation does (_row_texts).
        """
        from transformers import BatchFeature

        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if text is None:
            raise ValueError("text is required: a prompt string or a list of chat messages")
        rows = _as_batch(text)
        flat, per_row = _flatten_images(images, len(rows))
        texts = self._row_texts(rows, len(flat), per_row)
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"text row {i} gives no tokens: an empty prompt, or messages with nothing to "
                                 f"render")
        input_ids, attention_mask = pad_rows(ids, self._pad_id(), padding_side or self.padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if flat:
            data["pixel_values"] = torch.stack([self._pixels(as_pil_image(im, f"images[{i}]"))
                                                for i, im in enumerate(flat)])
        return BatchFeature(data, tensor_type=return_tensors)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """v1 composites transparency over white (to_rgb); 3v's SiglipPreprocessor drops the alpha channel
        itself, as upstream's processor does."""
        return self.image_preprocessor(image if self.generation == "3v" else to_rgb(image))

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def as_pil_image(image: Any, where: str = "image") -> Image.Image:
    """A PIL image from any of ACCEPTED_IMAGES; a TypeError naming `where` and the accepted types otherwise.
    A tensor is CxHxW when its first dimension is 1, 3 or 4 and its last is not (torchvision's layout)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4) and tensor.shape[-1] not in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        array = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"{where}: a {type(image).__name__} is not an image; pass {ACCEPTED_IMAGES}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or 0 in array.shape:
        raise TypeError(f"{where}: an array of shape {tuple(array.shape)} is not an image; pass {ACCEPTED_IMAGES}")
    if np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1:
        array = (array * 255).round().astype(np.uint8)
    if array.dtype != np.uint8:
        raise TypeError(f"{where}: {array.dtype} values are not pixels; pass {ACCEPTED_IMAGES}")
    return Image.fromarray(np.ascontiguousarray(array))


def _is_single_image(item: Any) -> bool:
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim in (2, 3)  # a 4-D array or tensor is a batch of images
    return isinstance(item, Image.Image)


def _flatten_images(images: Any, n_rows: int) -> tuple[list[Any], Optional[list[int]]]:
    """(the images in order, how many belong to each text row when given per row as a list of lists)."""
    if images is None:
        return [], None
    if _is_single_image(images):
        return [images], None
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images), None
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: a {type(images).__name__} is not an image or a list of images; pass "
                        f"{ACCEPTED_IMAGES}")
    if images and all(isinstance(item, (list, tuple)) or item is None for item in images):
        if len(images) != n_rows:
            raise ValueError(f"images holds {len(images)} per-row lists but the text has {n_rows} row(s)")
        per_row = [list(item or []) for item in images]
        return [im for row in per_row for im in row], [len(row) for row in per_row]
    return list(images), None


def _as_batch(text: Any) -> list[Union[str, Messages]]:
    """A batch of rows: a string or one message list is a batch of one."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(m, dict) for m in text):
        return [list(text)]
    if isinstance(text, (list, tuple)) and text:
        return list(text)
    raise ValueError("text must be a prompt string, a list of chat messages, or a non-empty list of either")


def _content_text(content: Any, i: int) -> str:
    """A message's content as text; an {"type": "image"} part becomes the image tag."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(str(part.get("text", "")))
            elif kind == "image":
                parts.append(IMAGE_TAG)
            else:
                raise ValueError(f"message {i}: content part {part!r} is neither text nor image")
        return "\n".join(parts)
    raise ValueError(f"message {i}: content must be a string or a list of parts")


def _count_images(text: str, placeholder: str = IMAGE_SPECIAL_TOKEN) -> int:
    return text.count(IMAGE_TAG) + text.count(placeholder)

