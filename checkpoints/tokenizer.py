"""Tokenizer loading, identity and resolution, and the facts the model needs from it (image placeholder ids).

A checkpoint is only meaningful with the vocabulary it was trained with, so every tool picks the tokenizer by
one rule (`resolve_tokenizer_path`) and checks it against the checkpoint's record (`check_tokenizer`):
the record is a fingerprint of the vocabulary content (not the file bytes, which `save_pretrained` rewrites).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

from model.config import IMAGE_SPECIAL_TOKEN, IMAGE_TOKENS, V3_IMAGE_SPECIAL_TOKEN, V3_IMAGE_TOKENS
from .schema import recorded_candidates

PROJECT_TOKENIZER_PATH = "model/minimind_tokenizer"  # this project's own tokenizer (scripts/train_tokenizer.py)
DEFAULT_TOKENIZER_PATH = PROJECT_TOKENIZER_PATH  # what training from scratch uses
# The official MiniMind tokenizer, which the published v1 models and *_llm.pth weights were trained with.
OFFICIAL_TOKENIZER_PATH = "model/minimind_tokenizer_official"
OFFICIAL_TOKENIZER_FINGERPRINT = "659b587489401d61cb2caffc7d8eb33aff2e2adc873c63d2acf82dc100346403"
DOWNLOAD_COMMAND = "python scripts/download.py --what tokenizer"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Where to look for the official tokenizer instead (tests point it at a fixture or at nothing).
OFFICIAL_TOKENIZER_ENV = "MINIMIND_OFFICIAL_TOKENIZER_PATH"
# minimind-3v follows the same rule. The project's own 3v-style tokenizer (scripts/train_tokenizer.py --generation
# 3v: the official one's special tokens and ids, `<|image_pad|>` = 12, and its chat template) is what 3v training
# from scratch uses; the official minimind-3v tokenizer, which the published 3v checkpoints (the .pth files,
# llm_768.pth, the transformers directories) were trained with, is downloaded, and an unrecorded 3v checkpoint is
# paired with it. $MINIMIND_3V_OFFICIAL_TOKENIZER_PATH says where to look for it instead.
PROJECT_V3_TOKENIZER_PATH = "model/minimind_3v_tokenizer"
V3_OFFICIAL_TOKENIZER_PATH = "model/minimind_3v_tokenizer_official"
V3_OFFICIAL_TOKENIZER_FINGERPRINT = "c175c9610720eaabe9c9f0c96f646aa28e03b308258320d05b9edb6988cf59fb"
V3_DOWNLOAD_COMMAND = "python scripts/download.py --what tokenizer --generation 3v"
V3_OFFICIAL_TOKENIZER_ENV = "MINIMIND_3V_OFFICIAL_TOKENIZER_PATH"


class TokenizerError(ValueError):
    """No usable tokenizer for a checkpoint, or one whose vocabulary differs from the checkpoint's; one line."""


def load_tokenizer(path: str = DEFAULT_TOKENIZER_PATH):
    """Load a local tokenizer directory; a missing one is an error that says how to get it.

    Only tokenizer files are read: a model directory's config.json (whose auto_map names Python files) is not.
    """
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"tokenizer not found at '{path}': use the project's tokenizer ({PROJECT_TOKENIZER_PATH}, "
            f"rebuilt by `python scripts/train_tokenizer.py`) or fetch the official one with `{DOWNLOAD_COMMAND}`")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path, trust_remote_code=False)


def tokenizer_fingerprint(path: str) -> str:
    """sha256 of the vocabulary (token, id) pairs in id order, read from tokenizer.json's model.vocab."""
    file = os.path.join(path, "tokenizer.json")
    try:
        with open(file, encoding="utf-8") as f:
            vocab = json.load(f)["model"]["vocab"]
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer not found at '{path}' (no tokenizer.json)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"{file}: not a tokenizer.json with a model.vocab ({type(e).__name__})") from None
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{file}: model.vocab is not a token -> id mapping")
    text = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_record(path: str) -> dict[str, str]:
    """What a checkpoint's sidecar stores about its tokenizer: the path used and the vocabulary fingerprint
    (save_checkpoint makes the path portable)."""
    return {"path": str(path), "fingerprint": tokenizer_fingerprint(path)}


