"""export_model.py: checkpoint -> transformers directory (AutoModelForCausalLM, remote code) and back."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, tiny_config
from PIL import Image
from safetensors import safe_open

import export_model
from checkpoints.checkpoint import load_model, save_checkpoint, v1_state_dict
from model.config import LMConfig
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM
from checkpoints.weights import read_state_dict


def _tiny_checkpoint(tmp_path, tokenizer, **overrides):
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer, **overrides)).eval()
    path = tmp_path / "tiny.pth"
    save_checkpoint(model, path, tokenizer=PROJECT_TOKENIZER)
    return model, path


def _inputs(model):
    """A text-only batch and a batch with one image placeholder span per row, plus features for it."""
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(100, 6400, (2, 20), generator=gen)
    span = torch.tensor([model.config.image_ids] * 2)
    with_image = torch.cat([text[:, :3], span, text[:, 3:]], dim=1)
    features = torch.randn(2, 50, model.config.vision_dim, generator=gen)
    return text, with_image, features


def _load_export(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)


@pytest.mark.parametrize("overrides", [{}, {"use_moe": True, "vision_proj_bias": True}], ids=["dense", "moe"])
def test_export_loads_with_automodel_and_matches_native_logits(tmp_path, tokenizer, tiny_clip_dir, overrides):
    native, ckpt = _tiny_checkpoint(tmp_path, tokenizer, **overrides)
    out = export_model.export(str(ckpt), str(tmp_path / "hf"), TOKENIZER_PATH, str(tiny_clip_dir))

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "minimind"
    assert config["auto_map"] == {"AutoConfig": "config.LMConfig",
                                  "AutoModelForCausalLM": "hf_model.MiniMindVLMForCausalLM"}
    assert config["image_ids"] == native.config.image_ids
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json", "config.py", "decoder.py",
                 "vlm.py", "hf_model.py", "vision.py", "vision_encoder/config.json"):
        assert (out / name).exists(), name
    # v1 key names; the tied head is stored once, as the embedding
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(native.state_dict()) - {"output.weight"}

    model, info = _load_export(out)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    assert type(model).__name__ == "MiniMindVLMForCausalLM" and not model.training
    assert model.output.weight is model.tok_embeddings.weight
    text, with_image, features = _inputs(native)
    with torch.no_grad():
        for ids, feats in ((text, None), (with_image, features)):
            ref = native(ids, feats).logits
            got = model(input_ids=ids, image_features=feats)
            assert got.logits.shape == ref.shape  # every position
            assert torch.allclose(got.logits, ref, atol=1e-5, rtol=0)
        # labels give the same shifted loss as the native model
        assert torch.allclose(model(input_ids=text, labels=text).loss, native(text, labels=text).loss, atol=1e-5)

    # generate() (full recompute) and generate_stream() (native KV cache) give the native greedy ids
    tokens = native.generate(with_image[:1], features[:1], max_new_tokens=6, temperature=0)
    assert tokenizer.eos_token_id not in tokens[0].tolist()  # else generate() would stop early
    new = model.generate(with_image[:1], image_features=features[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(new[:, with_image.shape[1]:], tokens)
    streamed = list(model.generate_stream(with_image[:1], features[:1], max_new_tokens=6, temperature=0))
    assert torch.equal(torch.stack(streamed, dim=1), tokens)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id

    # pixel_values through the bundled vision tower and the exported image processor equal the native pipeline
    from transformers import AutoImageProcessor

    image = Image.new("RGB", (300, 170), (200, 40, 90))
    pixels = AutoImageProcessor.from_pretrained(out)(images=[image, image], return_tensors="pt")["pixel_values"]
    encoder = load_vision_encoder(str(tiny_clip_dir))
    assert torch.allclose(pixels[0], encoder.preprocess(image), atol=1e-6)
    with torch.no_grad():
        ref = native(with_image, encoder.encode_images([image, image])).logits
        assert torch.allclose(model(input_ids=with_image, pixel_values=pixels).logits, ref, atol=1e-5, rtol=0)


def test_export_without_vision_tower_asks_for_image_features(tmp_path, tokenizer):
    _, ckpt = _tiny_checkpoint(tmp_path, tokenizer)
    out = export_model.export(str(ckpt), str(tmp_path / "hf"), TOKENIZER_PATH, clip_path=None)
    assert not (out / "vision_encoder").exists()
    model, _ = _load_export(out)
    ids = torch.tensor([model.config.image_ids])
    with pytest.raises(ValueError, match="pass image_features"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 224, 224))


def _write_v1_dir(path, model: MiniMindVLM) -> None:
    """A directory laid out like the published v1 release: v1 config fields, pytorch_model.bin, both tied keys,
    and the tokenizer files (here the project's, which the test model was built with)."""
    path.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(TOKENIZER_PATH) / name, path / name)
    c = model.config
    config = {
        "architectures": ["MiniMindVLM"], "model_type": "minimind", "torch_dtype": "float32",
        "transformers_version": "4.44.0", "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads, "vocab_size": c.vocab_size, "hidden_dim": None, "multiple_of": 64,
        "norm_eps": 1e-5, "max_seq_len": c.max_seq_len, "dropout": 0.0, "flash_attn": True,
        "image_special_token": c.image_special_token, "image_ids": [34] * 196,  # a stale field: ignored
        "use_moe": False, "num_experts_per_tok": 2, "n_routed_experts": 4, "n_shared_experts": True,
        "scoring_func": "softmax", "aux_loss_alpha": 0.1, "seq_aux": True, "norm_topk_prob": True,
        "some_field_from_the_future": 1,
    }
    (path / "config.json").write_text(json.dumps(config))
    sd = v1_state_dict(model)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()  # stored separately, equal
    torch.save(sd, path / "pytorch_model.bin")


