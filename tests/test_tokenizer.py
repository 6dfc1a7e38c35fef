"""Fast checks of the committed tokenizer in model/minimind_tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "model" / "minimind_tokenizer"
PLACEHOLDER = "<" * 25 + ">" * 25


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_vocab_and_special_ids(tokenizer) -> None:
    assert len(tokenizer) == 6400
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)


def test_round_trip_mixed_text(tokenizer) -> None:
    text = "这个图片描述的是什么内容？ A red circle on a blue background, 123!"
    ids = tokenizer.encode(text)
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_chat_template_user_assistant(tokenizer) -> None:
    messages = [{"role": "user", "content": "你好 hi"}, {"role": "assistant", "content": "ok"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<s>user\n你好 hi</s>\n<s>assistant\nok</s>\n"


def test_chat_template_system_first(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are MiniMind."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "You are MiniMind.<s>user\nq</s>\n<s>assistant\na</s>\n"


def test_image_placeholder_is_50_tokens(tokenizer) -> None:
    for text in (PLACEHOLDER, f"描述这张图片：\n{PLACEHOLDER}\n"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        lt_id, gt_id = tokenizer.convert_tokens_to_ids(["<", ">"])
        assert ids.count(lt_id) == 25 and ids.count(gt_id) == 25
    ids = tokenizer.encode(PLACEHOLDER, add_special_tokens=False)
    assert len(ids) == 50
    assert len(set(ids[:25])) == 1 and len(set(ids[25:])) == 1
    assert ids[0] != ids[25]


class _SlowPath:
    """The tokenizer without its backend: tokenize_conversations then calls it once per conversation."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token = tokenizer.eos_token

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self._tokenizer.apply_chat_template(*args, **kwargs)


def test_batched_tokenising_gives_the_ids_and_labels_of_one_call_each(tokenizer) -> None:
    from data_pipeline.tokens import IGNORE_INDEX, tokenize_conversations, with_placeholders

    conversations = [
        with_placeholders([{"role": "user", "content": "<image>\nwhat color is the shape?"},
                           {"role": "assistant", "content": "blue"}]),
        [{"role": "user", "content": "你好，介绍一下你自己"}, {"role": "assistant", "content": "我是一个小模型。"},
         {"role": "user", "content": "and in English?"}, {"role": "assistant", "content": "a small model </s> ok"}],
        [{"role": "user", "content": "no answer yet"}, {"role": "assistant", "content": ""}],
    ]
    batched = tokenize_conversations(tokenizer, conversations)
    assert batched == tokenize_conversations(_SlowPath(tokenizer), conversations)
    ids, labels = batched[1]
    answers = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(answers) == "我是一个小模型。</s>\na small model </s> ok</s>\n"