def default_tokenizer_path(generation: str = "v1") -> str:
    """The tokenizer training from scratch uses: the project's own (DEFAULT_TOKENIZER_PATH, or for 3v
    PROJECT_V3_TOKENIZER_PATH) from the working directory, or from the project root when the working directory has
    none (a run started in another folder)."""
    path = PROJECT_V3_TOKENIZER_PATH if generation == "3v" else DEFAULT_TOKENIZER_PATH
    return path if _has_tokenizer(path) else str(PROJECT_ROOT / path)


def official_tokenizer_path(generation: str = "v1") -> str:
    """The official tokenizer's directory: $MINIMIND_OFFICIAL_TOKENIZER_PATH, else OFFICIAL_TOKENIZER_PATH in the
    project (whatever the working directory); for 3v, $MINIMIND_3V_OFFICIAL_TOKENIZER_PATH, else
    V3_OFFICIAL_TOKENIZER_PATH in the project."""
    if generation == "3v":
        return os.environ.get(V3_OFFICIAL_TOKENIZER_ENV) or str(PROJECT_ROOT / V3_OFFICIAL_TOKENIZER_PATH)
    return os.environ.get(OFFICIAL_TOKENIZER_ENV) or str(PROJECT_ROOT / OFFICIAL_TOKENIZER_PATH)


def official_fingerprint(generation: str = "v1") -> str:
    """The vocabulary an unrecorded checkpoint of this generation (a published file) was trained with."""
    return V3_OFFICIAL_TOKENIZER_FINGERPRINT if generation == "3v" else OFFICIAL_TOKENIZER_FINGERPRINT


def _vocabulary_label(fingerprint: str) -> str:
    """A vocabulary as error messages name it: the fingerprint's first 12 digits, and whether it is an official one."""
    name = " (the official MiniMind tokenizer)" if fingerprint == OFFICIAL_TOKENIZER_FINGERPRINT else \
        " (the official minimind-3v tokenizer)" if fingerprint == V3_OFFICIAL_TOKENIZER_FINGERPRINT else ""
    return f"{fingerprint[:12]}{name}"


def missing_official_message(source: str, generation: str = "v1") -> str:
    if generation == "3v":
        return (f"{source} records no tokenizer (a published minimind-3v checkpoint): it needs the official "
                f"minimind-3v tokenizer at {V3_OFFICIAL_TOKENIZER_PATH}, which is missing; get it with "
                f"`{V3_DOWNLOAD_COMMAND}`, or pass --tokenizer_path DIR")
    return (f"{source} records no tokenizer (a published v1 checkpoint): it needs the official MiniMind tokenizer "
            f"at {OFFICIAL_TOKENIZER_PATH}, which is missing; get it with `{DOWNLOAD_COMMAND}`, or pass "
            f"--tokenizer_path DIR")


def resolve_tokenizer_path(explicit: Optional[str], model_dir_tokenizer: Optional[str],
                           record: Optional[dict], source: str, generation: str = "v1") -> str:
    """The tokenizer directory for a checkpoint, by the one rule every tool uses:

    1. an explicit --tokenizer_path; 2. the tokenizer inside a Hugging Face model directory; 3. the path in the
    checkpoint's record (a relative one looked up from the working directory, the project root and the
    checkpoint's folder: one with the recorded vocabulary wins); 4. for a checkpoint with no record (a published
    file), the official tokenizer of its generation (official_tokenizer_path: v1's at OFFICIAL_TOKENIZER_PATH,
    3v's at V3_OFFICIAL_TOKENIZER_PATH); 5. otherwise a one-line TokenizerError giving the download command.
    A recorded path that no longer exists falls through to an official tokenizer only when the record's
    fingerprint is that official one; otherwise it is an error naming the record.
    """
    if explicit:
        return explicit
    if model_dir_tokenizer:
        return model_dir_tokenizer
    if record:
        recorded = record.get("path")
        found = [c for c in recorded_candidates(recorded, source) if _has_tokenizer(c)] if recorded else []
        same = next((c for c in found if _fingerprint_or_none(c) == record.get("fingerprint")), None)
        if same:
            return same
        official = next((official_tokenizer_path(g) for g in ("v1", "3v")
                         if record.get("fingerprint") == official_fingerprint(g)), None)
        if official and _has_tokenizer(official):
            return official
        if found:  # another vocabulary there: check_tokenizer names the mismatch
            return found[0]
        raise TokenizerError(f"{source} was trained with the tokenizer at '{recorded}' (vocabulary "
                             f"{_vocabulary_label(record.get('fingerprint', '?'))}), which is not there: pass "
                             f"--tokenizer_path DIR pointing at that tokenizer")
    if _has_tokenizer(official_tokenizer_path(generation)):
        return official_tokenizer_path(generation)
    raise TokenizerError(missing_official_message(source, generation))


