"""A checkpoint goes with the vision encoder it was trained with: training records it (both stages, every save),
and every tool that loads a checkpoint with an encoder (3-eval_chat.py through VLMChat.load, the API server, the
trainer's start checkpoint and --resume, the export's bundled tower) refuses another one with one line naming
both. The fingerprint decides, not the path; a checkpoint with no record is not checked (and says so)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TOKENIZER_PATH, build_tiny_clip, save_tiny_vlm
from helpers import load_script, make_dataset, run_stage, train_argv
from PIL import Image

from inference.chat import VLMChat
from inference.web_support import parse_args as web_parse_args
from checkpoints.checkpoint import config_path_for, read_checkpoint
from checkpoints.files import CheckpointError
from model.vision import load_vision_encoder
from checkpoints.vision_pairing import VisionEncoderMismatch, encoder_record
from trainer.config import PRETRAIN, SFT


@pytest.fixture(scope="module")
def other_clip(tmp_path_factory) -> Path:
    """Another tiny CLIP with the same feature width (so the weights load) but another depth: the silent case."""
    return build_tiny_clip(tmp_path_factory.mktemp("other_clip") / "tiny_clip_2_layers", layers=2)


def _record(clip: Path) -> dict[str, str]:
    return encoder_record(load_vision_encoder(str(clip)))


def _saved(path: Path, tokenizer, clip: Path | None) -> Path:
    """A tiny checkpoint recording the project's tokenizer and, unless clip is None, the encoder at clip."""
    save_tiny_vlm(path, tokenizer, vision_encoder=_record(clip) if clip is not None else None)
    return path


def _sidecar(path: Path) -> dict:
    return json.loads(config_path_for(path).read_text())


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_clip_dir) -> dict:
    """A pretrain run (1 step, saved) with the tiny CLIP, and the data and flags to chain an SFT run on it."""
    root = tmp_path_factory.mktemp("pairing_train")
    data, images = make_dataset(root, 4)
    out = root / "out"
    run_stage(PRETRAIN, train_argv(data, images, tiny_clip_dir, out, "--max_steps", "1"))
    sft = train_argv(data, images, tiny_clip_dir, out, "--max_steps", "2", "--image_prefix", "")[1:]  # chained
    return {"out": out, "data": data, "images": images, "sft": sft}


def test_training_records_the_encoder_in_every_checkpoint_of_both_stages(pretrained, tiny_clip_dir):
    out, expected = pretrained["out"], _record(tiny_clip_dir)
    assert expected == {"path": str(tiny_clip_dir), "fingerprint": load_vision_encoder(str(tiny_clip_dir)).fingerprint}
    assert _sidecar(out / "64_vlm_pretrain.pth")["vision_encoder"] == expected
    assert read_checkpoint(out / "64_vlm_pretrain.pth").vision_record == expected
    import torch

    resume = torch.load(out / "64_vlm_pretrain_resume.pth", weights_only=True)
    assert resume["vision_encoder"] == expected
    sft_out = out.parent / "sft_out"
    shutil.copytree(out, sft_out)
    argv = [a if a != str(out) else str(sft_out) for a in pretrained["sft"]]
    run_stage(SFT, argv + ["--save_interval", "1", "--val_data", str(pretrained["data"]), "--save_best",
                           "--val_samples", "2"])
    for name in ("64_vlm_sft.pth", "64_vlm_sft_best.pth"):
        assert _sidecar(sft_out / name)["vision_encoder"] == expected, name