def test_v1_hf_directory_converts_to_a_loadable_checkpoint(tmp_path, tokenizer):
    torch.manual_seed(0)
    source = MiniMindVLM(tiny_config(tokenizer, vision_proj_bias=True)).eval()
    _write_v1_dir(tmp_path / "v1", source)
    target = tmp_path / "converted.pth"
    assert export_model.main(["--from_hf", str(tmp_path / "v1"), "--to", str(target)]) == 0
    assert target.with_suffix(".config.json").exists()
    assert set(read_state_dict(target)) == set(v1_state_dict(source))
    loaded = load_model(target)
    assert loaded.config.image_ids == source.config.image_ids  # read from the tokenizer, not the stale field
    _, with_image, features = _inputs(source)
    with torch.no_grad():
        assert torch.allclose(loaded(with_image, features[:2]).logits, source(with_image, features[:2]).logits,
                              atol=1e-6)


def test_export_then_import_round_trips_the_weights(tmp_path, tokenizer):
    native, ckpt = _tiny_checkpoint(tmp_path, tokenizer)
    out = export_model.export(str(ckpt), str(tmp_path / "hf"), TOKENIZER_PATH, verify=False)
    back = tmp_path / "back.pth"
    assert export_model.main(["--from_hf", str(out), "--to", str(back)]) == 0
    a, b = read_state_dict(ckpt), read_state_dict(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert LMConfig(**json.loads(back.with_suffix(".config.json").read_text())).n_heads == native.config.n_heads


def test_v1_directory_with_an_untied_head_is_refused(tmp_path, tokenizer, capsys):
    source = MiniMindVLM(tiny_config(tokenizer))
    _write_v1_dir(tmp_path / "v1", source)
    sd = torch.load(tmp_path / "v1" / "pytorch_model.bin", weights_only=True)
    sd["output.weight"] = sd["output.weight"] + 1
    torch.save(sd, tmp_path / "v1" / "pytorch_model.bin")
    assert export_model.main(["--from_hf", str(tmp_path / "v1"), "--to", str(tmp_path / "x.pth")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ties them" in err
    assert not (tmp_path / "x.pth").exists()


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nope.pth"
    proc = subprocess.run([sys.executable, str(ROOT / "export_model.py"), "--ckpt", str(missing),
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "not found" in lines[0], proc.stderr
    assert not (tmp_path / "hf").exists()
