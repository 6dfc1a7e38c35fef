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

from model.decoder import KVCache
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
    return _decoded(out, eos, tokenizer)


@torch.no_grad()
def greedy_answers_sharing_prefix(model: MiniMindVLM, prefix: Sequence[int], suffixes: Sequence[Sequence[int]],
                                  image_of: Sequence[int], image_features: torch.Tensor, tokenizer,
                                  max_new_tokens: int, device: torch.device) -> list[str]:
    """greedy_answers of the prompts prefix + suffixes[i], where prefix holds the whole image placeholder and the
    i-th prompt is about image image_of[i] (features image_features[image_of[i]]). The prefix runs once per image
    and each question continues a copy of its keys and values, instead of every question running it again: the
    same answers, up to float rounding, for about a third of the prefill on the demo's held-out questions."""
    if not suffixes:
        return []
    eos = tokenizer.eos_token_id
    suffix_ids, suffix_mask = pad_rows(suffixes, eos, "left", device=device)
    n_images, width = image_features.shape[0], len(prefix)
    cache = KVCache(model.config, n_images, width + suffix_ids.shape[1] + max_new_tokens, device,
                    next(model.parameters()).dtype)
    model(torch.tensor([list(prefix)], device=device).expand(n_images, width), image_features, cache=cache,
          last_only=True)
    rows = cache.select_rows(torch.tensor(list(image_of), device=device))
    mask = torch.cat([suffix_mask.new_ones(len(suffixes), width), suffix_mask], dim=1)
    out = model.generate(suffix_ids, None, max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos,
                         attention_mask=mask, cache=rows)
    return _decoded(out, eos, tokenizer)


def _decoded(out: torch.Tensor, eos: int, tokenizer) -> list[str]:
    """Each row of new token ids as text, up to its first eos (special tokens dropped)."""
    answers = []
    for row in out.tolist():
        if eos in row:
            row = row[:row.index(eos)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers
