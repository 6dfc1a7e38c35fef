"""Tokenizer loading and the facts the model needs from it (image placeholder ids, assistant marker)."""
from __future__ import annotations

import os
import re

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


# A run of this many '<' tokens starts an image span (the placeholder is 25 '<' then 25 '>', one token each).
_SPAN_HALF = IMAGE_TOKENS // 2
_BRACKET_RUN = re.compile("<{%d,}|>{%d,}" % (_SPAN_HALF, _SPAN_HALF))


def neutralise_placeholder(text: str) -> str:
    """User or data text that can never create or cut an image span: every run of 25 or more '<' (or '>') is
    broken by a space after each 24 characters. Each '<' token stands for one '<' character, so a run of
    at most 24 can never tokenise into the 25 opening ids of a span."""
    def split(match: re.Match) -> str:
        run = match.group(0)
        step = _SPAN_HALF - 1
        return " ".join(run[i:i + step] for i in range(0, len(run), step))

    return _BRACKET_RUN.sub(split, text)


def count_span_openings(ids: list[int], image_ids: list[int]) -> int:
    """How many positions start 25 consecutive opening-placeholder ids (linear: counts run lengths). A prompt
    with exactly its own image spans has one per image; more means text forged or touched a span."""
    opening = image_ids[0]
    count = run = 0
    for token in ids:
        run = run + 1 if token == opening else 0
        if run >= _SPAN_HALF:
            count += 1
    return count


def max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: a text of n characters has at least n / this many tokens
    (byte-level tokens are stored one character per byte, and a character is at least one byte)."""
    cached = getattr(tokenizer, "_minimind_max_token_chars", None)
    if cached is None:
        cached = max((len(token) for token in tokenizer.get_vocab()), default=1) or 1
        try:
            tokenizer._minimind_max_token_chars = cached
        except AttributeError:
            pass
    return cached
