"""The CLIP loader, preprocessing and hooked features, on a tiny random CLIP saved with save_pretrained."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from model.vision import ImagePreprocessor, MissingVisionEncoderError, load_vision_encoder
from data_pipeline.image_decode import ImageError, open_image


def test_loader_features_are_encoder_output_before_post_layernorm(tiny_clip_dir):
    enc = load_vision_encoder(str(tiny_clip_dir))
    full = CLIPModel.from_pretrained(str(tiny_clip_dir))  # the weights really came from the saved directory
    assert torch.equal(enc.tower.embeddings.patch_embedding.weight,
                       full.vision_model.embeddings.patch_embedding.weight)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    images = [Image.new("RGB", (64, 48), (i * 40, 10, 200)) for i in range(3)]
    feats = enc.encode_images(images)
    assert feats.shape == (3, 50, 64)
    pixels = torch.stack([enc.preprocess(im) for im in images])
    with torch.no_grad():
        out = enc.clip(pixel_values=pixels, output_hidden_states=True)
    assert torch.allclose(feats, out.hidden_states[-1], atol=1e-6)
    post_ln = enc.tower.post_layernorm(out.hidden_states[-1])
    assert not torch.allclose(feats, post_ln, atol=1e-3)
    # batched equals one at a time
    assert torch.allclose(enc.encode_images(images[:1]), feats[:1], atol=1e-5)
    enc.train()
    assert not enc.training


def test_missing_clip_dir_says_how_to_get_it(tmp_path):
    with pytest.raises(MissingVisionEncoderError, match="scripts/download.py"):
        load_vision_encoder(str(tmp_path / "nope"))


def test_preprocess_shape_and_normalisation():
    pre = ImagePreprocessor()
    x = pre(Image.new("RGB", (10, 300), (255, 255, 255)))
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 0, 0], (1 - torch.tensor(pre.mean)) / torch.tensor(pre.std), atol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "LA", "1"])
def test_open_image_converts_modes_to_rgb(tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16))
    else:
        img = Image.new(mode, (20, 20))
    path = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = open_image(str(path))
    assert out.mode == "RGB" and out.size == (20, 20)
    if mode == "I;16":
        assert 150 < np.asarray(out)[0, 0, 0] < 160  # 40000/65535 of full scale, not clipped white


def test_open_image_bad_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    for name, reason in [("empty.png", "empty file"), ("text.jpg", "not an image"),
                         ("trunc.png", "truncated"), ("missing.png", "not found")]:
        with pytest.raises(ImageError, match=reason) as err:
            open_image(str(tmp_path / name))
        assert name in str(err.value) and "\n" not in str(err.value)
