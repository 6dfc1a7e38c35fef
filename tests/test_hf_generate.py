"""The export's generate(): a transformers DynamicCache fed one token at a time, padded batches, the image at prefill;
and the weights' decode layout from_pretrained gives them (hf_model.stream_weights)."""
from __future__ import annotations

import pytest
import torch
from conftest import PROJECT_TOKENIZER, TOKENIZER_PATH, tiny_config
from PIL import Image
from safetensors import safe_open

import export_model
from checkpoints.checkpoint import save_checkpoint
from model.vlm import MiniMindVLM, pad_rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer, tiny_clip_dir):
    """(native model, the export loaded through AutoModelForCausalLM, export dir)."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("hfgen")
    torch.manual_seed(0)
    native = MiniMindVLM(tiny_config(tokenizer)).eval()
    save_checkpoint(native, tmp / "tiny.pth", tokenizer=PROJECT_TOKENIZER)
    out = export_model.export(str(tmp / "tiny.pth"), str(tmp / "hf"), TOKENIZER_PATH, str(tiny_clip_dir))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    return native, model, out


def _rows(config):
    gen = torch.Generator().manual_seed(5)
    text = lambda n: torch.randint(100, 6400, (n,), generator=gen).tolist()  # noqa: E731
    span = list(config.image_ids)
    rows = [text(4) + span + text(7), text(6), text(1) + span + text(3), text(13)]
    return rows, torch.randn(2, 50, config.vision_dim, generator=gen), [0, None, 1, None]


def _record_calls(model):
    """Each forward's input length and whether it received image features."""
    calls = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append((kwargs["input_ids"].shape[1], kwargs.get("image_features") is not None,
                                              type(kwargs.get("cache")).__name__)), with_kwargs=True)
    return calls, handle


def test_generate_uses_a_cache_one_token_per_step_and_matches_native_greedy(exported):
    native, model, _ = exported
    rows, features, _ = _rows(native.config)
    ids = torch.tensor([rows[0]])
    expected = native.generate(ids, features[:1], max_new_tokens=8, temperature=0)
    calls, handle = _record_calls(model)
    try:
        out = model.generate(ids, image_features=features[:1], max_new_tokens=8, do_sample=False,
                             eos_token_id=None)
    finally:
        handle.remove()
    assert out[0, ids.shape[1]:].tolist() == expected[0].tolist()
    # the prompt (with its image) once, then one token per step with a DynamicCache and no image
    assert calls[0] == (ids.shape[1], True, "DynamicCache")
    assert calls[1:] == [(1, False, "DynamicCache")] * 7
    # and without the cache the same tokens (every step recomputes, image included)
    again = model.generate(ids, image_features=features[:1], max_new_tokens=8, do_sample=False, eos_token_id=None,
                           use_cache=False)
    assert torch.equal(again, out)


def test_forward_returns_its_cache_for_the_next_step(exported):
    native, model, _ = exported
    rows, features, _ = _rows(native.config)
    ids = torch.tensor([rows[0]])
    with torch.no_grad():
        first = model(input_ids=ids, image_features=features[:1], use_cache=True)
        assert first.cache.get_seq_length() == ids.shape[1]
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=nxt, cache=first.cache)
        full = native(torch.cat([ids, nxt], 1), features[:1]).logits[:, -1]
    assert torch.allclose(step.logits[:, -1], full, atol=1e-5)


def test_left_padded_batch_equals_row_by_row(exported):
    native, model, _ = exported
    rows, features, image_of = _rows(native.config)
    ids, mask = pad_rows(rows, 0, "left")
    out = model.generate(ids, attention_mask=mask, image_features=features, max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    for i, row in enumerate(rows):
        feats = None if image_of[i] is None else features[image_of[i]:image_of[i] + 1]
        alone = native.generate(torch.tensor([row]), feats, max_new_tokens=10, temperature=0)
        assert out[i, ids.shape[1]:].tolist() == alone[0].tolist(), i


def test_right_padded_scoring_masks_padding_in_the_loss(exported):
    native, model, _ = exported
    rows, _, _ = _rows(native.config)
    ids, mask = pad_rows([rows[1], rows[3]], 0, "right")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        ref = native(ids, labels=ids, attention_mask=mask).loss
        unmasked = native(ids, labels=ids).loss
    assert torch.allclose(got, ref, atol=1e-6) and not torch.allclose(got, unmasked, atol=1e-3)


# ---------------------------------------------------------------------------------------------- processor
def _images():
    from PIL import Image

    rgba = Image.new("RGBA", (64, 40), (10, 200, 30, 128))
    noise = Image.frombytes("RGB", (97, 131), bytes((i * 37) % 256 for i in range(97 * 131 * 3)))
    return [Image.new("RGB", (300, 170), (200, 40, 90)), noise, rgba, Image.new("L", (50, 50), 77)]


def test_auto_processor_loads_and_generate_runs_on_its_output(exported, tiny_clip_dir):
    from transformers import AutoProcessor

    from model.vision import load_vision_encoder, to_rgb

    native, model, out = exported
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert type(processor).__name__ == "MiniMindVProcessor"
    image = _images()[1]
    messages = [{"role": "user", "content": "What is in the picture?"}]
    inputs = processor(images=[image], text=messages, return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    ids = inputs["input_ids"]
    assert ids[0].tolist().count(native.config.image_ids[0]) >= 25  # the placeholder span is in the prompt
    encoder = load_vision_encoder(str(tiny_clip_dir))
    assert torch.equal(inputs["pixel_values"][0], encoder.preprocess(to_rgb(image)))

    new = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
    expected = native.generate(ids, encoder.encode_images([image]), max_new_tokens=6, temperature=0)
    assert new[0, ids.shape[1]:].tolist() == expected[0].tolist()
    assert isinstance(processor.batch_decode(new[:, ids.shape[1]:])[0], str)


def test_processor_batches_prompts_and_messages_with_left_padding(exported):
    from transformers import AutoProcessor

    native, _, out = exported
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    prompt = processor.apply_chat_template([{"role": "user", "content": "A much longer question about nothing."}])
    batch = processor(images=_images()[:1], text=[chat, prompt], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padding: every row ends at the last column
    with pytest.raises(ValueError, match="image marker"):
        processor(images=_images()[:2], text=prompt)


def test_exported_clip_image_processor_is_pixel_identical_to_the_native_preprocessing(exported, tiny_clip_dir):
    """preprocessor_config.json configures CLIPImageProcessor to reproduce model.vision.ImagePreprocessor."""
    from transformers import AutoImageProcessor

    from model.vision import load_vision_encoder, to_rgb

    _, _, out = exported
    clip_processor = AutoImageProcessor.from_pretrained(out)
    encoder = load_vision_encoder(str(tiny_clip_dir))
    images = _images()
    pixels = clip_processor(images=images, return_tensors="pt")["pixel_values"]
    for image, got in zip(images, pixels):
        assert torch.allclose(got, encoder.preprocess(to_rgb(image)), atol=1e-5, rtol=0)


def _processor(tokenizer):
    from hf_export.processing_minimind_v import MiniMindVProcessor

    return MiniMindVProcessor(tokenizer)


def test_processor_takes_numpy_arrays_and_tensors_as_it_takes_pil_images(tokenizer):
    """A numpy array or a tensor failed deep inside with AttributeError ('numpy.ndarray' has no 'mode')."""
    import numpy as np

    processor = _processor(tokenizer)
    image = _images()[1]  # 97 x 131 RGB noise
    hwc = np.asarray(image)
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1)
    message = [{"role": "user", "content": "What is it?"}]
    expected = processor(images=image, text=message)["pixel_values"]
    for given in (hwc, chw, chw.float() / 255, torch.from_numpy(hwc.copy()), np.stack([hwc])):
        got = processor(images=given, text=message)["pixel_values"]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    grey = np.full((20, 30), 77, np.uint8)
    torch.testing.assert_close(processor(images=[grey], text=message)["pixel_values"],
                               processor(images=[Image.fromarray(grey)], text=message)["pixel_values"])
    for bad, what in (("cat.png", "a str is not an image"), (hwc.astype(np.float64), "float64 values are not pixels"),
                      (np.zeros((5, 6, 7), np.uint8), r"an array of shape \(5, 6, 7\) is not an image")):
        with pytest.raises(TypeError, match=rf"images\[0\]: {what}; pass PIL images, HxWxC"):
            processor(images=[bad], text=message)


def test_processor_names_an_empty_text_or_an_unknown_role(tokenizer):
    """Both said 'pad_rows needs at least one row, and no empty row'."""
    processor = _processor(tokenizer)
    with pytest.raises(ValueError, match="text row 0 gives no tokens: an empty prompt"):
        processor(text="")
    with pytest.raises(ValueError, match="text row 1 gives no tokens"):
        processor(text=["hello", ""])
    with pytest.raises(ValueError, match="message 0: role 'bot' is not supported .use system, user, assistant."):
        processor(text=[{"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match="messages must be a non-empty list"):
        processor(text=[[{"role": "user", "content": "hi"}], []])


def test_batched_message_lists_get_their_placeholders_as_single_conversations_do(tokenizer):
    """A batch of message lists with images added no placeholder (the marker count did not match); a single
    conversation with two images added one."""
    processor = _processor(tokenizer)
    images = _images()
    chats = [[{"role": "user", "content": "Colour?"}], [{"role": "user", "content": "A longer question, shape?"}]]
    alone = [processor(images=[im], text=chat) for im, chat in zip(images, chats)]
    for batch in (processor(images=images[:2], text=chats), processor(images=[[images[0]], [images[1]]], text=chats)):
        for i, single in enumerate(alone):
            row = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            assert row.tolist() == single["input_ids"][0].tolist(), i
        torch.testing.assert_close(batch["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    both = processor(images=images[:2], text=chats[0])
    assert tokenizer.decode(both["input_ids"][0]).count("<" * 25 + ">" * 25) == 2
    nested = processor(images=[images[:2], []], text=chats)
    row0 = nested["input_ids"][0][nested["attention_mask"][0].bool()]
    assert row0.tolist() == both["input_ids"][0].tolist() and nested["pixel_values"].shape[0] == 2
    with pytest.raises(ValueError, match="text row 1 holds 0 image marker"):
        processor(images=[[images[0]], [images[1]]], text=[chats[0], "a prompt without a marker"])


# ---------------------------------------------------------------------------------------------- decode layout
def _load(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def test_loading_lays_the_weights_out_for_decoding_under_the_native_names(exported):
    native, model, _ = exported
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    assert {type(m).__name__ for m in (attention.wq, attention.wk, attention.wv, ffn.w1, ffn.w3)} == {"StackedLinear"}
    block = attention.wq.weight.untyped_storage().data_ptr()
    assert attention.wk.weight.untyped_storage().data_ptr() == block  # wq, wk, wv: columns of one matrix
    assert ffn.w3.weight.untyped_storage().data_ptr() == ffn.w1.weight.untyped_storage().data_ptr()
    assert attention.wo.weight.stride() == (1, attention.wo.out_features)  # column-major
    assert model.output.weight is model.tok_embeddings.weight and model.output.weight.stride()[0] == 1
    ours, theirs = model.state_dict(), native.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_stacked_projection_is_the_plain_product_and_sees_an_input_changed_in_place(exported):
    _, model, _ = exported
    attention = model.layers[1].attention
    x = torch.randn(2, 3, model.config.dim)
    with torch.no_grad():
        for lin in (attention.wq, attention.wk, attention.wv):
            assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight), atol=1e-6)
        attention.wq(x)
        x.mul_(2)  # the block must not hand out products of the old values
        assert torch.allclose(attention.wk(x), torch.nn.functional.linear(x, attention.wk.weight), atol=1e-6)


def test_training_through_the_loaded_export_reaches_every_projection(exported):
    native, model, _ = exported
    ids = torch.randint(100, 6400, (2, 10), generator=torch.Generator().manual_seed(3))
    for m in (native, model):
        m.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
    try:
        for name in ("layers.0.attention.wk.weight", "layers.1.feed_forward.w3.weight"):
            ours, theirs = model.get_parameter(name).grad, native.get_parameter(name).grad
            assert ours is not None and torch.allclose(ours, theirs, atol=1e-6), name
    finally:
        model.zero_grad(set_to_none=True)
        native.zero_grad(set_to_none=True)


def test_a_cast_model_falls_back_to_plain_products_and_can_be_laid_out_again(exported):
    native, _, out = exported
    model = _load(out).double()
    ids = torch.randint(100, 6400, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = native.double()(ids).logits
        native.float()
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-9)
        wq = model.layers[0].attention.wq
        assert not wq.__dict__["_column_block"].holds(wq.weight)
        model.stream_weights()
        assert wq.__dict__["_column_block"].holds(wq.weight)
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-9)


def test_save_pretrained_of_a_loaded_export_round_trips(exported, tmp_path):
    native, model, out = exported
    model.save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as saved, \
            safe_open(str(out / "model.safetensors"), "pt") as original:
        assert sorted(saved.keys()) == sorted(original.keys())
    assert type(model.layers[0].attention.wq).__name__ == "StackedLinear"  # laid out again after saving
    assert model.layers[0].attention.wq.__dict__["_column_block"].holds(model.layers[0].attention.wq.weight)
    ids = torch.randint(100, 6400, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(_load(tmp_path / "again")(input_ids=ids).logits, native(ids).logits, atol=1e-5)
