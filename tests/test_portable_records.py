"""Paths in a checkpoint's records work from any working directory: a checkpoint trained at the project root (its
sidecar records `model/minimind_tokenizer`, as the demo's does) loads from another folder, the fingerprint decides
among the places a relative record may mean, and new records are written project-relative or absolute."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OFFICIAL_TOKENIZER_FIXTURE, PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, save_tiny_vlm

from checkpoints.checkpoint import config_path_for, read_checkpoint
from checkpoints.schema import portable_path, recorded_candidates
from checkpoints.tokenizer import TokenizerError, tokenizer_fingerprint
from checkpoints.tokenizer_pairing import checkpoint_tokenizer, training_tokenizer
from checkpoints.vision_pairing import VisionEncoderMismatch, check_vision_encoder

PROJECT_RELATIVE = "model/minimind_tokenizer"


def trained_at_the_root(path: Path, tokenizer) -> Path:
    """A checkpoint whose sidecar records the tokenizer as a run started at the project root records it."""
    save_tiny_vlm(path, tokenizer)
    sidecar = json.loads(config_path_for(path).read_text())
    sidecar["tokenizer"]["path"] = PROJECT_RELATIVE
    config_path_for(path).write_text(json.dumps(sidecar))
    return path


def test_a_project_relative_record_resolves_from_another_folder(tmp_path, tokenizer, monkeypatch):
    ckpt = trained_at_the_root(tmp_path / "m.pth", tokenizer)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path, fingerprint = checkpoint_tokenizer(read_checkpoint(ckpt))
    assert Path(path).resolve() == Path(TOKENIZER_PATH).resolve()
    assert fingerprint == PROJECT_TOKENIZER["fingerprint"]


def test_the_fingerprint_decides_between_the_places_a_record_may_mean(tmp_path, tokenizer, monkeypatch):
    ckpt = trained_at_the_root(tmp_path / "m.pth", tokenizer)
    monkeypatch.chdir(tmp_path)  # here model/minimind_tokenizer is another vocabulary (the official one)
    shutil.copytree(OFFICIAL_TOKENIZER_FIXTURE, tmp_path / PROJECT_RELATIVE)
    path, _ = checkpoint_tokenizer(read_checkpoint(ckpt))
    assert Path(path).resolve() == Path(TOKENIZER_PATH).resolve()
    # a tokenizer shipped beside the checkpoint, recorded relative to it, is found from anywhere too
    beside = tmp_path / "run"
    shutil.copytree(TOKENIZER_PATH, beside / "tok")
    ckpt = trained_at_the_root(beside / "m.pth", tokenizer)
    sidecar = json.loads(config_path_for(ckpt).read_text())
    config_path_for(ckpt).write_text(json.dumps(sidecar | {"tokenizer": sidecar["tokenizer"] | {"path": "tok"}}))
    assert Path(checkpoint_tokenizer(read_checkpoint(ckpt))[0]).resolve() == (beside / "tok").resolve()


def test_a_record_nowhere_with_its_vocabulary_is_still_refused(tmp_path, tokenizer, monkeypatch):
    ckpt = trained_at_the_root(tmp_path / "m.pth", tokenizer)
    sidecar = json.loads(config_path_for(ckpt).read_text())
    config_path_for(ckpt).write_text(json.dumps(sidecar | {"tokenizer": {"path": "nowhere/tok",
                                                                          "fingerprint": "0" * 64}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer at 'nowhere/tok'.*which is not there"):
        checkpoint_tokenizer(read_checkpoint(ckpt))


def test_records_are_written_project_relative_or_absolute(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(ROOT / "tests")
    assert portable_path("../model/minimind_tokenizer") == PROJECT_RELATIVE
    assert portable_path("some/dir") == "tests/some/dir" and portable_path("/abs/dir") == "/abs/dir"
    ckpt = tmp_path / "m.pth"
    save_tiny_vlm(ckpt, tokenizer, vision_encoder={"path": "../model/clip", "fingerprint": "ab"})
    monkeypatch.chdir(tmp_path)
    assert portable_path("run/tok") == str(tmp_path / "run" / "tok")  # outside the project: absolute
    record = training_tokenizer(None, None)  # from scratch, started outside the project: the project's tokenizer
    assert Path(record["path"]).resolve() == Path(TOKENIZER_PATH).resolve()
    assert read_checkpoint(ckpt).vision_record["path"] == "model/clip"
    assert recorded_candidates("model/clip", str(ckpt))[:2] == ["model/clip", str(ROOT / "model" / "clip")]


def test_the_encoder_hint_names_the_recorded_tower_from_any_folder(tmp_path, tiny_clip_dir, monkeypatch):
    inside = ROOT / "tests" / ".portable_clip_probe"
    try:
        shutil.copytree(tiny_clip_dir, inside)
        monkeypatch.chdir(tmp_path)
        record = {"path": "tests/.portable_clip_probe", "fingerprint": "recorded"}
        with pytest.raises(VisionEncoderMismatch) as err:
            check_vision_encoder(record, {"path": "other", "fingerprint": "loaded"}, "m.pth")
        assert f"pass --clip_path {inside} " in str(err.value)
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def test_eval_chat_loads_a_root_trained_checkpoint_from_another_folder(tmp_path, tokenizer, tiny_clip_dir):
    ckpt = trained_at_the_root(tmp_path / "64_vlm_sft.pth", tokenizer)
    sidecar = json.loads(config_path_for(ckpt).read_text())
    assert sidecar["tokenizer"]["path"] == PROJECT_RELATIVE
    image = tmp_path / "red.png"
    from PIL import Image
    Image.new("RGB", (32, 32), (220, 30, 30)).save(image)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, str(ROOT / "3-eval_chat.py"), "--ckpt", str(ckpt), "--clip_path",
                          str(tiny_clip_dir), "--image", str(image), "--max_new_tokens", "2", "--device", "cpu"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert res.returncode == 0 and "[A]" in res.stdout, (res.stdout[-1500:], res.stderr[-1500:])
    assert tokenizer_fingerprint(TOKENIZER_PATH) == sidecar["tokenizer"]["fingerprint"]
