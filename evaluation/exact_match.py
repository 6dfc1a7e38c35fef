"""Greedy exact-match scoring, shared by validation while training and by the evaluation of a trained model.

`greedy_answers` decodes a batch of prompts greedily: the rows are left-padded and masked, which gives the same
tokens as decoding one prompt at a time. `normalise_answer` and `exact_match` say when an answer counts as right:
the same text after lower-casing, trimming surrounding space and trailing punctuation.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, ContextManager, Optional, Sequence

import torch

from model.vlm import MiniMindVLM, pad_rows

TRAILING_PUNCTUATION = re.compile(r"[\s.!?。！？]+$")


def normalise_answer(answer: str) -> str:
    """The form answers are compared in: lower case, no surrounding space, no trailing punctuation."""
    return TRAILING_PUNCTUATION.sub("", answer.strip().lower())


def exact_match(predicted: str, expected: str) -> bool:
    return normalise_answer(predicted) == normalise_answer(expected)


@torch.no_grad()
def greedy_answers(model: MiniMindVLM, prompts: Sequence[Sequence[int]], image_features: Optional[torch.Tensor],
                   tokenizer, max_new_tokens: int, device: torch.device,
                   autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> list[str]:
    """The greedy answer to each prompt, decoded to text (special tokens dropped), in the order given.

    `prompts` are token ids (image placeholders included); `image_features` holds the prompts' image features in
    the same order, as MiniMindVLM.generate takes them, or None for text-only prompts. Decoding stops at the
    tokenizer's eos token or after `max_new_tokens`; `autocast` wraps the decoding (training runs pass theirs)."""
    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    ids, mask = pad_rows(prompts, eos, "left", device=device)
    with autocast():
        out = model.generate(ids, image_features, max_new_tokens=max_new_tokens, temperature=0.0,
                             eos_token_id=eos, attention_mask=mask)
    answers = []
    for row in out.tolist():
        if eos in row:
            row = row[:row.index(eos)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers
