"""The decoder and VLM: v1 parity, splice, generation, parameter counts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from model.config import IMAGE_TOKENS, PRESETS, LMConfig
from model.decoder import count_parameters
from model.vlm import ImageSpliceError, MiniMindVLM, sample_next

FIXTURES = Path(__file__).parent / "fixtures" / "v1_parity"


def load_fixture(case: str):
    d = FIXTURES / case
    cfg = LMConfig(**json.loads((d / "config.json").read_text()), vision_proj_bias=True)
    model = MiniMindVLM(cfg).eval()
    model.load_state_dict(load_file(str(d / "weights.safetensors")), strict=True)
    return model, load_file(str(d / "cases.safetensors"))


@pytest.mark.parametrize("case", ["dense", "moe"])
def test_v1_parity_logits(case):
    model, cases = load_fixture(case)
    with torch.no_grad():
        logits = model(cases["input_ids"], cases["image_features"]).logits
        text_logits = model(cases["text_input_ids"]).logits
    assert logits.shape == cases["logits"].shape
    assert (logits - cases["logits"]).abs().max() < 1e-4
    assert (text_logits - cases["text_logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["dense", "moe"])
def test_v1_parity_greedy_with_and_without_cache(case):
    model, cases = load_fixture(case)
    args = dict(max_new_tokens=24, temperature=0.0)
    with_cache = model.generate(cases["gen_prompt_ids"], cases["gen_image_features"], use_cache=True, **args)
    without = model.generate(cases["gen_prompt_ids"], cases["gen_image_features"], use_cache=False, **args)
    assert with_cache[0].tolist() == cases["gen_greedy_ids_kv"].tolist()
    assert without[0].tolist() == cases["gen_greedy_ids_nokv"].tolist()


def test_published_parameter_counts():
    for name, expected in [("minimind-v-small", 27_272_192), ("minimind-v", 109_340_160)]:
        with torch.device("meta"):
            model = MiniMindVLM(LMConfig.from_preset(name, vision_proj_bias=True))
        assert count_parameters(model) == expected, name
    with torch.device("meta"):
        moe = MiniMindVLM(LMConfig(**PRESETS["minimind-v-small"], use_moe=True, vision_proj_bias=True))
    assert count_parameters(moe) == 96_494_592


def test_state_dict_keys_match_v1_layout():
    sd = MiniMindVLM(tiny_config(vision_proj_bias=True)).state_dict()
    fixture_keys = set(load_file(str(FIXTURES / "dense" / "weights.safetensors")).keys())
    assert set(sd) == fixture_keys
    assert sd["tok_embeddings.weight"].data_ptr() == sd["output.weight"].data_ptr()  # tied


def _ids_with_span(model, row_len, start):
    ids = torch.randint(100, 200, (row_len,))
    ids[start:start + IMAGE_TOKENS] = model.image_ids
    return ids


def test_splice_replaces_exactly_the_span_and_text_rows_stay(tokenizer):
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer)).eval()
    feats = torch.randn(1, IMAGE_TOKENS, 64)
    with_img = _ids_with_span(model, 70, 10)
    text = torch.randint(100, 200, (70,))
    ids = torch.stack([text, with_img])
    h = model.embed(ids)
    out = model.splice_images(h, ids, feats)
    assert torch.equal(out[0], h[0])  # text-only row untouched
    assert torch.allclose(out[1, 10:60], model.vision_proj(feats)[0])
    assert torch.equal(out[1, :10], h[1, :10]) and torch.equal(out[1, 60:], h[1, 60:])
    # one-per-row convention (B features, text rows skipped) gives the same result
    out2 = model.splice_images(h, ids, torch.cat([torch.randn(1, IMAGE_TOKENS, 64), feats]))
    assert torch.allclose(out2, out)
    # batch of one
    single = model(with_img[None], feats).logits
    assert single.shape == (1, 70, 6400)


def test_splice_errors(tokenizer):
    model = MiniMindVLM(tiny_config(tokenizer)).eval()
    feats = torch.randn(1, IMAGE_TOKENS, 64)
    cut = _ids_with_span(model, 70, 10)[:40][None]  # span truncated at 30 of 50 tokens
    with pytest.raises(ImageSpliceError, match="cut short"):
        model(cut, feats)
    two = _ids_with_span(model, 120, 0)
    two[60:110] = model.image_ids
    with pytest.raises(ImageSpliceError, match="2 image placeholder span"):
        model(two[None], feats)


def test_loss_ignores_minus_100_and_trains_token_zero(tokenizer):
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer))
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, 5:-1].reshape(-1, 6400), ids[:, 6:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)
    only = model(ids, labels=labels, loss_only=True)
    assert torch.allclose(only.loss, out.loss, atol=1e-6) and only.logits.shape == (12, 6400)
    labels_zero = torch.zeros_like(ids)  # id 0 is an ordinary target
    assert model(ids, labels=labels_zero).loss > 0


def test_generation_cache_equivalence_and_limits(tokenizer):
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer)).eval()
    ids = _ids_with_span(model, 60, 2)[None]
    feats = torch.randn(1, IMAGE_TOKENS, 64)
    a = model.generate(ids, feats, max_new_tokens=30, temperature=0, use_cache=True)
    b = model.generate(ids, feats, max_new_tokens=30, temperature=0, use_cache=False)
    assert a.shape == (1, 30) and torch.equal(a, b)
    # stop at eos: make the first greedy token the eos id
    eos = int(a[0, 3])
    c = model.generate(ids, feats, max_new_tokens=30, temperature=0, eos_token_id=eos)
    assert c.shape[1] <= 3 and eos not in c[0].tolist()
    # streaming yields one token per step, the same ones
    streamed = [int(t) for t in model.generate_stream(ids, feats, max_new_tokens=5, temperature=0)]
    assert streamed == a[0, :5].tolist()
    # generation longer than max_seq_len grows the rotary table
    long = model.generate(ids, feats, max_new_tokens=model.config.max_seq_len, temperature=0)
    assert long.shape[1] == model.config.max_seq_len


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, -1.0, -2.0]])
    seen = torch.tensor([[0, 2]])
    # repetition penalty divides positive logits, multiplies negative ones
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, seen, 0.0, None, None, 2.0).item() == 1  # 4/2=2 < 3
    picks = {sample_next(logits, seen, 1.0, 1, None, 1.0, g).item() for _ in range(20)}
    assert picks == {0}
    picks = {sample_next(torch.tensor([[5.0, 4.9, -9.0, -9.0]]), seen, 1.0, None, 0.5, 1.0, g).item()
             for _ in range(20)}
    assert picks == {0}
    picks = {sample_next(torch.tensor([[1.0, 1.0, 1.0, -50.0]]), seen, 1.0, None, 0.9, 1.0, g).item()
             for _ in range(200)}
    assert picks == {0, 1, 2}
