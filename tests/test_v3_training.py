"""Training minimind-3v with the numbered scripts: from a text-only LLM checkpoint in upstream's layout (as
`llm_768.pth`) through pretraining and SFT to a chat answer, the generation and size read from the start checkpoint,
3v's stage defaults and freezing, the result written as upstream writes it (fp16, upstream key names, no tower keys)
and loading strictly; a resumed 3v run (MoE, aux loss in the loss) equals an uninterrupted one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_stage
from PIL import Image

from checkpoints.checkpoint import config_path_for, load_model, read_checkpoint, v1_state_dict
from checkpoints.tokenizer import (PROJECT_V3_TOKENIZER_PATH, V3_OFFICIAL_TOKENIZER_ENV,
                                   V3_OFFICIAL_TOKENIZER_FINGERPRINT, TokenizerError, tokenizer_fingerprint)
from checkpoints.v3_layout import to_upstream
from inference.chat import GenerationSettings, StreamStats, VLMChat
from model.config import LMConfig
from model.vlm import MiniMindVLM
from trainer.config import PRETRAIN, SFT, ConfigError, RunConfig, build_parser

ROOT = Path(__file__).resolve().parents[1]
V3 = ROOT / "tests" / "fixtures" / "v3_parity"
VISION = str(V3 / "vision")
TOKENIZER = str(V3 / "tokenizer")
DATA = V3 / "data" / "sample_i2t.parquet"


@pytest.fixture()
def data(tmp_path, monkeypatch) -> Path:
    """The 4-row parquet in upstream's format; the official 3v tokenizer (the fixture copy) where a record-less 3v
    checkpoint (llm_64.pth in upstream's layout) looks."""
    monkeypatch.setenv(V3_OFFICIAL_TOKENIZER_ENV, TOKENIZER)
    if not DATA.exists():
        pytest.skip("the 3v data reference (sample_i2t.parquet) is not available")
    return Path(shutil.copy(DATA, tmp_path / "sample_i2t.parquet"))


def write_llm_checkpoint(path: Path, n_layers: int = 3) -> dict[str, torch.Tensor]:
    """A text-only 3v LLM as upstream's llm_{hidden}.pth: upstream names, fp16, no projection, no sidecar."""
    torch.manual_seed(0)
    model = MiniMindVLM(LMConfig.for_generation("3v", dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                                                vision_dim=64, image_ids=[12]))
    sd = {k: v.half() for k, v in to_upstream(v1_state_dict(model)).items() if not k.startswith("vision_proj.")}
    torch.save(sd, path)
    return sd


def common(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--clip_path", VISION, "--out_dir", str(out), "--num_workers", "0",
            "--device", "cpu", "--log_interval", "1", "--max_seq_len", "192", "--batch_size", "2", "--epochs", "1",
            *extra]


def test_pretrain_sft_chat_round_trip_from_an_upstream_llm_checkpoint(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    llm = write_llm_checkpoint(out / "llm_64.pth")
    # no --generation and no size flags: both come from the start checkpoint (upstream's key names, 64 wide)
    summary = run_stage(PRETRAIN, common(data, out, "--init", str(out / "llm_64.pth")))
    assert summary["checkpoint"] == str(out / "pretrain_vlm_64.pth") and summary["step"] == 2
    pretrained = torch.load(out / "pretrain_vlm_64.pth", weights_only=True)
    # 3v pretraining trains the projection only (upstream's --freeze_llm 2)
    assert all(torch.equal(pretrained[k], v) for k, v in llm.items())
    assert {k for k in pretrained if k not in llm} == {f"vision_proj.mlp.{n}.{w}" for n in (0, 1, 3)
                                                      for w in ("weight", "bias")}
    # SFT, chained by upstream's file name: the projection and the first and last blocks (upstream's 1)
    summary = run_stage(SFT, common(data, out, "--generation", "3v", "--dim", "64", "--learning_rate", "1e-2",
                                    "--val_data", str(data), "--val_samples", "1"))
    sft_path = out / "sft_vlm_64.pth"
    sft = torch.load(sft_path, weights_only=True)
    changed = {k for k in sft if not torch.equal(sft[k], pretrained[k])}
    assert any(k.startswith("model.layers.0.") for k in changed) and any(k.startswith("model.layers.2.")
                                                                        for k in changed)
    assert not any(k.startswith(("model.layers.1.", "model.embed_tokens", "model.norm", "lm_head")) for k in changed)
    assert any(k.startswith("vision_proj.") for k in changed)
    # written as upstream's trainer writes it: its key names (those of upstream's own file), fp16, no tower keys
    upstream_keys = set(torch.load(V3 / "dense" / "sft_vlm_64.pth", weights_only=True))
    assert {k for k in sft if ".layers.2." not in k} == upstream_keys
    assert all(v.dtype == torch.float16 for v in sft.values())
    plain = tmp_path / "plain.pth"  # without its sidecar too: read by its key names alone
    shutil.copy(sft_path, plain)
    model = load_model(str(plain), image_ids=[12])
    assert model.config.generation == "3v" and model.config.n_layers == 3
    log = [json.loads(line) for line in (out / "sft_vlm_64_log.jsonl").read_text().splitlines()]
    assert "val_loss" in log[-1]
    chat = VLMChat.load(str(sft_path), VISION)
    stats = StreamStats()
    answer = "".join(chat.stream("What is it?", Image.open(V3 / "images" / "img0.png"), stats=stats,
                                 settings=GenerationSettings(temperature=0, top_k=None, max_new_tokens=5)))
    assert isinstance(answer, str) and 1 <= len(stats.completion_ids) <= 5
    assert read_checkpoint(str(sft_path)).stored["generation"] == "3v"


def test_3v_stage_defaults_apply_where_no_flag_is_given():
    for stage, (lr, seq, freeze, batch) in ((PRETRAIN, (4e-4, 450, 1, 16)), (SFT, (5e-6, 768, 3, 4))):
        config = RunConfig.from_args(build_parser(stage).parse_args(["--generation", "3v"]))
        v3 = config.for_generation(stage, "3v")
        assert (v3.learning_rate, v3.max_seq_len, v3.freeze_llm, v3.batch_size) == (lr, seq, freeze, batch)
        assert (v3.epochs, v3.weight_decay, v3.dim, v3.n_layers, v3.n_heads, v3.n_kv_heads) == (2, 0.01, 768, 8, 8, 4)
        v1 = config.for_generation(stage, "v1")  # v1 keeps its own
        assert (v1.epochs, v1.freeze_llm, v1.dim) == (19, 0, 512)
        told = RunConfig.from_args(build_parser(stage).parse_args(["--epochs", "5", "--freeze_llm", "0",
                                                                   "--dim", "64"]))
        sized = told.for_generation(stage, "3v", {"dim": 128, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2})
        assert (sized.epochs, sized.freeze_llm, sized.dim, sized.n_layers) == (5, 0, 64, 3)  # a flag given wins


def test_a_start_checkpoint_of_the_other_generation_is_refused(data, tmp_path):
    write_llm_checkpoint(tmp_path / "llm_64.pth")
    with pytest.raises(ConfigError, match="--generation v1, but the start checkpoint .*llm_64.pth is a minimind-3v"):
        run_stage(PRETRAIN, common(data, tmp_path / "o", "--generation", "v1", "--init", str(tmp_path / "llm_64.pth")))


def test_a_resumed_3v_moe_run_equals_an_uninterrupted_one(data, tmp_path):
    args = ["--generation", "3v", "--from_scratch", "--tokenizer_path", TOKENIZER, "--dim", "64", "--n_layers",
            "2", "--n_heads", "4", "--n_kv_heads", "2", "--use_moe", "--freeze_llm", "0", "--epochs", "3"]
    full = run_stage(PRETRAIN, common(data, tmp_path / "a", *args, "--max_steps", "5"))
    first = run_stage(PRETRAIN, common(data, tmp_path / "b", *args, "--max_steps", "3"))
    second = run_stage(PRETRAIN, common(data, tmp_path / "b", *args, "--max_steps", "5", "--resume"))
    assert len(full["losses"]) == 5
    assert first["losses"] + second["losses"] == full["losses"]  # exact, CPU fp32
    a, b = (torch.load(p / "pretrain_vlm_64_moe.pth", weights_only=True) for p in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".mlp.experts." in k for k in a) and any(k.endswith("mlp.gate.weight") for k in a)


def test_the_demo_on_3v_names_its_own_stand_in_and_files_and_leaves_v1s_alone():
    import argparse

    from helpers import load_script

    demo = load_script("scripts/demo.py", "demo_script_v3")
    assert demo.stand_in_path(0, None, "3v") == demo.V3_STAND_IN_PATH != demo.stand_in_path(0)
    assert demo.stand_in_path(1, "/tmp/x", "3v") == "/tmp/x/stand_in_siglip2_base_p32_256_1layer"
    v3, v1 = (argparse.Namespace(generation=g, out_dir="out") for g in ("3v", "v1"))
    assert demo.stage_files(v3, {"dim": 128}) == ("out/pretrain_vlm_128", "out/sft_vlm_128")
    assert demo.stage_files(v1, {"dim": 128}) == ("out/128_vlm_pretrain", "out/128_vlm_sft")
    assert "sft_pack" not in demo.V3_PROFILE_CHANGES  # 3v packs questions as v1 does


def test_3v_from_scratch_records_the_projects_3v_tokenizer_and_chats_with_it_only(data, tmp_path):
    summary = run_stage(PRETRAIN, common(data, tmp_path / "o", "--generation", "3v", "--from_scratch", "--dim", "64",
                                         "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2", "--freeze_llm",
                                         "0", "--max_steps", "1"))
    record = json.loads(config_path_for(summary["checkpoint"]).read_text())["tokenizer"]
    assert record == {"path": PROJECT_V3_TOKENIZER_PATH,
                      "fingerprint": tokenizer_fingerprint(str(ROOT / PROJECT_V3_TOKENIZER_PATH))}
    assert record["fingerprint"] != V3_OFFICIAL_TOKENIZER_FINGERPRINT
    chat = VLMChat.load(summary["checkpoint"], VISION)  # the official one is installed (the fixture), not taken
    assert Path(chat.tokenizer_path).resolve() == ROOT / PROJECT_V3_TOKENIZER_PATH
    with pytest.raises(TokenizerError, match=r"^tokenizer mismatch: .*pretrain_vlm_64.pth was trained with "
                                             r"vocabulary .* \(the official minimind-3v tokenizer\)"):
        VLMChat.load(summary["checkpoint"], VISION, TOKENIZER)


def test_training_from_an_upstream_llm_checkpoint_needs_the_official_3v_tokenizer(data, tmp_path, monkeypatch,
                                                                                   capsys):
    from trainer.loop import main

    write_llm_checkpoint(tmp_path / "llm_64.pth")
    monkeypatch.setenv(V3_OFFICIAL_TOKENIZER_ENV, str(tmp_path / "absent"))
    with pytest.raises(SystemExit):
        main(PRETRAIN, common(data, tmp_path / "o", "--init", str(tmp_path / "llm_64.pth")))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llm_64.pth records no tokenizer" in err, err
    assert "`python scripts/download.py --what tokenizer --generation 3v`" in err
    assert not (tmp_path / "o" / "pretrain_vlm_64.pth").exists()
    with pytest.raises(TokenizerError, match="llm_64.pth records no tokenizer, so it needs vocabulary c175c9610720"):
        run_stage(PRETRAIN, common(data, tmp_path / "o", "--init", str(tmp_path / "llm_64.pth"), "--tokenizer_path",
                                   str(ROOT / PROJECT_V3_TOKENIZER_PATH)))  # the project's 3v tokenizer is refused


def test_a_missing_siglip_tower_says_how_to_get_it(data, tmp_path, capsys):
    from trainer.loop import main

    with pytest.raises(SystemExit):
        main(PRETRAIN, common(data, tmp_path / "o", "--generation", "3v", "--from_scratch", "--clip_path",
                              str(tmp_path / "nowhere"), "--dim", "64", "--n_layers", "2"))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "download.py --what clip --generation 3v" in err
    assert "build_stand_in_siglip.py" in err
