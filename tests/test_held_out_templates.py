"""bench/held_out_templates.py: questions grouped by template, and the scored order it relies on."""
from __future__ import annotations

import os
import sys

import torch
from conftest import tiny_config

from evaluation.exact_match import exact_match
from model.vlm import MiniMindVLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from held_out_templates import template  # noqa: E402


def test_template_replaces_colour_and_shape_words():
    assert template("is there a circle in the image?") == "is there a <S> in the image?"
    assert template("what is the blue shape?") == "what is the <C> shape?"
    assert template("what color is the triangle?") == "what color is the <S>?"
    assert template("is there not a gray shape?") == "is there not a <C> shape?"
    assert template("does the image contain a rectangle?") == "does the image contain a <S>?"


def test_accuracy_keeps_each_question_beside_its_answer(tmp_path, tokenizer, tiny_clip_dir):
    from helpers import make_dataset

    from evaluation.held_out import answer_accuracy
    from inference.chat import VLMChat
    from model.vision import load_vision_encoder

    extra = [{"id": f"q{i}", "image": f"img_{i % 3}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}
        for i, (q, a) in enumerate([("What colour is it?", "red"), ("Is it round? Answer in one word.", "no"),
                                    ("Colour?", "blue")])]
    data, images = make_dataset(tmp_path, 3, extra_records=extra)
    torch.manual_seed(1)
    chat = VLMChat(MiniMindVLM(tiny_config(tokenizer, vision_dim=64)), tokenizer, load_vision_encoder(str(tiny_clip_dir)))
    acc = answer_accuracy(chat, str(data), str(images), max_new_tokens=4, batch_size=2)
    assert len(acc.questions) == len(acc.predictions) == len(acc.hits) == acc.n
    assert {q for q, _ in acc.questions} >= {"What colour is it?", "Is it round? Answer in one word.", "Colour?"}
    assert acc.hits == [exact_match(p, a) for p, (_, a) in zip(acc.predictions, acc.questions)]
    assert sum(acc.hits) / acc.n == acc.accuracy
