"""minimind-3v parity: the reference numbers upstream's code (jingyaogong/minimind-v at 9595617) gives on small random
models (tests/fixtures/v3_parity, see its README) against this network, loaded through checkpoints/ from the native
`.pth` (fp16, upstream key names, no vision keys) and from the transformers directory (never importing its Python
files, which raise if imported)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from checkpoints.checkpoint import load_model, read_checkpoint
from checkpoints.tokenizer import image_pad_id, load_tokenizer, render_chat
from model.config import V3_YARN, LMConfig
from model.decoder import count_parameters, rope_tables
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v3_parity"
SOURCES = {"dense": ("dense/sft_vlm_64.pth", "hf/minimind-3v"), "moe": ("moe/sft_vlm_64_moe.pth", "hf/minimind-3v-moe")}
TOL = 1e-4
# Which of images/img0.png, img1.png each case used (one per row; `multi`: both in its one row).
CASE_IMAGES = {"single": [0, 1], "multi": [0, 1], "truncated": [1], "padded": [0, 1], "chat": [0], "train": [0, 1],
               "yarn": [0, 1]}


@pytest.fixture(scope="module")
def encoder():
    return load_vision_encoder(str(FIXTURES / "vision"))


@pytest.fixture(scope="module")
def image_features(encoder) -> torch.Tensor:
    images = [Image.open(FIXTURES / "images" / f"img{i}.png") for i in range(2)]
    return encoder.encode_images(images)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(FIXTURES / "tokenizer"))


def cases(variant: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / variant / "cases.safetensors")


_LOADED: dict = {}


def model_for(variant: str, source: str, tokenizer, **overrides):
    """The fixture model loaded through checkpoints/ (eval mode; loaded once per variant and source)."""
    path = FIXTURES / SOURCES[variant][0 if source == "pth" else 1]
    key = (variant, source, repr(sorted(overrides.items())))
    if key not in _LOADED:
        _LOADED[key] = load_model(str(path), image_ids=image_pad_id(tokenizer), **overrides)
    return _LOADED[key].eval()


def hidden_states(model, ids: torch.Tensor, features, attention_mask=None) -> torch.Tensor:
    h = model.splice_images(model.embed(ids), ids, features)
    return model.run_blocks(h, None, attention_mask)


def test_preprocessing_matches_the_reference_pixels(encoder):
    ref = cases("dense")["single.pixel_values"]
    for row, index in enumerate(CASE_IMAGES["single"]):  # img1 is RGBA: its alpha is dropped, as upstream does
        pixels = encoder.preprocess(Image.open(FIXTURES / "images" / f"img{index}.png"))
        assert pixels.shape == (3, 256, 256)
        torch.testing.assert_close(pixels, ref[row], atol=1e-6, rtol=0)


def test_tower_features_and_projector(encoder, tokenizer):
    ref = cases("dense")
    features = encoder.encode_pixels(ref["single.pixel_values"])
    assert features.shape == (2, 64, 64)  # 8x8 patches, no CLS, after the post-layernorm
    torch.testing.assert_close(features, ref["single.vision_features"], atol=TOL, rtol=0)
    model = model_for("dense", "pth", tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_proj(features), ref["single.vision_tokens"], atol=TOL, rtol=0)


def test_rope_tables_plain_and_yarn():
    ref = cases("dense")
    for name, yarn in (("rope", None), ("yarn", V3_YARN)):
        cos, sin = rope_tables(16, 128, 1e6, yarn=yarn)
        torch.testing.assert_close(torch.cat([cos, cos], -1), ref[f"{name}.freqs_cos"], atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.cat([sin, sin], -1), ref[f"{name}.freqs_sin"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("source", ["pth", "hf"])
@pytest.mark.parametrize("variant", ["dense", "moe"])
@pytest.mark.parametrize("case", ["single", "multi", "truncated", "text", "chat"])
def test_logits_match(variant, source, case, tokenizer, image_features):
    ref = cases(variant)
    model = model_for(variant, source, tokenizer)
    ids = ref[f"{case}.input_ids"]
    features = None if case == "text" else image_features[CASE_IMAGES[case]]
    with torch.no_grad():
        logits = model(ids, features).logits
        hidden = hidden_states(model, ids, features)
    torch.testing.assert_close(logits[:, -8:], ref[f"{case}.logits_last8"], atol=TOL, rtol=0)
    torch.testing.assert_close(hidden, ref[f"{case}.hidden_states"], atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_padded_rows_match_at_their_tokens(variant, tokenizer, image_features):
    """Right padding with an attention mask: every real position matches. Row 1's last 8 positions are padding,
    where upstream's -1e9 mask lets a padding query see only real keys and this network's causal path lets it see
    itself too; nothing reads a padding position (no label, no generation step), so only row 0's logits count."""
    ref = cases(variant)
    model = model_for(variant, "pth", tokenizer)
    ids, mask = ref["padded.input_ids"], ref["padded.attention_mask"]
    features = image_features[CASE_IMAGES["padded"]]
    with torch.no_grad():
        logits = model(ids, features, attention_mask=mask).logits
        hidden = hidden_states(model, ids, features, mask)
    real = mask.bool()
    assert not real[1, -8:].any()
    torch.testing.assert_close(logits[:1, -8:], ref["padded.logits_last8"][:1], atol=TOL, rtol=0)
    torch.testing.assert_close(hidden[real], ref["padded.hidden_states"][real], atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_chat_prompt_and_greedy_answer(variant, tokenizer, image_features):
    ref = cases(variant)
    text = render_chat(tokenizer, [{"role": "user", "content": "<|image_pad|>" * 64 + "\n请描述这张图中的主要物体和场景。"}])
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt == ref["chat.input_ids"][0].tolist()  # the upstream eval prompt, empty <think> block included
    model = model_for(variant, "pth", tokenizer)
    answer = model.generate(ref["chat.input_ids"], image_features[CASE_IMAGES["chat"]], max_new_tokens=12,
                            temperature=0)
    assert answer.tolist() == ref["chat.gen_ids"][:, 93:].tolist()


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_training_loss_and_aux_loss(variant, tokenizer, image_features):
    ref = cases(variant)
    path = FIXTURES / SOURCES[variant][0]
    model = load_model(str(path), image_ids=image_pad_id(tokenizer)).train()
    out = model(ref["train.input_ids"], image_features[CASE_IMAGES["train"]], labels=ref["train.labels"])
    aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
    torch.testing.assert_close(aux.detach(), ref["train.aux_loss"], atol=1e-6, rtol=0)
    if variant == "moe":
        assert float(ref["train.aux_loss"]) > 0
    # the loss trained on is cross-entropy plus the MoE balance loss, as upstream's step adds them
    torch.testing.assert_close(out.loss.detach(), ref["train.loss"] + ref["train.aux_loss"], atol=TOL, rtol=0)


def test_yarn_logits(tokenizer, image_features):
    ref = cases("dense")
    model = model_for("dense", "pth", tokenizer, rope_yarn=V3_YARN)
    features = image_features[CASE_IMAGES["yarn"]]
    with torch.no_grad():
        logits = model(ref["yarn.input_ids"], features).logits
    torch.testing.assert_close(logits[:, -8:], ref["yarn.logits_last8"], atol=TOL, rtol=0)
    plain = model_for("dense", "pth", tokenizer)
    with torch.no_grad():  # and YaRN changes them: the case tests something
        assert (plain(ref["yarn.input_ids"], features).logits[:, -8:] - ref["yarn.logits_last8"]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_config_read_from_the_checkpoint(variant):
    pth, hf = (read_checkpoint(str(FIXTURES / p)) for p in SOURCES[variant])
    for ckpt in (pth, hf):
        assert ckpt.stored["generation"] == "3v"
    config = load_model(str(FIXTURES / SOURCES[variant][0])).config
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (64, 2, 4, 2)
    assert (config.ffn_hidden_dim, config.norm_eps, config.rope_theta, config.use_moe) == \
        (256, 1e-6, 1e6, variant == "moe")
    if variant == "moe":
        assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (4, 1, None)
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    model = load_model(str(FIXTURES / SOURCES[variant][0]))
    assert count_parameters(model) == manifest["variants"][variant]["params_excluding_vision"]


@pytest.mark.parametrize("moe, expected", [(False, 65_094_912), (True, 199_599_360)])
def test_published_sizes(moe, expected):
    """minimind-3v (65M) and minimind-3v-moe (200M-A65M) at 768 hidden, 8 layers, as upstream counts them (the tied
    embedding once, no vision tower)."""
    with torch.device("meta"):
        model = MiniMindVLM(LMConfig.for_generation("3v", dim=768, n_layers=8, use_moe=moe))
    assert model.config.ffn_hidden_dim == 2432
    assert count_parameters(model) == expected
