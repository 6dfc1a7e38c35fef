"""minimind-3v records -> token ids and labels, as upstream's VLMDataset (dataset/lm_dataset.py at 9595617) makes
them: the turns in order (an optional first system turn, then user and assistant turns), each `<image>` of a
non-system turn replaced by 64 x `<|image_pad|>`, the 3v tokenizer's chat template (Qwen3-style, an assistant turn
without reasoning gets an empty `<think>\\n\\n</think>\\n\\n` block), and labels: -100 everywhere except, after each
`<|im_start|>assistant\\n`, the tokens up to and including the next `<|im_end|>\\n` (to the end if there is none).

Two upstream choices are random per fetch; here they are fixed per record so that a run is reproducible and a
resume continues the same data: the empty think blocks are deleted from a record's text unless a hash of its id
falls in the kept fraction (upstream deletes them with probability 0.8), and no random system prompt is added
(upstream prepends one of ten with probability 0.2; their texts are not part of the reference facts).
"""
from __future__ import annotations

import hashlib
from typing import Any

from checkpoints.tokenizer import encode
from model.config import V3_IMAGE_SPECIAL_TOKEN, V3_IMAGE_TOKENS

from .records import ASSISTANT_ROLES, HUMAN_ROLES, IMAGE_TAG, BrokenLine

IGNORE_INDEX = -100
EMPTY_THINK = "<think>\n\n</think>\n\n"
THINK_KEPT_FRACTION = 0.2  # upstream keeps the empty think block of a fetched row with probability 0.2
ASSISTANT_OPENING = "<|im_start|>assistant\n"  # upstream's bos_id
TURN_END = "<|im_end|>\n"  # upstream's eos_id


def keeps_empty_think(record_id: str) -> bool:
    """Whether this record's text keeps its empty think blocks: a fixed choice per record id, true for about
    THINK_KEPT_FRACTION of the ids."""
    digest = hashlib.blake2b(record_id.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64 < THINK_KEPT_FRACTION


def v3_messages(record: Any) -> list[dict[str, str]]:
    """A record's turns as 3v chat messages (every turn kept, a system turn allowed first); ValueError with the
    reason when the record cannot be one. `<image>` tags are left in place."""
    if isinstance(record, BrokenLine):
        raise ValueError(record.error)
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError("no conversations")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"malformed turn {i}")
        role = turn.get("role", turn.get("from"))
        role = "user" if role in HUMAN_ROLES else "assistant" if role in ASSISTANT_ROLES else role
        if role not in ("user", "assistant", "system") or (role == "system" and i > 0):
            raise ValueError(f"wrong role: turn {i} is {role!r}")
        if role == "system" and turn.get("functions"):
            raise ValueError("tool definitions ('functions') are not supported")
        text = turn.get("content", turn.get("value"))
        if not isinstance(text, str):
            raise ValueError(f"turn {i} has no text content")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"invalid text: turn {i} holds {e.reason} at character {e.start}") from None
        messages.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise ValueError("no answer: no assistant turn with text")
    return messages


def v3_prompt_text(tokenizer, messages: list[dict[str, str]], keep_empty_think: bool) -> str:
    """The templated text of the conversation, image tags of non-system turns replaced by their runs."""
    run = V3_IMAGE_SPECIAL_TOKEN * V3_IMAGE_TOKENS
    with_runs = [m if m["role"] == "system" else {**m, "content": m["content"].replace(IMAGE_TAG, run)}
                 for m in messages]
    text = tokenizer.apply_chat_template(with_runs, tokenize=False, add_generation_prompt=False)
    return text if keep_empty_think else text.replace(EMPTY_THINK, "")


def v3_labels(ids: list[int], opening: list[int], end: list[int]) -> list[int]:
    """Upstream's labels: the ids after each `opening` up to and including the next `end`, -100 elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    i, n, m = 0, len(opening), len(end)
    while i < len(ids):
        if ids[i:i + n] != opening:
            i += 1
            continue
        start = j = i + n
        while j < len(ids) and ids[j:j + m] != end:
            j += 1
        stop = min(j + m, len(ids))
        labels[start:stop] = ids[start:stop]
        i = stop
    return labels


def tokenize_v3(tokenizer, messages: list[dict[str, str]], keep_empty_think: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a 3v conversation, uncut and unpadded (upstream then cuts both to max_length)."""
    ids = encode(tokenizer, v3_prompt_text(tokenizer, messages, keep_empty_think))
    return ids, v3_labels(ids, encode(tokenizer, ASSISTANT_OPENING), encode(tokenizer, TURN_END))


def image_runs(ids: list[int], marker: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `marker` in ids."""
    runs: list[tuple[int, int]] = []
    for pos, token in enumerate(ids):
        if token != marker:
            continue
        if runs and runs[-1][0] + runs[-1][1] == pos:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pos, 1))
    return runs


def fit_v3(ids: list[int], labels: list[int], marker: int, n_tags: int,
           max_seq_len: int) -> tuple[list[int], list[int], int]:
    """(ids, labels, images used) cut to max_seq_len; ValueError when text forged or joined image runs, or when no
    answer token is left. A run cut short keeps its first positions (the model takes the image's first rows);
    the images whose runs were cut away are not used."""
    runs = image_runs(ids, marker)
    if len(runs) != n_tags or any(length != V3_IMAGE_TOKENS for _, length in runs):
        raise ValueError(f"forged image placeholder: {len(runs)} run(s) of {V3_IMAGE_SPECIAL_TOKEN} for {n_tags} "
                         f"<image> tag(s) (text outside <image> holds the token, or two images touch)")
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise ValueError(f"too long: no answer token left within max_seq_len {max_seq_len}")
    return ids, labels, sum(start < len(ids) for start, _ in runs)
