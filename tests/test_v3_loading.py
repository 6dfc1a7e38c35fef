"""Loading minimind-3v checkpoints through checkpoints/: the generation comes from the checkpoint (its key names),
its sidecar or its config.json, never from a file name; the published layout loads strictly and a 3v checkpoint
written here is in that layout; the 3v tokenizer and the SigLIP tower are the only partners a 3v checkpoint takes
(and v1 never takes a SigLIP tower)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from checkpoints.checkpoint import config_path_for, load_model, read_checkpoint, save_checkpoint
from checkpoints.files import CheckpointError
from checkpoints.tokenizer import (PROJECT_V3_TOKENIZER_PATH, V3_OFFICIAL_TOKENIZER_ENV,
                                   V3_OFFICIAL_TOKENIZER_FINGERPRINT, TokenizerError, image_pad_id, image_placeholder,
                                   load_tokenizer, tokenizer_fingerprint, tokenizer_record)
from checkpoints.tokenizer_pairing import checkpoint_tokenizer
from checkpoints.v3_layout import to_native, to_upstream
from checkpoints.vision_pairing import VisionEncoderMismatch, check_encoder_family
from checkpoints.weights import read_state_dict
from model.config import LMConfig
from model.vision import load_vision_encoder
from model.vlm import ImageSpliceError, MiniMindVLM
from conftest import OFFICIAL_TOKENIZER_FIXTURE, ROOT, save_tiny_vlm

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v3_parity"
DENSE_PTH = FIXTURES / "dense" / "sft_vlm_64.pth"
MOE_PTH = FIXTURES / "moe" / "sft_vlm_64_moe.pth"
V3_TOKENIZER = str(FIXTURES / "tokenizer")  # the official minimind-3v tokenizer (a copy for tests)
PROJECT_V3 = str(ROOT / PROJECT_V3_TOKENIZER_PATH)  # the project's own 3v-style tokenizer


def tiny_v3(**fields) -> MiniMindVLM:
    torch.manual_seed(0)
    config = LMConfig.for_generation("3v", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vision_dim=64,
                                     image_ids=[12], **fields)
    return MiniMindVLM(config).eval()


def test_published_layout_round_trips_and_every_key_has_a_name():
    for path in (DENSE_PTH, MOE_PTH):
        sd = read_state_dict(path)
        assert all(v.dtype == torch.float16 for v in sd.values())
        assert not any(k.startswith("vision_encoder.") for k in sd)
        assert to_upstream(to_native(sd, str(path))).keys() == sd.keys()


@pytest.mark.parametrize("path", [DENSE_PTH, MOE_PTH])
def test_published_pth_loads_strictly(path, tmp_path):
    model = load_model(str(path))
    assert model.config.generation == "3v"
    sd = read_state_dict(path)
    extra = tmp_path / "extra.pth"
    torch.save({**sd, "model.layers.0.mlp.bogus.weight": torch.zeros(2)}, extra)
    with pytest.raises(CheckpointError, match="not a key of a minimind-3v checkpoint"):
        read_checkpoint(str(extra))
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_norm.weight"}, missing)
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.1\.attention\.k_norm\.weight"):
        load_model(str(missing))


@pytest.mark.parametrize("moe", [False, True])
def test_a_3v_checkpoint_saved_here_is_in_the_upstream_layout(moe, tmp_path):
    model = tiny_v3(use_moe=moe)
    path = tmp_path / "anything.pth"
    save_checkpoint(model, path)
    upstream = read_state_dict(MOE_PTH if moe else DENSE_PTH)
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == upstream.keys()
    assert json.loads(config_path_for(path).read_text())["generation"] == "3v"
    again = load_model(str(path))
    ids = torch.tensor([[5, 12, 12, 7]])
    features = torch.randn(1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, features).logits, model(ids, features).logits)


def test_generation_comes_from_the_checkpoint_never_the_file_name(tmp_path, tokenizer):
    v3_named_v1 = tmp_path / "sft_vlm_64_3v.pth"  # a v1 checkpoint whose name says 3v
    save_tiny_vlm(v3_named_v1, tokenizer)
    assert load_model(str(v3_named_v1)).config.generation == "v1"
    v1_named_v3 = tmp_path / "v1_model.pth"  # the published 3v file under a v1-looking name, no sidecar
    shutil.copy(DENSE_PTH, v1_named_v3)
    assert load_model(str(v1_named_v3)).config.generation == "3v"


def test_a_sidecar_naming_the_other_generation_is_refused(tmp_path, tokenizer):
    path = tmp_path / "m.pth"
    save_tiny_vlm(path, tokenizer)
    sidecar = json.loads(config_path_for(path).read_text()) | {"generation": "3v"}
    config_path_for(path).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match=r"m.pth: its config says generation '3v', but its weights have the "
                                              r"v1 \(tok_embeddings...\) key names"):
        read_checkpoint(str(path))
    sidecar["generation"] = "4v"
    config_path_for(path).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="generation"):
        read_checkpoint(str(path))


def test_hf_directory_is_read_without_importing_its_code():
    ckpt = read_checkpoint(str(FIXTURES / "hf" / "minimind-3v-moe"))
    assert ckpt.stored["generation"] == "3v" and ckpt.stored["use_moe"] is True
    assert ckpt.tokenizer_dir == str(FIXTURES / "hf" / "minimind-3v-moe")
    with pytest.raises(RuntimeError, match="never import"):  # the reason it must not be imported
        exec(compile((FIXTURES / "hf" / "minimind-3v-moe" / "model_vlm.py").read_text(), "model_vlm.py", "exec"), {})


def test_hf_directory_with_unsupported_settings_is_refused(tmp_path):
    copy = tmp_path / "hf"
    shutil.copytree(FIXTURES / "hf" / "minimind-3v", copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match=r"hidden_act = 'gelu' is not supported"):
        read_checkpoint(str(copy))


def test_unrecorded_3v_checkpoint_pairs_with_the_official_3v_tokenizer(tmp_path, monkeypatch):
    assert tokenizer_fingerprint(V3_TOKENIZER) == V3_OFFICIAL_TOKENIZER_FINGERPRINT
    ckpt = read_checkpoint(str(DENSE_PTH))
    monkeypatch.setenv(V3_OFFICIAL_TOKENIZER_ENV, V3_TOKENIZER)
    assert checkpoint_tokenizer(ckpt) == (V3_TOKENIZER, V3_OFFICIAL_TOKENIZER_FINGERPRINT)
    for wrong in (OFFICIAL_TOKENIZER_FIXTURE, PROJECT_V3):  # v1's official one, and the project's own 3v-style one
        with pytest.raises(TokenizerError, match=r"^tokenizer mismatch: .*sft_vlm_64.pth records no tokenizer, so "
                                                 r"it needs vocabulary c175c9610720 \(the official minimind-3v "
                                                 r"tokenizer\), but the tokenizer at '" + re.escape(wrong)):
            checkpoint_tokenizer(ckpt, explicit=wrong)


@pytest.mark.parametrize("published", [DENSE_PTH, MOE_PTH])
def test_an_unrecorded_3v_checkpoint_without_the_official_tokenizer_says_how_to_get_it(published, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv(V3_OFFICIAL_TOKENIZER_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(TokenizerError) as err:
        checkpoint_tokenizer(read_checkpoint(str(published)))
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(published))
    assert "official minimind-3v tokenizer at model/minimind_3v_tokenizer_official, which is missing" in message
    assert "`python scripts/download.py --what tokenizer --generation 3v`" in message


def test_a_3v_checkpoint_trained_with_the_projects_3v_tokenizer_goes_with_it_only(tmp_path, monkeypatch):
    monkeypatch.setenv(V3_OFFICIAL_TOKENIZER_ENV, V3_TOKENIZER)  # installed, and still not taken
    path = tmp_path / "ours.pth"
    save_checkpoint(tiny_v3(), path, tokenizer=tokenizer_record(PROJECT_V3))
    ckpt = read_checkpoint(str(path))
    project_fingerprint = tokenizer_fingerprint(PROJECT_V3)
    assert project_fingerprint != V3_OFFICIAL_TOKENIZER_FINGERPRINT
    found, fingerprint = checkpoint_tokenizer(ckpt)  # the record is project-relative
    assert Path(found).resolve() == Path(PROJECT_V3).resolve() and fingerprint == project_fingerprint
    with pytest.raises(TokenizerError, match=r"^tokenizer mismatch: .*ours.pth was trained with vocabulary "
                                             + project_fingerprint[:12] + r", but the tokenizer at .* has vocabulary "
                                             r"c175c9610720 \(the official minimind-3v tokenizer\)"):
        checkpoint_tokenizer(ckpt, explicit=V3_TOKENIZER)
    # and the other way round: one trained with the official 3v tokenizer refuses the project's
    official = tmp_path / "official.pth"
    save_checkpoint(tiny_v3(), official, tokenizer=tokenizer_record(V3_TOKENIZER))
    with pytest.raises(TokenizerError, match=r"official.pth was trained with vocabulary c175c9610720 \(the official "
                                             r"minimind-3v tokenizer\), but the tokenizer at '.*minimind_3v_tokenizer'"):
        checkpoint_tokenizer(read_checkpoint(str(official)), explicit=PROJECT_V3)


@pytest.mark.parametrize("path", [V3_TOKENIZER, PROJECT_V3], ids=["official", "project"])
def test_image_pad_id_and_placeholder(tokenizer, path):
    v3 = load_tokenizer(path)
    assert image_pad_id(v3) == [12]
    assert v3(image_placeholder("3v"), add_special_tokens=False)["input_ids"] == [12] * 64
    with pytest.raises(TokenizerError, match="not a minimind-3v tokenizer"):
        image_pad_id(tokenizer)  # the project's v1-style tokenizer splits <|image_pad|>


def test_tower_families_pair_only_with_their_generation(tiny_clip_dir):
    siglip = load_vision_encoder(str(FIXTURES / "vision"))
    clip = load_vision_encoder(str(tiny_clip_dir))
    assert (siglip.kind, clip.kind) == ("siglip", "clip")
    check_encoder_family("3v", siglip, "a.pth")
    check_encoder_family("v1", clip, "b.pth")
    with pytest.raises(VisionEncoderMismatch, match=r"a.pth is a minimind-3v checkpoint, which needs a SigLIP2 "
                                                    r"vision tower, but the one loaded from .* is CLIP"):
        check_encoder_family("3v", clip, "a.pth")
    with pytest.raises(VisionEncoderMismatch, match=r"b.pth is a v1 checkpoint, which needs a CLIP vision tower"):
        check_encoder_family("v1", siglip, "b.pth")


def test_image_runs_splice_and_their_errors():
    model = tiny_v3()
    one, two = torch.randn(1, 64, 64), torch.randn(2, 64, 64)
    ids = torch.tensor([[3] + [12] * 64 + [4] + [12] * 64])
    with torch.no_grad():
        assert model(ids, two).logits.shape == (1, 130, 6400)
        with pytest.raises(ImageSpliceError, match=r"2 image placeholder run\(s\) but 1 image\(s\) given"):
            model(ids, one)
        with pytest.raises(ImageSpliceError, match="a run of 128 image placeholder tokens, more than one image's 64"):
            model(torch.tensor([[3] + [12] * 128]), two)
        # a cut run takes the first rows of its image: the same as the full run's first positions
        full, cut = model(ids[:, :66], one).logits, model(ids[:, :30], one).logits
        torch.testing.assert_close(cut, full[:, :30], atol=1e-5, rtol=0)