def _has_tokenizer(path: str) -> bool:
    return os.path.exists(os.path.join(path, "tokenizer.json"))


def _fingerprint_or_none(path: str) -> Optional[str]:
    """The vocabulary fingerprint of the tokenizer at `path`, or None when it cannot be read (another candidate
    may hold the recorded one)."""
    try:
        return tokenizer_fingerprint(path)
    except (OSError, TokenizerError):
        return None


def check_tokenizer(path: str, record: Optional[dict], source: str, generation: str = "v1") -> str:
    """The fingerprint of the tokenizer at `path`; a TokenizerError when it differs from the checkpoint's record.

    An unrecorded checkpoint (a published file) must be paired with its generation's official tokenizer."""
    fingerprint = tokenizer_fingerprint(path)
    expected = (record or {}).get("fingerprint") or official_fingerprint(generation)
    if fingerprint != expected:
        what = "was trained with" if record else "records no tokenizer, so it needs"
        raise TokenizerError(f"tokenizer mismatch: {source} {what} vocabulary {_vocabulary_label(expected)}, but "
                             f"the tokenizer at '{path}' has vocabulary {_vocabulary_label(fingerprint)}; its token "
                             f"ids mean different things, so the answers would be garbage")
    return fingerprint


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


def image_pad_id(tokenizer) -> list[int]:
    """3v's image_ids: the one id of `<|image_pad|>` (a prompt holds a run of 64 of it), or a one-line error for a
    tokenizer that does not know it as one token (the v1 tokenizers split it into pieces)."""
    ids = encode(tokenizer, V3_IMAGE_SPECIAL_TOKEN)
    if len(ids) != 1:
        raise TokenizerError(f"this tokenizer splits {V3_IMAGE_SPECIAL_TOKEN} into {len(ids)} tokens: it is not a "
                             f"minimind-3v tokenizer, and cannot mark a 3v image")
    return ids


def image_placeholder(generation: str = "v1") -> str:
    """The prompt text standing for one image: v1 25 '<' and 25 '>', 3v 64 x `<|image_pad|>`."""
    return V3_IMAGE_SPECIAL_TOKEN * V3_IMAGE_TOKENS if generation == "3v" else IMAGE_SPECIAL_TOKEN


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat template as text: v1 <s>user\\n{q}</s>\\n<s>assistant\\n{a}</s>\\n ...; 3v (its tokenizer's own
    template, Qwen3-style) <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n ..."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# A run of this many '<' tokens starts an image span (the placeholder is 25 '<' then 25 '>', one token each).
_SPAN_HALF = IMAGE_TOKENS // 2
_BRACKET_RUN = re.compile("<{%d,}|>{%d,}" % (_SPAN_HALF, _SPAN_HALF))


def neutralise_placeholder(text: str, generation: str = "v1") -> str:
    """User text that can never create or cut an image span: every run of 25 or more '<' (or '>') is
    broken by a space after each 24 characters. Each '<' token stands for one '<' character, so a run of
    at most 24 can never tokenise into the 25 opening ids of a span. For 3v, whose tokenizer reads special
    tokens such as `<|image_pad|>` or `<|im_end|>` out of plain text, '<|' also gets a space: '< |'."""
    def split(match: re.Match) -> str:
        run = match.group(0)
        step = _SPAN_HALF - 1
        return " ".join(run[i:i + step] for i in range(0, len(run), step))

    # a lone UTF-16 surrogate (from a non-UTF-8 command line, say) cannot be tokenised: shown as U+FFFD instead
    text = text.encode("utf-8", "replace").decode("utf-8") if _has_surrogate(text) else text
    text = _BRACKET_RUN.sub(split, text)
    return text.replace("<|", "< |") if generation == "3v" else text


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


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
