"""Small crafted checkpoints that used to make the loader allocate without bound or crash deep inside torch:
a huge layer index, a stride-0 expanded tensor, absurd sidecar values, non-float dtypes, NaN weights, odd
embedding ranks, and a directory or FIFO given as the checkpoint. Each is refused with one line naming the file,
before the model is built."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, tiny_config
from helpers import load_script, run_stage

from checkpoints.checkpoint import config_path_for, load_model, save_checkpoint
from checkpoints.files import CheckpointError
from model.vlm import MiniMindVLM
from checkpoints.weights import read_state_dict


@pytest.fixture(scope="module")
def good_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in MiniMindVLM(tiny_config()).state_dict().items()}


def _refused(path: Path, phrase: str) -> str:
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert phrase in message and "\n" not in message, message
    assert path.name in message, message
    assert time.perf_counter() - start < 10  # refused up front, not after building a huge model
    return message


def test_huge_layer_index_is_refused_before_building_layers(good_sd, tmp_path):
    path = tmp_path / "extra_layer.pth"
    torch.save({**good_sd, "layers.100000000.attention_norm.weight": torch.ones(64)}, path)
    _refused(path, "layer indices are not contiguous")


def test_stride_0_expanded_tensor_is_refused(good_sd, tmp_path):
    path = tmp_path / "expanded.pth"
    # 4 M x 64 floats (1 GB) described by 64 stored floats: it sized the vocabulary, and the model, from it
    torch.save({**good_sd, "tok_embeddings.weight": torch.zeros(1, 64).expand(4_000_000, 64)}, path)
    assert path.stat().st_size < 3_000_000  # the rest of the tiny model: 2 MB
    _refused(path, "non-contiguous or expanded view")


@pytest.mark.parametrize("field, value", [("max_seq_len", 10**9), ("n_heads", 0), ("n_heads", 2.5),
                                          ("n_kv_heads", 3), ("rope_theta", 0), ("norm_eps", "tiny"),
                                          ("use_moe", "yes"), ("dropout", 1.5)])
def test_absurd_sidecar_values_are_refused(tmp_path, field, value):
    path = tmp_path / "model.pth"
    save_checkpoint(MiniMindVLM(tiny_config()), path, tokenizer=PROJECT_TOKENIZER)
    sidecar = config_path_for(path)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), field: value}))
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and sidecar.name in message and field in message, message


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_dtypes_are_refused(good_sd, tmp_path, dtype):
    path = tmp_path / "int.pth"
    torch.save({**good_sd, "norm.weight": torch.ones(64, dtype=dtype)}, path)
    message = _refused(path, "is not a float type")
    assert "norm.weight" in message


def test_bool_safetensors_is_refused(good_sd, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bool.safetensors"
    save_file({**{k: v.contiguous() for k, v in good_sd.items()}, "norm.weight": torch.ones(64, dtype=torch.bool)},
              str(path))
    _refused(path, "dtype bool is not a float type")


def test_nan_weights_are_refused_at_load(good_sd, tmp_path):
    weight = good_sd["layers.1.feed_forward.w2.weight"].clone()
    weight[3, 5] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({**good_sd, "layers.1.feed_forward.w2.weight": weight}, path)
    assert "layers.1.feed_forward.w2.weight: 1 non-finite value" in _refused(path, "NaN or inf")


@pytest.mark.parametrize("shape", [(), (10, 8, 8)])
def test_embedding_of_the_wrong_rank_names_the_file(good_sd, tmp_path, shape):
    path = tmp_path / "rank.pth"
    torch.save({**good_sd, "tok_embeddings.weight": torch.zeros(shape)}, path)
    _refused(path, f"tok_embeddings.weight has {len(shape)} dimensions")


def test_directory_and_fifo_are_named_for_what_they_are(tmp_path):
    folder = tmp_path / "a_folder.pth"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="a_folder.pth: is a directory, not a checkpoint file"):
        read_state_dict(folder)
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"pipe.pth: not a regular file \(a FIFO"):
        read_state_dict(fifo)


def test_eval_chat_reports_crafted_checkpoints_in_one_line(good_sd, tmp_path, tiny_clip_dir, capsys):
    torch.save({**good_sd, "layers.7.attention_norm.weight": torch.ones(64)}, tmp_path / "gap.pth")
    eval_chat = load_script("3-eval_chat.py", "eval_chat_crafted")
    for ckpt, phrase in [(tmp_path / "gap.pth", "not contiguous"), (tmp_path, "is a directory")]:
        code = eval_chat.main(["--ckpt", str(ckpt), "--clip_path", str(tiny_clip_dir), "--tokenizer_path",
                               TOKENIZER_PATH, "--image", str(ROOT / "images"), "--max_new_tokens", "2",
                               "--device", "cpu"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and phrase in lines[0] and "Traceback" not in err, lines


# ------------------------------------------------------------------------ export_model.py --from_hf inputs
def _hf_dir(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "minimind", "dim": 64, "n_layers": 2,
                                                    "n_heads": 4, "n_kv_heads": 2, "vocab_size": 6400}))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in sd}}))
    return folder


HF_FAULTS = {  # what to write where -> phrase of the one-line error
    "index not JSON": ("model.safetensors.index.json", "{not json", "unreadable JSON"),
    "index nested too deeply": ("model.safetensors.index.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "index without weight_map": ("model.safetensors.index.json", '{"metadata": {}}', "'weight_map' must be"),
    "index weight_map a list": ("model.safetensors.index.json", '{"weight_map": [1, 2]}', "'weight_map' must be"),
    "shard outside the directory": ("model.safetensors.index.json",
                                    '{"weight_map": {"tok_embeddings.weight": "../secret.safetensors"}}',
                                    "is outside the model directory"),
    "shard by absolute path": ("model.safetensors.index.json",
                               '{"weight_map": {"tok_embeddings.weight": "/etc/passwd"}}',
                               "is outside the model directory"),
    "config a list": ("config.json", "[1, 2, 3]", "config.json: not a JSON object"),
    "config with a huge integer": ("config.json", '{"dim": ' + "9" * 5000 + "}", "config.json: unreadable JSON"),
    "config nested too deeply": ("config.json", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    "config with zero heads": ("config.json", '{"model_type": "minimind", "n_heads": 0}', "n_heads = 0"),
}


@pytest.mark.parametrize("fault", list(HF_FAULTS))
def test_malformed_hf_directory_is_one_line(good_sd, tmp_path, capsys, fault):
    import export_model

    folder = _hf_dir(tmp_path, good_sd)
    name, text, phrase = HF_FAULTS[fault]
    (folder / name).write_text(text)
    (tmp_path / "secret.safetensors").write_bytes(b"")  # exists, outside: must never be opened
    assert export_model.main(["--from_hf", str(folder), "--to", str(tmp_path / "out.pth")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and phrase in err, err
    assert "Traceback" not in err and not (tmp_path / "out.pth").exists()


def test_resume_after_a_kill_between_log_and_save_does_not_repeat_steps(tmp_path, tiny_clip_dir):
    """A run logged step 3 and was killed before it saved it (the last save is step 2), in the middle of writing
    its weights: the resumed run removes the temp files of the killed saves, redoes step 3, and the log holds
    each step once, the redone step 3 in place of the lost one."""
    from helpers import make_dataset, train_argv

    from trainer.config import PRETRAIN

    data, images = make_dataset(tmp_path / "data", n_images=8)
    out = tmp_path / "out"
    argv = train_argv(data, images, tiny_clip_dir, out, "--batch_size", "2", "--epochs", "1")
    run_stage(PRETRAIN, argv + ["--max_steps", "2"])
    log_file = out / "64_vlm_pretrain_log.jsonl"
    with open(log_file, "a") as f:  # what the killed run had written after its last save
        f.write(json.dumps({"step": 3, "epoch": 0, "loss": 123.0, "lr": 0.0}) + "\n")
        f.write('{"step": 4, "epo')  # a line cut by the kill
    stale = [out / ".64_vlm_pretrain.pth.k2j3h4.tmp", out / ".64_vlm_pretrain.config.json.zz81.tmp",
             out / ".64_vlm_pretrain_resume.pth.q1w2.tmp"]  # its interrupted saves
    unrelated = [out / ".64_vlm_sft.pth.a1b2.tmp", out / "notes.tmp"]  # another stage's, a user's file
    for path in stale + unrelated:
        path.write_bytes(b"half of a save")
    run_stage(PRETRAIN, argv + ["--resume"])
    assert not any(path.exists() for path in stale) and all(path.exists() for path in unrelated)
    assert not list(out.glob(".64_vlm_pretrain*.tmp"))  # and the run's own saves left none
    steps = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[2]["loss"] != 123.0


def test_sidecar_nested_too_deeply_is_one_line(tmp_path):
    path = tmp_path / "model.pth"
    save_checkpoint(MiniMindVLM(tiny_config()), path, tokenizer=PROJECT_TOKENIZER)
    config_path_for(path).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"model.config.json: unreadable config .*nested too deeply"):
        load_model(path)


def test_model_dir_listing_skips_a_config_nested_too_deeply(good_sd, tmp_path):
    from inference.model_files import find_model_dirs

    folder = _hf_dir(tmp_path, good_sd)
    assert find_model_dirs(tmp_path) == [folder]
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert find_model_dirs(tmp_path) == []  # was a RecursionError out of the web demo's picker
