"""Padding masks: left padding for generation, right padding for scoring; batched equals row by row."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from model.decoder import KVCache, attention_layout
from model.vlm import MiniMindVLM, pad_rows

PAD = 0


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return MiniMindVLM(tiny_config(tokenizer)).eval()


def _rows(model):
    """Rows of different lengths: two with an image placeholder span, two text-only."""
    gen = torch.Generator().manual_seed(3)
    span = list(model.config.image_ids)
    text = lambda n: torch.randint(100, 6400, (n,), generator=gen).tolist()  # noqa: E731
    rows = [text(3) + span + text(9), text(5), text(2) + span + text(2), text(17)]
    features = torch.randn(2, 50, model.config.vision_dim, generator=gen)
    return rows, features, [0, None, 1, None]


def test_left_padded_logits_equal_unpadded(model):
    rows, features, image_of = _rows(model)
    ids, mask = pad_rows(rows, PAD, "left")
    with torch.no_grad():
        batched = model(ids, features, attention_mask=mask).logits
        assert torch.isfinite(batched).all()  # padded queries do not produce NaN that leaks on
        for i, row in enumerate(rows):
            feats = None if image_of[i] is None else features[image_of[i]:image_of[i] + 1]
            alone = model(torch.tensor([row]), feats).logits[0]
            assert torch.allclose(batched[i, -len(row):], alone, atol=1e-5), i


def test_right_padding_keeps_padding_out_of_the_loss(model):
    rows, _, _ = _rows(model)
    text_rows = [rows[1], rows[3]]
    ids, mask = pad_rows(text_rows, PAD, "right")
    with torch.no_grad():
        out = model(ids, labels=ids, attention_mask=mask)
        logits = out.logits
        # the mean over the real targets of both rows, computed row by row
        total, count = 0.0, 0
        for i, row in enumerate(text_rows):
            alone = model(torch.tensor([row]), labels=torch.tensor([row]))
            assert torch.allclose(logits[i, :len(row)], alone.logits[0], atol=1e-5)
            total += float(alone.loss) * (len(row) - 1)
            count += len(row) - 1
        assert abs(float(out.loss) - total / count) < 1e-5
        # without the mask the padding would be a target, and the loss would differ
        assert abs(float(model(ids, labels=ids).loss) - total / count) > 1e-3


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "nocache"])
def test_batched_greedy_equals_row_by_row(model, use_cache):
    rows, features, image_of = _rows(model)
    ids, mask = pad_rows(rows, PAD, "left")
    batched = model.generate(ids, features, attention_mask=mask, max_new_tokens=12, temperature=0.0,
                             use_cache=use_cache)
    for i, row in enumerate(rows):
        feats = None if image_of[i] is None else features[image_of[i]:image_of[i] + 1]
        alone = model.generate(torch.tensor([row]), feats, max_new_tokens=12, temperature=0.0)
        assert batched[i].tolist() == alone[0].tolist(), i


def test_batched_repetition_penalty_ignores_padding(model):
    rows, features, _ = _rows(model)
    ids, mask = pad_rows(rows, PAD, "left")
    args = dict(max_new_tokens=8, temperature=0.0, repetition_penalty=1.3)
    batched = model.generate(ids, features, attention_mask=mask, **args)
    alone = model.generate(torch.tensor([rows[1]]), **args)
    assert batched[1].tolist() == alone[0].tolist()


def test_pad_rows_and_mask_errors(model):
    ids, mask = pad_rows([[5, 6, 7], [8]], PAD, "left")
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_rows([[5, 6, 7], [8]], PAD, "right")
    assert ids.tolist() == [[5, 6, 7], [8, PAD, PAD]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, attention_mask=mask[:, :2])


def test_attention_layout_masks_only_what_needs_a_mask():
    """Plain rows, right padding without a cache and a decode step on an unpadded cache get no mask and no
    positions (the fast kernels); left padding, padding remembered by the cache and a chunk after a filled
    cache get one."""
    cpu = torch.device("cpu")
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for mask in (None, torch.ones(2, 5, dtype=torch.long), right):
        assert attention_layout(5, 2, cpu, mask) == (None, None)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions, mask = attention_layout(5, 2, cpu, left)
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]  # a row's positions count its real tokens
    assert mask.shape == (2, 1, 5, 5) and mask[0, 0, 4].tolist() == [False, False, True, True, True]
    assert mask[0, 0, 0].tolist() == [True, False, False, False, False]  # a padded query sees itself: no NaN
    cache = KVCache(tiny_config(), 2, 16, cpu, torch.float32)
    cache.length = 5
    assert attention_layout(1, 2, cpu, cache=cache) == (None, None)  # one query sees every cached key
    positions, chunk = attention_layout(3, 2, cpu, cache=cache)
    assert positions is None and torch.equal(chunk, torch.ones(3, 8, dtype=torch.bool).tril(5))
    cache.key_mask = left.bool()  # padding recorded at the prefill holds for every later step
    positions, mask = attention_layout(1, 2, cpu, cache=cache)
    assert positions.tolist() == [[3], [5]] and mask[0, 0, 0].tolist() == [False, False] + [True] * 4
    assert cache.key_mask.shape == (2, 6)


def test_cpu_bf16_training_attends_in_fp32(monkeypatch):
    """CPU bf16 attention backward is slow in PyTorch: CPU bf16 training attends in fp32 and casts back, while
    inference stays in bf16."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config()).to(torch.bfloat16).train()
    ids = torch.randint(0, 6400, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert seen == [torch.float32] * 2 and out.logits.dtype == torch.bfloat16
    seen.clear()
    with torch.no_grad():
        model.eval()(ids)
    assert seen == [torch.bfloat16] * 2


def test_evaluation_batches_across_prompt_lengths(tmp_path, tokenizer, tiny_clip_dir):
    from helpers import make_dataset

    from inference.chat import VLMChat
    from evaluation.held_out import answer_accuracy
    from model.vision import load_vision_encoder

    questions = ["What colour is it?", "Name the colour of this square, please.", "Colour?",
                 "Which colour do you see in the picture in front of you?"]
    extra = [{"id": f"q{i}", "image": f"img_{i % 4}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "red"}]} for i, q in enumerate(questions)]
    data, images = make_dataset(tmp_path, 4, extra_records=extra)
    torch.manual_seed(1)
    chat = VLMChat(MiniMindVLM(tiny_config(tokenizer, vision_dim=64)), tokenizer, load_vision_encoder(str(tiny_clip_dir)))
    lengths = {len(chat.build_prompt(q)) for q in questions}
    assert len(lengths) == len(questions)  # the batch really mixes prompt lengths
    batched = answer_accuracy(chat, str(data), str(images), max_new_tokens=6, batch_size=16)
    one_by_one = answer_accuracy(chat, str(data), str(images), max_new_tokens=6, batch_size=1)
    assert batched.n == 8 and batched.predictions == one_by_one.predictions
    assert batched.accuracy == one_by_one.accuracy


def test_questions_about_one_image_share_its_prefill(tmp_path, tokenizer, tiny_clip_dir, monkeypatch):
    from helpers import make_dataset

    import evaluation.held_out as held_out
    from inference.chat import VLMChat
    from model.vision import load_vision_encoder

    questions = ["What colour is it?", "Name the colour of this square, please.", "Colour?", "Which one?"]
    extra = [{"id": f"q{i}", "image": f"img_{i % 3}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "red"}]} for i, q in enumerate(questions)]
    data, images = make_dataset(tmp_path, 4, extra_records=extra)
    torch.manual_seed(2)
    model = MiniMindVLM(tiny_config(tokenizer, vision_dim=64))
    with torch.no_grad():  # weights large enough that the answers depend on the image and the question
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    chat = VLMChat(model, tokenizer, load_vision_encoder(str(tiny_clip_dir)))
    prompts = [chat.build_prompt(q) for q in questions]
    width = held_out.shared_prefix(prompts, set(chat.model.config.image_ids))
    assert 50 < width < min(map(len, prompts))  # the template's head and the whole image span are shared
    shared = held_out.answer_accuracy(chat, str(data), str(images), max_new_tokens=6, batch_size=5)
    calls = []
    monkeypatch.setattr(held_out, "shared_prefix", lambda *a: calls.append(a) or 0)
    alone = held_out.answer_accuracy(chat, str(data), str(images), max_new_tokens=6, batch_size=1)
    assert calls and shared.n == alone.n == 8
    assert len(set(shared.predictions)) > 4  # the answers differ, so the comparison means something
    assert sorted(zip(shared.questions, shared.predictions)) == sorted(zip(alone.questions, alone.predictions))
    assert shared.accuracy == alone.accuracy


def test_shared_prefix_needs_the_whole_image():
    from evaluation.held_out import shared_prefix

    image = {7, 8}
    assert shared_prefix([[1, 7, 8, 2, 3], [1, 7, 8, 2, 4, 5]], image) == 4
    assert shared_prefix([[1, 7, 8, 2], [1, 7, 9, 8, 2]], image) == 0  # the image differs: no shared prefix
    assert shared_prefix([[1, 7, 8, 2], [1, 7, 8, 2, 8]], image) == 0  # a placeholder token after the prefix
    assert shared_prefix([[1, 2, 3]], set()) == 0 and shared_prefix([], image) == 0
    assert shared_prefix([[1, 7, 8, 2]], image) == 3  # one prompt keeps a token to continue from
