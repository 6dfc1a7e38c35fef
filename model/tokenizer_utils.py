"""Tokenizer loading and the facts the model needs from it (image placeholder ids, assistant marker)."""
from __future__ import annotations

import os

from .LMConfig import IMAGE_SPECIAL_TOKEN, IMAGE_TOKENS

DEFAULT_TOKENIZER_PATH = "model/minimind_tokenizer"


def load_tokenizer(path: str = DEFAULT_TOKENIZER_PATH):
    """Load a local tokenizer directory; a missing one is an error that says how to get it."""
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"tokenizer not found at '{path}': use the project's tokenizer (model/minimind_tokenizer, "
            f"rebuilt by `python scripts/train_tokenizer.py`) or fetch the official one with "
            f"`python scripts/download.py --what tokenizer`")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text with no BOS/EOS added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def image_token_ids(tokenizer, placeholder: str = IMAGE_SPECIAL_TOKEN) -> list[int]:
    """The ids of the image placeholder: exactly one per visual token, or an error."""
    ids = encode(tokenizer, placeholder)
    if len(ids) != IMAGE_TOKENS:
        raise ValueError(f"the tokenizer splits the image placeholder into {len(ids)} tokens, not "
                         f"{IMAGE_TOKENS}: it merges '<' or '>' and cannot be used for images")
    return ids


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat template as text: <s>user\\n{q}</s>\\n<s>assistant\\n{a}</s>\\n ..."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