def test_sft_from_a_pretrain_checkpoint_of_another_encoder_is_refused_before_the_first_step(pretrained, other_clip,
                                                                                            tiny_clip_dir, capsys):
    import trainer.loop as trainer

    argv = [a if a != str(tiny_clip_dir) else str(other_clip) for a in pretrained["sft"]]
    with pytest.raises(SystemExit) as exit_info:
        trainer.main(SFT, argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert exit_info.value.code == 1 and len(lines) == 1, captured.err
    pretrain = str(pretrained["out"] / "64_vlm_pretrain.pth")
    fingerprints = (_record(tiny_clip_dir)["fingerprint"], _record(other_clip)["fingerprint"])
    assert lines[0].startswith("error: vision encoder mismatch: ") and pretrain in lines[0], lines
    assert str(tiny_clip_dir) in lines[0] and str(other_clip) in lines[0], lines
    assert all(fp in lines[0] for fp in fingerprints) and f"--clip_path {tiny_clip_dir}" in lines[0], lines
    assert "step 1" not in captured.out and not (pretrained["out"] / "64_vlm_sft.pth").exists()


def test_allow_encoder_mismatch_refits_and_records_the_new_encoder(pretrained, other_clip, tiny_clip_dir, tmp_path,
                                                                   caplog):
    out = tmp_path / "out"
    shutil.copytree(pretrained["out"], out)
    argv = [str(out) if a == str(pretrained["out"]) else str(other_clip) if a == str(tiny_clip_dir) else a
            for a in pretrained["sft"]]
    with caplog.at_level(logging.WARNING, logger="minimind"):
        assert run_stage(SFT, argv + ["--allow_encoder_mismatch"])["step"] == 2
    assert "vision encoder mismatch allowed by --allow_encoder_mismatch" in caplog.text
    assert _sidecar(out / "64_vlm_sft.pth")["vision_encoder"] == _record(other_clip)


def test_resume_with_another_encoder_is_refused(pretrained, other_clip, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pretrained["out"], out)
    argv = train_argv(pretrained["data"], pretrained["images"], other_clip, out, "--max_steps", "2", "--resume")
    with pytest.raises(VisionEncoderMismatch, match="64_vlm_pretrain_resume.pth was trained with the vision encoder"):
        run_stage(PRETRAIN, argv)


def test_training_from_an_unrecorded_checkpoint_is_not_checked_and_says_so(pretrained, other_clip, tmp_path, tokenizer,
                                                                           caplog):
    init = _saved(tmp_path / "old.pth", tokenizer, None)
    argv = train_argv(pretrained["data"], pretrained["images"], other_clip, tmp_path / "out", "--max_steps", "1",
                      "--image_prefix", "")[1:]
    with caplog.at_level(logging.INFO, logger="minimind"):
        assert run_stage(SFT, argv + ["--init", str(init)])["step"] == 1
    notes = [r for r in caplog.records if "records no vision encoder" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO and str(init) in notes[0].getMessage(), caplog.text


# ------------------------------------------------------------------------------------------- chat
def test_eval_chat_with_another_encoder_is_a_one_line_error(tmp_path, tokenizer, tiny_clip_dir, other_clip):
    ckpt = _saved(tmp_path / "m.pth", tokenizer, tiny_clip_dir)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    base = [sys.executable, str(ROOT / "3-eval_chat.py"), "--ckpt", str(ckpt), "--clip_path", str(other_clip),
            "--image", str(tmp_path / "red.png"), "--device", "cpu", "--max_new_tokens", "2"]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and "Traceback" not in res.stderr and "[A]" not in res.stdout, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: vision encoder mismatch: "), lines
    assert str(ckpt) in lines[0] and str(tiny_clip_dir) in lines[0] and str(other_clip) in lines[0]
    assert _record(tiny_clip_dir)["fingerprint"] in lines[0] and _record(other_clip)["fingerprint"] in lines[0]
    assert f"pass --clip_path {tiny_clip_dir}" in lines[0] and "--allow_encoder_mismatch" in lines[0]
    allowed = subprocess.run(base + ["--allow_encoder_mismatch"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=180)
    assert allowed.returncode == 0 and "[A]" in allowed.stdout, allowed.stderr[-2000:]
    assert "vision encoder mismatch allowed by --allow_encoder_mismatch" in allowed.stderr


def test_the_same_encoder_at_another_path_is_accepted(tmp_path, tokenizer, tiny_clip_dir):
    ckpt = _saved(tmp_path / "m.pth", tokenizer, tiny_clip_dir)
    copy = shutil.copytree(tiny_clip_dir, tmp_path / "elsewhere" / "clip_copy")
    chat = VLMChat.load(ckpt, str(copy), TOKENIZER_PATH)
    assert chat.encoder.fingerprint == _record(tiny_clip_dir)["fingerprint"]


def test_another_encoder_at_the_recorded_path_is_refused(tmp_path, tokenizer):
    """The demo's case: the stand-in rebuilt in place with another depth; the path is the same, the encoder not."""
    clip = build_tiny_clip(tmp_path / "stand_in")
    ckpt = _saved(tmp_path / "m.pth", tokenizer, clip)
    shutil.rmtree(clip)
    build_tiny_clip(clip, layers=2)
    with pytest.raises(VisionEncoderMismatch, match=f"trained with the vision encoder at '{clip}'"):
        VLMChat.load(ckpt, str(clip), TOKENIZER_PATH)


def test_a_checkpoint_with_no_record_is_not_checked_and_says_so(tmp_path, tokenizer, other_clip, caplog):
    ckpt = _saved(tmp_path / "old.pth", tokenizer, None)
    with caplog.at_level(logging.INFO, logger="minimind"):
        VLMChat.load(ckpt, str(other_clip), TOKENIZER_PATH)
    notes = [r for r in caplog.records if "records no vision encoder" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO and str(ckpt) in notes[0].getMessage()


def test_a_malformed_record_is_a_one_line_error(tmp_path, tokenizer, tiny_clip_dir):
    ckpt = _saved(tmp_path / "m.pth", tokenizer, tiny_clip_dir)
    sidecar = _sidecar(ckpt) | {"vision_encoder": "clip"}
    config_path_for(ckpt).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match=r"m.config.json: vision_encoder is 'clip' \(str\), not an object with "
                                              r"path, fingerprint or null$"):
        read_checkpoint(ckpt)


def test_api_server_with_another_encoder_is_one_line(tmp_path, tokenizer, tiny_clip_dir, other_clip, capsys):
    import serve_openai_api

    ckpt = _saved(tmp_path / "m.pth", tokenizer, tiny_clip_dir)
    assert serve_openai_api.main(["--ckpt", str(ckpt), "--clip_path", str(other_clip), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vision encoder mismatch" in err[0] and str(other_clip) in err[0], err


def test_web_server_flag_reaches_the_loader(tmp_path):
    assert web_parse_args(["--allow_encoder_mismatch"], tmp_path, env={}).allow_encoder_mismatch
    assert not web_parse_args([], tmp_path, env={}).allow_encoder_mismatch


# ------------------------------------------------------------------------------------------- export
def test_export_refuses_to_bundle_another_encoder(tmp_path, tokenizer, tiny_clip_dir, other_clip, capsys):
    export_model = load_script("export_model.py", "export_model_pairing")
    ckpt = _saved(tmp_path / "m.pth", tokenizer, tiny_clip_dir)
    argv = ["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--clip_path", str(other_clip), "--no_verify"]
    assert export_model.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vision encoder mismatch" in err[0] and str(other_clip) in err[0], err
    assert not (tmp_path / "hf").exists()
    assert export_model.main(argv + ["--allow_encoder_mismatch"]) == 0
    assert (tmp_path / "hf" / "vision_encoder" / "config.json").exists()
