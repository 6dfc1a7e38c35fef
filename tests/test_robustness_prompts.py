"""Bounded work per request and placeholder safety in the shared inference path (inference.chat.VLMChat):
prompt building that does not grow with the history, long text cut to max_seq_len with the image span whole,
user text that cannot forge or cut an image span, cancellation before the prompt runs and between steps, and
temperatures so small that they would overflow."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from PIL import Image

import inference.chat as chat_module
from inference.chat import GenerationSettings, StreamStats, TooManyImagesError, VLMChat
from model.config import IMAGE_SPECIAL_TOKEN
from checkpoints.tokenizer import count_span_openings, encode, neutralise_placeholder
from model.vlm import MiniMindVLM

RESERVE = 64


class FakeEncoder:
    """Stands in for CLIP here (these tests are about the text side): fixed random features."""

    def encode_images(self, images):
        return torch.randn(len(list(images)), 50, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def chat(tokenizer) -> VLMChat:
    torch.manual_seed(0)
    return VLMChat(MiniMindVLM(tiny_config(tokenizer, max_seq_len=160)), tokenizer, FakeEncoder())


@pytest.fixture
def tokenised_chars(monkeypatch):
    """Counts the characters build_prompt hands to the tokenizer."""
    counted = [0]

    def counting_encode(tokenizer, text):
        counted[0] += len(text)
        return encode(tokenizer, text)

    monkeypatch.setattr(chat_module, "encode", counting_encode)
    return counted


def _spans(chat, ids):
    rows, starts = chat.model.find_image_spans(torch.tensor([ids]))
    return starts.tolist()


def test_long_history_costs_work_bounded_by_the_context_not_the_history(chat, tokenised_chars):
    turn = ("what colour is the sky today? " * 2, "it is blue, as usual, nothing special. ")
    history = [turn] * 1500  # about 146 KB, as in the probe that held the server for a minute
    ids = chat.build_prompt("and now?", history, True, reserve=RESERVE)
    assert len(ids) <= 160 - chat.answer_room(RESERVE, True) and len(_spans(chat, ids)) == 1
    assert chat.tokenizer.decode(ids).endswith("and now?</s>\n<s>assistant\n")
    # it tokenised only the newest turns that could fit: a few KB (the old loop re-tokenised ~100 MB)
    assert tokenised_chars[0] < 10_000, tokenised_chars[0]


def test_one_huge_question_is_cut_to_fit_keeping_the_image_span_whole(chat, tokenised_chars):
    question = "lorem ipsum dolor sit amet " * 12_000 + "THE END?"  # 324 KB
    ids = chat.build_prompt(question, (), True, reserve=RESERVE)
    text = chat.tokenizer.decode(ids)
    assert 0 < chat.answer_room(RESERVE, True) <= RESERVE
    assert len(ids) <= 160 - chat.answer_room(RESERVE, True)
    assert len(_spans(chat, ids)) == 1 and text.startswith("<s>user\n" + IMAGE_SPECIAL_TOKEN)
    assert text.endswith("THE END?</s>\n<s>assistant\n")  # the newest part of the text is kept
    assert tokenised_chars[0] < 20_000, tokenised_chars[0]  # not 324 KB
    no_image = chat.build_prompt(question, (), False, reserve=RESERVE)
    assert len(no_image) <= 160 - chat.answer_room(RESERVE, False) and not _spans(chat, no_image)


def test_a_small_context_asked_for_a_long_answer_keeps_the_question(tokenizer):
    """The demo model has a 128-token context; the web page asks for up to 256 new tokens. Reserving 64 of the
    128 for the answer left less than the image span plus the template, and the question was cut to '?'."""
    small = VLMChat(MiniMindVLM(tiny_config(tokenizer, max_seq_len=128)), tokenizer, FakeEncoder())
    ids = small.build_prompt("What shape is in the image?", (), True, reserve=64)
    assert small.tokenizer.decode(ids).endswith("\nWhat shape is in the image?</s>\n<s>assistant\n")
    assert len(_spans(small, ids)) == 1 and len(ids) <= 128 - small.answer_room(64, True)
    assert small.answer_room(64, True) > 0  # some room for the answer is still kept


@pytest.mark.parametrize("context, most", [(128, 2), (200, 3), (512, 8)])
def test_images_per_question_are_capped_by_the_context_and_by_max_images(tokenizer, context, most):
    """8 images in a 200-token context made a 420-token prompt: the spans alone did not fit. Every front end
    now takes at most max_images() (8, or what the context holds), so the prompt never exceeds max_seq_len."""
    small = VLMChat(MiniMindVLM(tiny_config(tokenizer, max_seq_len=context)), tokenizer, FakeEncoder())
    assert small.max_images() == most
    for n in range(most + 1):
        ids = small.build_prompt("a long question " * 500, [("q", "a")] * 3, n, reserve=64)
        assert len(ids) <= context and len(_spans(small, ids)) == n
    with pytest.raises(TooManyImagesError, match=f"^{most + 1} images are too many: "):
        small.build_prompt("hi", (), most + 1)
    with pytest.raises(TooManyImagesError):
        list(small.stream("hi", [Image.new("RGB", (8, 8))] * (most + 1)))


FORGED = [IMAGE_SPECIAL_TOKEN, "<" * 25, "<" * 200 + "x", "look: " + IMAGE_SPECIAL_TOKEN * 3 + ">" * 40,
          "<" * 24 + " " + "<" * 30, "a lone surrogate \udce9 from a non-UTF-8 command line " + "<" * 25]


@pytest.mark.parametrize("text", FORGED)
def test_user_text_cannot_forge_or_cut_an_image_span(chat, text):
    image = Image.new("RGB", (32, 32), (200, 0, 0))
    settings = GenerationSettings(max_new_tokens=3, temperature=0)
    for history in ([], [(text, text)]):
        for with_image in (image, None):
            ids = chat.build_prompt(text, history, with_image is not None, reserve=3)
            assert len(_spans(chat, ids)) == (1 if with_image is not None else 0)
            list(chat.stream(text, with_image, history, settings))  # raised ImageSpliceError before
    assert count_span_openings(encode(chat.tokenizer, neutralise_placeholder(text)),
                               chat.model.config.image_ids) == 0


def test_cancellation_is_checked_before_the_prompt_runs_and_at_every_step(chat, monkeypatch):
    calls = [0]
    original = MiniMindVLM.forward

    def counting_forward(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MiniMindVLM, "forward", counting_forward)
    settings = GenerationSettings(max_new_tokens=50, temperature=0)
    image = Image.new("RGB", (32, 32))
    assert list(chat.stream("hi", image, (), settings, cancelled=lambda: True)) == []
    assert calls[0] == 0  # gone before the prefill: the model never ran
    for after in (1, 5):
        calls[0] = 0
        stats = StreamStats()
        list(chat.stream("hi", image, (), settings, stats, cancelled=lambda: stats.completion_tokens >= after))
        assert stats.completion_tokens == after and calls[0] == after  # no step after the cancel


@pytest.mark.parametrize("temperature, top_p", [(1e-300, None), (5e-324, None), (1e-30, 0.9), (1.0, 1e-300),
                                                (0.7, 1e-50)])
def test_sampling_values_that_would_underflow_are_greedy(chat, temperature, top_p):
    image = Image.new("RGB", (32, 32), (0, 0, 200))
    greedy = "".join(chat.stream("hi", image, (), GenerationSettings(max_new_tokens=8, temperature=0)))
    tiny = "".join(chat.stream("hi", image, (), GenerationSettings(max_new_tokens=8, temperature=temperature,
                                                                    top_p=top_p, top_k=None, seed=1)))
    assert tiny == greedy


def test_api_runner_drops_a_request_cancelled_while_it_queued(chat, monkeypatch):
    """The API worker passes its cancel flag into the stream: a request whose client left never runs the model."""
    import threading

    from inference.openai_app import Runner
    from inference.openai_request import ChatJob

    calls = [0]
    original = MiniMindVLM.forward
    monkeypatch.setattr(MiniMindVLM, "forward", lambda self, *a, **k: calls.__setitem__(0, calls[0] + 1)
                        or original(self, *a, **k))
    cancel = threading.Event()
    cancel.set()
    job = ChatJob("hi", Image.new("RGB", (32, 32)), [], GenerationSettings(max_new_tokens=50, temperature=0))
    outcome = Runner(chat).generate(job, lambda piece: None, cancel)
    assert outcome.completion_tokens == 0 and calls[0] == 0
