"""export_model.py --push_to_hub with the Hub client mocked, and the model card it writes."""
from __future__ import annotations

import json

import huggingface_hub
import pytest
import torch
from conftest import PROJECT_TOKENIZER, TOKENIZER_PATH, tiny_config

import export_model
from checkpoints.checkpoint import save_checkpoint
from model.decoder import count_parameters
from model.vlm import MiniMindVLM


class FakeHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=None):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        FakeHfApi.calls.append(("upload_folder", repo_id, files))


@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(tokenizer)).eval()
    ckpt = tmp_path / "64_vlm_sft.pth"
    save_checkpoint(model, ckpt, tokenizer=PROJECT_TOKENIZER)
    return model, ckpt


def _argv(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--out", str(out), "--tokenizer_path", TOKENIZER_PATH, "--no_verify", *extra]


def test_push_uploads_the_export_with_a_model_card(tmp_path, checkpoint, monkeypatch):
    model, ckpt = checkpoint
    (tmp_path / "64_vlm_sft_run.json").write_text(json.dumps({"stage": "sft", "samples": 123,
                                                               "data_path": "dataset/sft.json", "epochs": 2}))
    (tmp_path / "64_vlm_sft_log.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "epoch": s // 3, "loss": 2.0 / s}) for s in (1, 2, 3, 4, 5, 6)) + "\n")
    (tmp_path / "demo_summary.json").write_text(json.dumps({"accuracy": 0.854, "n": 480, "majority_baseline": 0.25,
                                                            "checkpoint": "out/64_vlm_sft.pth"}))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    out = tmp_path / "hf"
    assert export_model.main(_argv(ckpt, out, "--push_to_hub", "someone/tiny-vlm", "--private")) == 0

    assert FakeHfApi.calls[0] == ("create_repo", "someone/tiny-vlm", True, True, "hf_test_token")
    kind, repo, files = FakeHfApi.calls[1]
    assert (kind, repo) == ("upload_folder", "someone/tiny-vlm")
    assert {"README.md", "config.json", "model.safetensors", "processor_config.json", "hf_model.py"} <= set(files)

    card = (out / "README.md").read_text()
    meta = card.split("---")[1]
    assert "license: apache-2.0" in meta and "pipeline_tag: image-text-to-text" in meta and "tags:" in meta
    assert f"{count_parameters(model):,}" in card
    assert "| dim | 64 |" in card and "| n_layers | 2 |" in card
    assert "dataset/sft.json" in card and "samples: 123" in card and "optimizer steps: 6" in card
    assert "0.854" in card and "480" in card
    assert 'AutoProcessor.from_pretrained("someone/tiny-vlm"' in card


def test_card_without_records_says_so(tmp_path, checkpoint):
    _, ckpt = checkpoint
    out = export_model.export(str(ckpt), str(tmp_path / "hf"), TOKENIZER_PATH, verify=False)
    card = (out / "README.md").read_text()
    assert "No training record was found" in card and "No evaluation figures" in card


def test_no_token_is_a_clear_one_line_error_before_any_work(tmp_path, checkpoint, monkeypatch, capsys):
    _, ckpt = checkpoint
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    assert export_model.main(_argv(ckpt, tmp_path / "hf", "--push_to_hub", "someone/tiny-vlm")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Hugging Face token" in err and "HF_TOKEN" in err
    assert FakeHfApi.calls == [] and not (tmp_path / "hf").exists()
    assert export_model.main(_argv(ckpt, tmp_path / "hf", "--push_to_hub", "no-slash")) == 1
    assert "USER/NAME" in capsys.readouterr().err


def test_hub_failure_is_one_line_and_keeps_the_export(tmp_path, checkpoint, monkeypatch, capsys):
    _, ckpt = checkpoint

    class Failing(FakeHfApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    assert export_model.main(_argv(ckpt, tmp_path / "hf", "--push_to_hub", "someone/tiny-vlm")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "network unreachable" in err
    assert (tmp_path / "hf" / "model.safetensors").exists()
