"""The project's own minimind-3v-style tokenizer (model/minimind_3v_tokenizer, built by
`scripts/train_tokenizer.py --generation 3v`): its own vocabulary, but the official 3v tokenizer's added tokens at
the same ids, and a chat template that renders every conversation as the official one does (compared with the
official copy in tests/fixtures/v3_parity/tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_script
from tokenizers import Tokenizer

from checkpoints.tokenizer import (PROJECT_V3_TOKENIZER_PATH, V3_OFFICIAL_TOKENIZER_FINGERPRINT, encode,
                                   load_tokenizer, render_chat, tokenizer_fingerprint)
from conftest import ROOT

PROJECT = ROOT / PROJECT_V3_TOKENIZER_PATH
OFFICIAL = ROOT / "tests" / "fixtures" / "v3_parity" / "tokenizer"
PAD = "<|image_pad|>"

CONVERSATIONS = {
    "eval prompt": [{"role": "user", "content": PAD * 64 + "\n请描述这张图中的主要物体和场景。"}],
    "system and turns": [{"role": "system", "content": "You are MiniMind."},
                         {"role": "user", "content": "你好 hi"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": PAD * 64 + "\nand this?"}],
    "reasoning field": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "\n\nanswer", "reasoning_content": "\nthink first\n"}],
    "think in content": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "<think>\nsteps\n</think>\n\nthe answer"}],
    "later system": [{"role": "user", "content": "a"}, {"role": "system", "content": "be brief"},
                     {"role": "user", "content": "b"}],
    "tool calls": [{"role": "user", "content": "weather?"},
                   {"role": "assistant", "content": "let me look",
                    "tool_calls": [{"function": {"name": "get", "arguments": {"city": "北京"}}},
                                   {"name": "put", "arguments": "{\"x\": 1}"}]},
                   {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "20C"},
                   {"role": "assistant", "content": "sunny, 20C"}],
    "non-string content": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                           {"role": "assistant", "content": None}],
}


@pytest.fixture(scope="module")
def project():
    return load_tokenizer(str(PROJECT))


@pytest.fixture(scope="module")
def official():
    return load_tokenizer(str(OFFICIAL))


def structure(tokenizer, text: str) -> list:
    """The token ids of `text` as the added-token ids (< 36, at their places) with the decoded text between them."""
    items: list = []
    for token in encode(tokenizer, text):
        if token < 36:
            items.append(token)
        elif items and isinstance(items[-1], list):
            items[-1].append(token)
        else:
            items.append([token])
    return [tokenizer.decode(item) if isinstance(item, list) else item for item in items]


def test_own_vocabulary_with_the_official_added_tokens_at_the_same_ids(project, official):
    assert len(project) == len(official) == 6400
    assert tokenizer_fingerprint(str(PROJECT)) != V3_OFFICIAL_TOKENIZER_FINGERPRINT  # not the official vocabulary
    ours, theirs = (json.loads((d / "tokenizer_config.json").read_text())["added_tokens_decoder"]
                    for d in (PROJECT, OFFICIAL))
    assert ours == theirs and len(ours) == 36  # ids, contents and special flags
    assert {"<|im_start|>": 1, "<|im_end|>": 2, PAD: 12, "<think>": 25, "</think>": 26}.items() <= \
        project.get_vocab().items()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(project, name) == getattr(official, name), name
    assert project.all_special_ids == official.all_special_ids


def test_byte_level_round_trip_and_no_tokens_added(project):
    text = "这个图片描述的是什么内容？ A red circle, 123! <b>ü</b>\n"
    ids = encode(project, text)
    assert project(text)["input_ids"] == ids and ids[0] not in (1, 2) and ids[-1] not in (1, 2)
    assert project.decode(ids) == text


def test_image_pad_is_one_token_even_in_a_run_and_beside_text(project):
    assert encode(project, PAD * 64) == [12] * 64
    ids = encode(project, f"看图：{PAD * 64}\nwhat? {PAD}x")
    assert ids.count(12) == 65 and ids[ids.index(12):ids.index(12) + 64] == [12] * 64


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_as_the_official_one(project, official, name, generation_prompt):
    messages = CONVERSATIONS[name]
    ours, theirs = (t.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
                    for t in (project, official))
    assert ours == theirs
    assert structure(project, ours) == structure(official, theirs)  # the same added-token ids at the same places


def test_generation_prompt_has_an_empty_think_block_unless_thinking_is_opened(project, official):
    messages = CONVERSATIONS["eval prompt"]
    rendered = render_chat(project, messages)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert structure(project, rendered)[-8:] == [2, "\n", 1, "assistant\n", 25, "\n\n", 26, "\n\n"]
    opened = [t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, open_thinking=True)
              for t in (project, official)]
    assert opened[0] == opened[1] and opened[0].endswith("<|im_start|>assistant\n<think>\n")


def test_tool_definitions_are_refused_in_one_line(project):
    with pytest.raises(Exception, match="takes no tool definitions") as err:
        project.apply_chat_template([{"role": "user", "content": "q"}], tools=[{"name": "f"}], tokenize=False)
    assert "\n" not in str(err.value)


def test_the_shipped_files_are_what_the_training_script_writes():
    script = load_script("scripts/train_tokenizer.py", "train_tokenizer_3v")
    config = json.loads((PROJECT / "tokenizer_config.json").read_text())
    assert config == json.loads(json.dumps(script.tokenizer_config_3v()))
    assert script.check_3v(Tokenizer.from_file(str(PROJECT / "tokenizer.json"))) == 12
    assert sorted(p.name for p in PROJECT.iterdir()) == ["README.md", "tokenizer.json", "tokenizer_config.json"]
