"""The published MiniMind-V v1 path as a new user runs it: a Hugging Face model directory, a bare v1 .pth, the full
CLIP release, and the official tokenizer, which no checkpoint may ever be paired against by mistake.

The published layouts are built here with the project's own code from a tiny random model (stand-ins for the real
27M/109M weights, which are not downloaded in tests); the official tokenizer is the real one (tests/fixtures).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_TOKENIZER_FIXTURE, ROOT, TOKENIZER_PATH, tiny_config
from helpers import load_script, make_dataset, run_stage, train_argv
from PIL import Image

from inference.chat import GenerationSettings, VLMChat
from inference.model_files import newest_chat_checkpoint
from checkpoints.checkpoint import read_checkpoint, save_checkpoint, v1_state_dict
from checkpoints.tokenizer import (OFFICIAL_TOKENIZER_ENV, OFFICIAL_TOKENIZER_FINGERPRINT, TokenizerError, load_tokenizer,
                             tokenizer_fingerprint, tokenizer_record)
from model.vision import load_vision_encoder
from model.vlm import MiniMindVLM
from trainer.config import PRETRAIN, SFT

GREEDY = GenerationSettings(temperature=0.0, top_k=None, max_new_tokens=12, seed=0)
# The directory's model.py / LMConfig.py: importing either one writes this marker, then fails.
TRAP = ("import pathlib\npathlib.Path({marker!r}).write_text('imported')\n"
        "raise RuntimeError('the downloaded model code was imported')\n")


# ------------------------------------------------------------------------------------------ published layouts
def build_full_clip(path: Path) -> Path:
    """A tiny full CLIPModel (text + vision towers) laid out like openai/clip-vit-base-patch32: pytorch_model.bin
    (a pickle), config.json with model_type clip, preprocessor_config.json and the tokenizer files."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=32)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    torch.save(CLIPModel(cfg).state_dict(), path / "pytorch_model.bin")
    (path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}))
    (path / "vocab.json").write_text(json.dumps({"a</w>": 0, "b</w>": 1}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    return path


def write_v1_model_dir(path: Path, model: MiniMindVLM, marker: Path) -> Path:
    """v1's export layout: config.json (v1 fields, auto_map to its own code), pytorch_model.bin (pickle, both tied
    keys), the official tokenizer files, and model.py / LMConfig.py that must never be imported."""
    path.mkdir(parents=True)
    c = model.config
    config = {"architectures": ["Transformer"], "auto_map": {"AutoConfig": "LMConfig.LMConfig",
                                                             "AutoModelForCausalLM": "model.Transformer"},
              "model_type": "minimind", "torch_dtype": "float32", "transformers_version": "4.44.0",
              "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "vocab_size": c.vocab_size, "hidden_dim": None, "multiple_of": 64, "norm_eps": 1e-5,
              "max_seq_len": c.max_seq_len, "dropout": 0.0, "flash_attn": True,
              "image_special_token": c.image_special_token, "image_ids": [30] * 25 + [32] * 25, "use_moe": False,
              "num_experts_per_tok": 2, "n_routed_experts": 4, "n_shared_experts": True, "scoring_func": "softmax",
              "aux_loss_alpha": 0.01, "seq_aux": True, "norm_topk_prob": True}
    (path / "config.json").write_text(json.dumps(config))
    sd = v1_state_dict(model)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    torch.save(sd, path / "pytorch_model.bin")
    for name in ("model.py", "LMConfig.py"):
        (path / name).write_text(TRAP.format(marker=str(marker)))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(Path(OFFICIAL_TOKENIZER_FIXTURE) / name, path / name)
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A published-looking project root: minimind-v-v1-small/ (model dir), out/64_vlm_sft.pth (plain torch.save,
    no sidecar), model/clip_model/clip-vit-base-patch32 (full CLIP), and the in-memory model they came from."""
    root = tmp_path_factory.mktemp("published")
    official = load_tokenizer(OFFICIAL_TOKENIZER_FIXTURE)
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(official, max_seq_len=256, vision_proj_bias=True)).eval()
    marker = root / "IMPORTED"
    model_dir = write_v1_model_dir(root / "minimind-v-v1-small", model, marker)
    (root / "out").mkdir()
    pth = root / "out" / "64_vlm_sft.pth"
    torch.save(v1_state_dict(model), pth)
    clip = build_full_clip(root / "model" / "clip_model" / "clip-vit-base-patch32")
    images = root / "eval_images"
    images.mkdir()
    Image.new("RGB", (48, 40), (200, 40, 40)).save(images / "red.png")
    return {"root": root, "model": model, "dir": model_dir, "pth": pth, "clip": clip, "marker": marker,
            "images": images, "tokenizer": official}


@pytest.fixture
def official_installed(monkeypatch):
    monkeypatch.setenv(OFFICIAL_TOKENIZER_ENV, OFFICIAL_TOKENIZER_FIXTURE)


@pytest.fixture
def official_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(OFFICIAL_TOKENIZER_ENV, str(tmp_path / "no_official_tokenizer"))


def assert_not_imported(published) -> None:
    assert not published["marker"].exists()
    assert not any(getattr(m, "__file__", None) and str(published["dir"]) in str(m.__file__)
                   for m in list(sys.modules.values()))


# ------------------------------------------------------------------------------------------ tokenizer identity
def test_official_fingerprint_is_of_the_vocabulary_not_the_file_bytes(tmp_path):
    assert tokenizer_fingerprint(OFFICIAL_TOKENIZER_FIXTURE) == OFFICIAL_TOKENIZER_FINGERPRINT
    load_tokenizer(OFFICIAL_TOKENIZER_FIXTURE).save_pretrained(tmp_path / "resaved")  # rewrites the files
    assert (tmp_path / "resaved" / "tokenizer.json").read_bytes() != \
        (Path(OFFICIAL_TOKENIZER_FIXTURE) / "tokenizer.json").read_bytes()
    assert tokenizer_fingerprint(str(tmp_path / "resaved")) == OFFICIAL_TOKENIZER_FINGERPRINT
    assert tokenizer_fingerprint(TOKENIZER_PATH) != OFFICIAL_TOKENIZER_FINGERPRINT  # the project's own


def test_project_and_official_vocabularies_agree_on_only_259_ids():
    def by_id(path):
        vocab = json.loads((Path(path) / "tokenizer.json").read_text())["model"]["vocab"]
        return {i: token for token, i in vocab.items()}

    project, official = by_id(TOKENIZER_PATH), by_id(OFFICIAL_TOKENIZER_FIXTURE)
    assert len(project) == len(official) == 6400
    assert sum(project[i] == official[i] for i in range(6400)) == 259  # the number the README quotes


def test_sidecar_records_the_tokenizer(tmp_path, tokenizer):
    save_checkpoint(MiniMindVLM(tiny_config(tokenizer)), tmp_path / "m.pth", tokenizer=tokenizer_record(TOKENIZER_PATH))
    sidecar = json.loads((tmp_path / "m.config.json").read_text())
    assert sidecar["tokenizer"] == {"path": TOKENIZER_PATH, "fingerprint": tokenizer_fingerprint(TOKENIZER_PATH)}
    assert read_checkpoint(tmp_path / "m.pth").tokenizer_record == sidecar["tokenizer"]


# ------------------------------------------------------------------------------------------ loading
def test_full_clip_release_loads_its_vision_tower(published):
    encoder = load_vision_encoder(str(published["clip"]))
    from transformers import CLIPModel

    full = torch.load(published["clip"] / "pytorch_model.bin", weights_only=True)
    assert any(k.startswith("text_model.") for k in full)  # the text tower is in the file ...
    kept = encoder.clip.state_dict()
    assert not any("text_model" in k for k in kept)  # ... and dropped on load
    for key, value in kept.items():
        assert torch.equal(value, full[key if key in full else f"vision_model.{key}"]), key
    assert encoder.encode_images([Image.new("RGB", (30, 30))]).shape == (1, 50, 64)
    assert CLIPModel  # (the class the files describe; never instantiated here)


def test_directory_pth_and_memory_give_equal_greedy_answers(published, official_installed):
    encoder = load_vision_encoder(str(published["clip"]))
    image = Image.open(published["images"] / "red.png").convert("RGB")
    answers = {}
    for name, ckpt in (("dir", published["dir"]), ("pth", published["pth"])):
        chat = VLMChat.load(ckpt, str(published["clip"]))
        assert tokenizer_fingerprint(chat.tokenizer_path) == OFFICIAL_TOKENIZER_FINGERPRINT
        answers[name] = "".join(chat.stream("What is in the picture?", image, (), GREEDY))
    in_memory = VLMChat(published["model"], published["tokenizer"], encoder)
    answers["memory"] = "".join(in_memory.stream("What is in the picture?", image, (), GREEDY))
    assert answers["memory"] and answers["dir"] == answers["pth"] == answers["memory"]
    assert_not_imported(published)


def test_unrecorded_pth_without_the_official_tokenizer_is_a_one_line_error(published, tmp_path):
    env = {**os.environ, OFFICIAL_TOKENIZER_ENV: str(tmp_path / "nothing_here"), "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run([sys.executable, str(ROOT / "3-eval_chat.py"), "--ckpt", str(published["pth"]),
                          "--clip_path", str(published["clip"]), "--image", str(published["images"]),
                          "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and "Traceback" not in res.stderr and "[A]" not in res.stdout, res.stderr[-2000:]
    assert len(lines) == 1 and str(published["pth"]) in lines[0], lines
    assert "python scripts/download.py --what tokenizer" in lines[0] and "model/minimind_tokenizer_official" in lines[0]


@pytest.mark.parametrize("which", ["pth", "dir"])
def test_an_explicit_wrong_tokenizer_is_a_one_line_mismatch(published, official_installed, which, capsys):
    eval_chat = _eval_chat()
    code = eval_chat.main(["--ckpt", str(published[which]), "--clip_path", str(published["clip"]),
                           "--tokenizer_path", TOKENIZER_PATH, "--image", str(published["images"]), "--device", "cpu"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and "[A]" not in out and len(lines) == 1, lines
    assert "tokenizer mismatch" in lines[0] and str(published[which]) in lines[0] and TOKENIZER_PATH in lines[0]
    assert OFFICIAL_TOKENIZER_FINGERPRINT[:12] in lines[0] and tokenizer_fingerprint(TOKENIZER_PATH)[:12] in lines[0]


def test_recorded_checkpoint_with_another_tokenizer_is_refused(tmp_path, tokenizer, official_installed):
    save_checkpoint(MiniMindVLM(tiny_config(tokenizer)), tmp_path / "m.pth", tokenizer=tokenizer_record(TOKENIZER_PATH))
    with pytest.raises(TokenizerError, match="tokenizer mismatch: .*m.pth was trained with vocabulary"):
        VLMChat.load(tmp_path / "m.pth", "unused-clip", OFFICIAL_TOKENIZER_FIXTURE)


def _eval_chat():
    return load_script("3-eval_chat.py", "eval_chat")


def test_eval_chat_with_no_flags_picks_the_newest_and_says_which(published, official_installed, monkeypatch,
                                                                  capsys):
    root = published["root"]
    os.utime(published["pth"], (1, 1))  # the published directory is newer
    assert newest_chat_checkpoint(root / "out", root) == published["dir"]
    eval_chat = _eval_chat()
    monkeypatch.setattr(eval_chat, "ROOT", str(root))
    monkeypatch.setattr(eval_chat, "DEFAULT_CLIP_PATH", str(published["clip"]), raising=False)
    code = eval_chat.main(["--out_dir", str(root / "out"), "--clip_path", str(published["clip"]),
                           "--image", str(published["images"]), "--max_new_tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"model: {published['dir']} (the newest SFT checkpoint or model directory found" in out
    assert "[Image]: red.png" in out and "[A]: " in out
    assert_not_imported(published)


def test_export_and_reverse_accept_the_published_directory(published, official_installed, tmp_path):
    import export_model

    out = export_model.export(str(published["dir"]), str(tmp_path / "hf"), verify=False)
    assert tokenizer_fingerprint(str(out)) == OFFICIAL_TOKENIZER_FINGERPRINT
    assert export_model.main(["--from_hf", str(published["dir"]), "--to", str(tmp_path / "back.pth")]) == 0
    record = json.loads((tmp_path / "back.config.json").read_text())["tokenizer"]
    assert record["fingerprint"] == OFFICIAL_TOKENIZER_FINGERPRINT
    assert_not_imported(published)


def test_api_server_without_the_official_tokenizer_is_one_line(published, official_missing, capsys):
    import serve_openai_api

    assert serve_openai_api.main(["--ckpt", str(published["pth"]), "--clip_path", str(published["clip"])]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--what tokenizer" in err[0], err


# ------------------------------------------------------------------------------------------ training

def test_training_from_an_unrecorded_checkpoint_needs_the_official_tokenizer(published, tmp_path, monkeypatch,
                                                                              capsys):
    data, images = make_dataset(tmp_path, 4)
    out = tmp_path / "out"
    argv = train_argv(data, images, published["clip"], out, "--max_steps", "1")[1:]  # no --from_scratch
    argv += ["--init", str(published["pth"]), "--max_seq_len", "160"]
    monkeypatch.setenv(OFFICIAL_TOKENIZER_ENV, str(tmp_path / "absent"))
    with pytest.raises(SystemExit):
        import trainer.loop as trainer

        trainer.main(PRETRAIN, argv)
    err = capsys.readouterr()
    assert "--what tokenizer" in err.err and "step 1" not in err.out and not out.joinpath("64_vlm_pretrain.pth").exists()

    monkeypatch.setenv(OFFICIAL_TOKENIZER_ENV, OFFICIAL_TOKENIZER_FIXTURE)
    run_stage(PRETRAIN, argv)
    record = json.loads((out / "64_vlm_pretrain.config.json").read_text())["tokenizer"]
    assert record["fingerprint"] == OFFICIAL_TOKENIZER_FINGERPRINT
    # the chained stage checks the record before its first step
    sft = train_argv(data, images, published["clip"], out, "--max_steps", "1", "--max_seq_len", "160",
                     "--image_prefix", "")[1:]
    with pytest.raises(TokenizerError, match="tokenizer mismatch: .*64_vlm_pretrain.pth"):
        run_stage(SFT, sft + ["--tokenizer_path", TOKENIZER_PATH])
    assert not (out / "64_vlm_sft.pth").exists()
    # a resumed run checks its resume checkpoint's record
    with pytest.raises(TokenizerError, match="64_vlm_pretrain_resume.pth was trained with"):
        run_stage(PRETRAIN, ["--from_scratch", *argv, "--tokenizer_path", TOKENIZER_PATH, "--resume"])


def test_training_from_a_model_directory(published, tmp_path, official_installed):
    data, images = make_dataset(tmp_path, 4)
    out = tmp_path / "out"
    argv = train_argv(data, images, published["clip"], out, "--max_steps", "1", "--max_seq_len", "160",
                      "--image_prefix", "")[1:]
    summary = run_stage(SFT, argv + ["--init", str(published["dir"])])
    assert summary["step"] == 1
    record = json.loads((out / "64_vlm_sft.config.json").read_text())["tokenizer"]
    assert record["fingerprint"] == OFFICIAL_TOKENIZER_FINGERPRINT
    assert_not_imported(published)


# ------------------------------------------------------------------------------------------ the web demo
def test_web_picker_lists_model_directories_first(published, tmp_path):
    import web_server

    found = web_server.list_checkpoints(str(published["root"] / "out"), (published["root"],))
    assert [c.name for c in found] == ["minimind-v-v1-small/", "64_vlm_sft.pth"]
    assert found[0].path == str(published["dir"]) and found[0].size_mb > 0
    assert web_server.checkpoint_stamp(str(published["dir"]))[1] == (published["dir"] / "pytorch_model.bin").stat().st_size
    assert web_server.list_checkpoints(str(tmp_path / "none"), (tmp_path,)) == []


def test_web_demo_opens_on_the_published_directory(published, tmp_path, monkeypatch, official_missing):
    from streamlit.testing.v1 import AppTest

    out = tmp_path / "out"
    shutil.copytree(published["dir"], out / "minimind-v-v1-small")
    shutil.copy(published["pth"], out / "64_vlm_sft.pth")
    monkeypatch.setenv("MINIMIND_OUT_DIR", str(out))
    monkeypatch.setenv("MINIMIND_CLIP_PATH", str(published["clip"]))
    monkeypatch.setenv("MINIMIND_DEVICE", "cpu")
    at = AppTest.from_file(str(ROOT / "web_server.py"), default_timeout=60)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.sidebar.selectbox(key="checkpoint").value.startswith("minimind-v-v1-small/")
    assert at.title[0].value.startswith("MiniMind-V (0.")
    # the bare .pth has no tokenizer of its own, and the official one is not installed: a one-line page error
    at.sidebar.selectbox(key="checkpoint").set_value(at.sidebar.selectbox(key="checkpoint").options[1])
    at.run()
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and "--what tokenizer" in errors[0] and "\n" not in errors[0], errors
    assert not (published["root"] / "IMPORTED").exists()


def test_python_web_server_starts_streamlit(tmp_path):
    from helpers import free_port, stop_process

    import web_server

    assert web_server.split_flags(["--out_dir", "o", "--server.port", "9", "--server.headless=true", "--device",
                                   "cpu"]) == (["--server.port", "9", "--server.headless=true"],
                                               ["--out_dir", "o", "--device", "cpu"])
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "web_server.py"), "--server.port", str(port),
                             "--server.headless", "true", "--out_dir", str(tmp_path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        import time

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.5)
        else:
            pytest.fail("streamlit did not start")
    finally:
        stop_process(proc)


def test_eval_chat_asks_about_several_images_in_an_interactive_chat(published, official_installed, monkeypatch,
                                                                    tmp_path, capsys):
    blue = tmp_path / "blue.png"
    Image.new("RGB", (40, 40), (30, 30, 220)).save(blue)
    questions = iter(["What colours are they?", "", "And the first one?", "exit", "never asked"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(questions))
    code = _eval_chat().main(["--ckpt", str(published["pth"]), "--clip_path", str(published["clip"]),
                              "--image", str(published["images"] / "red.png"), "--image", str(blue),
                              "--interactive", "--temperature", "0", "--max_new_tokens", "4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "[Image]: red.png, blue.png" in out
    assert out.count("[A]: ") == 2  # the empty line is not a question; "exit" ends the chat
    assert next(questions) == "never asked"
