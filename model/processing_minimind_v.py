"""MiniMindVProcessor: the tokenizer, the v1 chat template and the image preprocessing in one object.

    processor = AutoProcessor.from_pretrained(export_dir, trust_remote_code=True)
    inputs = processor(images=[image], text=[{"role": "user", "content": "What is in the picture?"}],
                       return_tensors="pt")
    new_ids = model.generate(**inputs, max_new_tokens=64)

This file is copied into an exported model directory (export_model.py) and registered there for AutoProcessor
(processor_config.json); like hf_model.py it imports only relatively. Images go through exactly the native
pipeline: model.vision.to_rgb (EXIF rotation, transparency over white) and ImagePreprocessor (224x224
bicubic, CLIP mean/std), with the size, mean and std of the directory's preprocessor_config.json.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from .config import IMAGE_SPECIAL_TOKEN
from .vision import ImagePreprocessor, to_rgb
from .vlm import pad_rows

# What marks an image in a prompt or message: v1's data tag, or the placeholder itself.
IMAGE_TAG = "<image>"
PROCESSOR_CONFIG = "processor_config.json"
Messages = list[dict[str, Any]]


class MiniMindVProcessor:
    """Turns images and a prompt (or chat messages) into input_ids, attention_mask and pixel_values."""

    def __init__(self, tokenizer, image_preprocessor: Optional[ImagePreprocessor] = None,
                 padding_side: str = "left"):
        self.tokenizer = tokenizer
        self.image_preprocessor = image_preprocessor or ImagePreprocessor()
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
        padding_side = "left"
        config_file = os.path.join(path, PROCESSOR_CONFIG)
        if os.path.exists(config_file):
            padding_side = json.loads(open(config_file, encoding="utf-8").read()).get("padding_side", "left")
        return cls(tokenizer, ImagePreprocessor.from_dir(path), padding_side)

    def save_pretrained(self, path: Union[str, os.PathLike], **kwargs: Any) -> None:
        """The tokenizer and processor_config.json (registering this class for AutoProcessor); the image
        settings live in preprocessor_config.json, which export_model.py writes."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        config = {"processor_class": type(self).__name__, "padding_side": self.padding_side,
                  "auto_map": {"AutoProcessor": f"processing_minimind_v.{type(self).__name__}"}}
        with open(os.path.join(path, PROCESSOR_CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2) + "\n")

    # ------------------------------------------------------------------ text
    def apply_chat_template(self, messages: Messages, has_image: bool = False, **kwargs: Any) -> str:
        """The v1 chat template, ending with the assistant header. Message content is a string, or a list of
        {"type": "text", "text": ...} and {"type": "image"} parts. With has_image and no image marker in any
        message, the placeholder leads the first user message (as the native chat does)."""
        rendered = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
            rendered.append({"role": message["role"], "content": _content_text(message.get("content"), i)})
        if has_image and not any(_count_images(m["content"]) for m in rendered):
            first_user = next((m for m in rendered if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError("an image was given but no message has role 'user' to hold it")
            first_user["content"] = f"{IMAGE_SPECIAL_TOKEN}\n{first_user['content']}"
        return self.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)

    def _row_text(self, row: Union[str, Messages], n_images: Optional[int]) -> str:
        if isinstance(row, str):  # a prompt, used as written
            return row
        return self.apply_chat_template(row, has_image=bool(n_images))

    # ------------------------------------------------------------------ call
    def __call__(self, images: Optional[Union[Image.Image, Sequence[Image.Image]]] = None,
                 text: Optional[Union[str, Messages, Sequence[Union[str, Messages]]]] = None,
                 return_tensors: Optional[str] = "pt", padding_side: Optional[str] = None,
                 **kwargs: Any):
        """input_ids and attention_mask (padded on the padding side), plus pixel_values [N, 3, H, W] when
        images are given: one image per image marker, in row order.

        text: a prompt string (used as written; `<image>` marks the image), a list of chat messages (rendered
        with the chat template), or a list of either for a batch.
        """
        from transformers import BatchFeature

        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt', got {return_tensors!r}")
        if text is None:
            raise ValueError("text is required: a prompt string or a list of chat messages")
        images = [images] if isinstance(images, Image.Image) else list(images or [])
        rows = _as_batch(text)
        if len(rows) == 1 and not isinstance(rows[0], str):
            texts = [self._row_text(rows[0], len(images))]
        else:
            texts = [self._row_text(r, None) for r in rows]
        texts = [t.replace(IMAGE_TAG, IMAGE_SPECIAL_TOKEN) for t in texts]
        n_markers = sum(t.count(IMAGE_SPECIAL_TOKEN) for t in texts)
        if n_markers != len(images):
            raise ValueError(f"the text holds {n_markers} image marker(s) ({IMAGE_TAG}) but {len(images)} image(s) "
                             f"were given")
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        input_ids, attention_mask = pad_rows(ids, self._pad_id(), padding_side or self.padding_side)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            data["pixel_values"] = torch.stack([self.image_preprocessor(to_rgb(im)) for im in images])
        return BatchFeature(data, tensor_type=return_tensors)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


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


def _count_images(text: str) -> int:
    return text.count(IMAGE_TAG) + text.count(IMAGE_SPECIAL_TOKEN)

