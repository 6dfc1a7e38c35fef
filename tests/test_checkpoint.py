"""Checkpoint loading: strict, named errors, LLM-only starts, prefixes, safetensors, config inference."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from checkpoints.checkpoint import config_from_checkpoint, load_model, load_weights, save_checkpoint
from checkpoints.config_inference import infer_config
from checkpoints.files import CheckpointError
from model.vlm import MiniMindVLM
from checkpoints.weights import read_state_dict


def test_llm_only_checkpoint_reports_exactly_the_projection_as_new(tmp_path):
    model = MiniMindVLM(tiny_config())
    llm_sd = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_proj.")}
    torch.save(llm_sd, tmp_path / "64_llm.pth")
    fresh = MiniMindVLM(tiny_config(vision_proj_bias=True))
    report = load_weights(fresh, read_state_dict(tmp_path / "64_llm.pth"), allow_new_projection=True)
    assert report.new_keys == ["vision_proj.vision_proj.0.bias", "vision_proj.vision_proj.0.weight"]
    assert torch.equal(fresh.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight)
    with pytest.raises(CheckpointError, match="missing keys: vision_proj"):
        load_weights(MiniMindVLM(tiny_config()), llm_sd)


def test_wrong_key_or_shape_is_named(tmp_path):
    sd = MiniMindVLM(tiny_config()).state_dict()
    bad = dict(sd)
    bad["layers.0.attention.wq.weightx"] = bad.pop("layers.0.attention.wq.weight")
    with pytest.raises(CheckpointError, match=r"missing keys: layers.0.attention.wq.weight.*"
                                              r"unexpected keys: layers.0.attention.wq.weightx"):
        load_weights(MiniMindVLM(tiny_config()), bad)
    other = MiniMindVLM(tiny_config(dim=128, n_heads=4)).state_dict()
    with pytest.raises(CheckpointError, match=r"shape mismatch: layers.0.attention.wk.weight: file \(64, 128\) vs model \(32, 64\)"):
        load_weights(MiniMindVLM(tiny_config()), other)


def test_prefixes_and_safetensors_and_bias_inference(tmp_path):
    model = MiniMindVLM(tiny_config(vision_proj_bias=True))
    sd = {f"module._orig_mod.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "a.pth")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "output.weight"},
              str(tmp_path / "b.safetensors"))
    for name in ["a.pth", "b.safetensors"]:
        loaded = read_state_dict(tmp_path / name)
        cfg = infer_config(loaded, {"n_heads": 4})
        assert cfg["dim"] == 64 and cfg["n_layers"] == 2 and cfg["n_kv_heads"] == 2 and cfg["vision_proj_bias"]
    # our own saves write a zero bias for an unbiased projection (v1 layout) and read back as unbiased
    unbiased = MiniMindVLM(tiny_config())
    save_checkpoint(unbiased, tmp_path / "c.pth")
    raw = torch.load(tmp_path / "c.pth", weights_only=True)
    assert torch.count_nonzero(raw["vision_proj.vision_proj.0.bias"]) == 0
    cfg, _ = config_from_checkpoint(tmp_path / "c.pth")
    assert cfg.vision_proj_bias is False and cfg.n_heads == 4
    reloaded = load_model(tmp_path / "c.pth")
    ids = torch.randint(0, 6400, (1, 9))
    assert torch.allclose(reloaded(ids).logits, unbiased.eval()(ids).logits)


def test_moe_checkpoint_inference(tmp_path):
    model = MiniMindVLM(tiny_config(use_moe=True))
    save_checkpoint(model, tmp_path / "m.pth")
    cfg, _ = config_from_checkpoint(tmp_path / "m.pth")
    assert cfg.use_moe and cfg.n_routed_experts == 4


def test_corrupt_and_malicious_checkpoints(tmp_path):
    model = MiniMindVLM(tiny_config())
    save_checkpoint(model, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pth: corrupt or truncated"):
        read_state_dict(tmp_path / "trunc.pth")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: refused"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_state_dict(tmp_path / "none.pth")
