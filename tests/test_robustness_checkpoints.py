"""Checkpoint faults: a save killed half-way, truncated or corrupt files, checkpoints of another model config,
and malicious pickles. Every loader (load_model, the trainer's --init/--resume, 3-eval_chat.py --ckpt and the
web demo's checkpoint picker) answers with one line naming the file; nothing in a checkpoint is ever run."""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, tiny_config
from helpers import load_script, make_dataset, train_argv

from checkpoints.checkpoint import load_model, load_object, load_weights, save_checkpoint
from checkpoints.files import CheckpointError
from model.vlm import MiniMindVLM
from checkpoints.weights import read_state_dict
from trainer.config import PRETRAIN
from trainer.loop import main as train_main

CHILD = textwrap.dedent("""
    import io, sys, time
    import torch
    sys.path.insert(0, {root!r})
    from checkpoints import checkpoint as ck
    from model.config import LMConfig
    from model.vlm import MiniMindVLM

    path, mode = sys.argv[1], sys.argv[2]
    def make(seed, dim=64):
        torch.manual_seed(seed)
        return MiniMindVLM(LMConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400, vision_dim=64))
    if mode == "slow":  # one good save, then a second one that writes slowly, in 64 KiB pieces
        ck.save_checkpoint(make(0), path)
        newer = make(1)
        real_save = torch.save
        def slow_save(obj, f):
            buf = io.BytesIO()
            real_save(obj, buf)
            data = buf.getvalue()
            for i in range(0, len(data), 1 << 16):
                f.write(data[i:i + (1 << 16)])
                f.flush()
                if i == 4 << 16:
                    print("writing", flush=True)
                time.sleep(0.05)
        torch.save = slow_save
        ck.save_checkpoint(newer, path)
        print("finished", flush=True)
    else:  # real saves of two larger models, alternately, to the same path, until killed
        models = [make(0, 256), make(1, 256)]
        ck.save_checkpoint(models[0], path)
        print("looping", flush=True)
        for i in range(1000):
            ck.save_checkpoint(models[i % 2], path)
""")


def start_child(path: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(path), mode], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_line(proc: subprocess.Popen, wanted: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == wanted:
            return
        if not line and proc.poll() is not None:
            pytest.fail(f"child exited {proc.returncode} before '{wanted}': {proc.stderr.read()[-3000:]}")
    proc.kill()
    pytest.fail(f"child did not print '{wanted}' within {timeout} s")


def weights(seed: int, dim: int = 64) -> dict[str, torch.Tensor]:
    """The child's models (the same config and seed)."""
    from model.config import LMConfig

    torch.manual_seed(seed)
    return MiniMindVLM(LMConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6400,
                                vision_dim=64)).state_dict()


def same_weights(sd: dict, expected: dict) -> bool:
    return all(torch.equal(sd[k], v) for k, v in expected.items())


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# ------------------------------------------------------------------------------------- killed while saving
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "64_vlm_sft.pth"
    proc = start_child(path, "slow")
    try:
        wait_for_line(proc, "writing")
        partial = temp_files(tmp_path)
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # the new save is half-written, under a temp name
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and "finished" not in proc.stdout.read()
    # the final name still holds the complete previous checkpoint, which loads strictly
    assert same_weights(read_state_dict(path), weights(0)) and not same_weights(read_state_dict(path), weights(1))
    load_model(path)
    # the half-written temp file is left behind, unusable and ignored by the web demo's picker
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_state_dict(temp_files(tmp_path)[0])
    import web_server

    assert [c.name for c in web_server.list_checkpoints(str(tmp_path))] == ["64_vlm_sft.pth"]


def test_sigkill_at_a_random_moment_of_repeated_saves(tmp_path):
    path = tmp_path / "256_vlm_sft.pth"
    proc = start_child(path, "loop")
    try:
        wait_for_line(proc, "looping")
        time.sleep(0.7)  # a few saves in: killed somewhere inside one of them
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    sd = read_state_dict(path)  # complete: one of the two models, never a mix or a torn file
    assert same_weights(sd, weights(0, 256)) or same_weights(sd, weights(1, 256))
    load_model(path)


# ------------------------------------------------------------------------------------- corrupt files
def corrupt_files(folder: Path) -> dict[str, str]:
    """Bad checkpoint files written into folder: name -> phrase of its error."""
    torch.manual_seed(0)
    good = folder / "good.pth"
    save_checkpoint(MiniMindVLM(tiny_config()), good, tokenizer=PROJECT_TOKENIZER)
    data = good.read_bytes()
    files = {
        "truncated_half.pth": (data[: len(data) // 2], "corrupt or truncated checkpoint"),
        "truncated_tail.pth": (data[:-10], "corrupt or truncated checkpoint"),
        "truncated_head.pth": (data[:3], "refused to load"),
        "empty.pth": (b"", "empty file (0 bytes)"),
        "random.pth": (random.Random(0).randbytes(4096), "refused to load"),
        "text.pth": (b"this is not a checkpoint\n", "corrupt or truncated checkpoint"),
        "zip_garbage.pth": (b"PK\x03\x04" + random.Random(1).randbytes(200), "corrupt or truncated checkpoint"),
        "truncated.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "corrupt or truncated safetensors"),
    }
    out = {}
    for name, (blob, phrase) in files.items():
        (folder / name).write_bytes(blob)
        out[name] = phrase
    torch.save(torch.zeros(3), folder / "a_tensor.pth")
    out["a_tensor.pth"] = "not a state dict of tensors"
    torch.save({"layers.0.x": torch.zeros(2)}, folder / "not_minimind.pth")
    out["not_minimind.pth"] = "not a MiniMind checkpoint: no tok_embeddings.weight"
    torch.save(MiniMindVLM(tiny_config()).state_dict(), folder / "bad_sidecar.pth")
    (folder / "bad_sidecar.config.json").write_text('{"dim": 64, "n_la')  # torn JSON beside good weights
    out["bad_sidecar.pth"] = "unreadable config beside the checkpoint"
    good.unlink()
    good.with_suffix(".config.json").unlink()
    return out


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corrupt")
    return folder, corrupt_files(folder)


def test_corrupt_checkpoints_are_one_line_errors(corrupt):
    folder, cases = corrupt
    for name, phrase in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_model(folder / name)
        message = str(err.value)
        expected_file = folder / ("bad_sidecar.config.json" if name == "bad_sidecar.pth" else name)
        assert phrase in message and str(expected_file) in message and "\n" not in message, (name, message)
        assert "weights_only` set to `False`" not in message  # never advise loading unsafely


# ------------------------------------------------------------------------------------- another config
@pytest.mark.parametrize("other, expected", [
    (dict(dim=128), r"shape mismatch: layers\.0\.attention\.wk\.weight: file \(64, 128\) vs model \(32, 64\)"),
    (dict(n_layers=3), r"unexpected keys: layers\.2\."),
    (dict(n_layers=1), r"missing keys: layers\.1\."),
    (dict(use_moe=True), r"missing keys: layers\.0\.feed_forward\.w1\.weight.*unexpected keys: "
                         r"layers\.0\.feed_forward\.experts\.0\."),
    (dict(vision_dim=768), r"shape mismatch: vision_proj\.vision_proj\.0\.weight: file \(64, 768\) vs model "
                           r"\(64, 64\)"),
])
def test_checkpoint_of_another_config_names_the_mismatch(tmp_path, other, expected):
    path = tmp_path / "other.pth"
    save_checkpoint(MiniMindVLM(tiny_config(**other)), path, tokenizer=PROJECT_TOKENIZER)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_weights(MiniMindVLM(tiny_config()), read_state_dict(path), source=str(path))
    assert str(err.value).startswith(f"{path} does not fit the model (") and "\n" not in str(err.value)


def test_trainer_init_from_another_config_is_one_line(tmp_path, tiny_clip_dir, capsys):
    data, images = make_dataset(tmp_path, 4)
    other = tmp_path / "other_llm.pth"
    save_checkpoint(MiniMindVLM(tiny_config(dim=128, n_heads=4, n_kv_heads=2)), other, tokenizer=PROJECT_TOKENIZER)
    argv = train_argv(data, images, tiny_clip_dir, tmp_path / "out", "--init", str(other))[1:]  # no --from_scratch
    with pytest.raises(SystemExit) as code:
        train_main(PRETRAIN, argv)
    err = capsys.readouterr().err
    assert code.value.code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and str(other) in lines[0], err
    assert "shape mismatch: layers.0.attention.wk.weight: file (64, 128) vs model (32, 64)" in lines[0]


# ------------------------------------------------------------------------------------- malicious pickles
class Evil:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_files(folder: Path, marker: Path) -> list[Path]:
    sd = MiniMindVLM(tiny_config()).state_dict()
    paths = {
        "evil_zip.pth": lambda p: torch.save({**sd, "tok_embeddings.weight": Evil(marker)}, p),
        "evil_legacy.pth": lambda p: torch.save({"w": Evil(marker)}, p, _use_new_zipfile_serialization=False),
        "evil_raw_pickle.pth": lambda p: p.write_bytes(pickle.dumps({"w": Evil(marker)}, protocol=2)),
        "evil_resume.pth": lambda p: torch.save({"model": sd, "optimizer": Evil(marker)}, p),
    }
    for name, write in paths.items():
        write(folder / name)
    return [folder / name for name in paths]


@pytest.fixture
def evil(tmp_path) -> tuple[list[Path], Path]:
    marker = tmp_path / "PWNED"
    # the payload is real: unpickling with plain pickle runs it (here, to prove the test would notice)
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()
    marker.unlink()
    return malicious_files(tmp_path, marker), marker


def test_malicious_pickle_runs_nothing_and_is_refused(evil):
    files, marker = evil
    for path in files:
        with pytest.raises(CheckpointError, match=rf"^{path}: refused to load") as err:
            load_model(path)
        assert "\n" not in str(err.value)
        with pytest.raises(CheckpointError, match="refused to load"):
            load_object(path)  # the trainer's --resume reader
    assert any("could run code" in str(_err(load_model, p)) for p in files)
    assert not marker.exists()


def _err(fn, *args) -> Exception:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - returned for inspection
        return e
    raise AssertionError("no error")


def test_trainer_resume_from_malicious_or_corrupt_file(tmp_path, tiny_clip_dir, evil, capsys):
    files, marker = evil
    data, images = make_dataset(tmp_path, 4)
    out = tmp_path / "out"
    out.mkdir()
    for blob, phrase in [(files[3].read_bytes(), "refused to load"), (b"PK\x03\x04garbage", "corrupt or truncated")]:
        (out / "64_vlm_pretrain_resume.pth").write_bytes(blob)
        with pytest.raises(SystemExit):
            train_main(PRETRAIN, train_argv(data, images, tiny_clip_dir, out, "--resume"))
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "64_vlm_pretrain_resume.pth" in lines[0] and phrase in lines[0], err
    assert not marker.exists()


# ------------------------------------------------------------------------------------- 3-eval_chat.py --ckpt
def _eval_chat():
    return load_script("3-eval_chat.py", "eval_chat_ckpt_robustness")


def _eval_argv(ckpt: Path, clip: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--clip_path", str(clip), "--tokenizer_path", TOKENIZER_PATH, "--image",
            str(ROOT / "images"), "--max_new_tokens", "2", "--device", "cpu", *extra]


def test_eval_chat_ckpt_errors_are_one_line(corrupt, evil, tiny_clip_dir, tmp_path, capsys):
    folder, cases = corrupt
    files, marker = evil
    good = tmp_path / "64_vlm_sft.pth"
    save_checkpoint(MiniMindVLM(tiny_config()), good, tokenizer=PROJECT_TOKENIZER)
    eval_chat = _eval_chat()
    runs = [(folder / name, (), phrase) for name, phrase in cases.items()]
    runs += [(path, (), "refused to load") for path in files]
    runs += [(good, ("--dim", "128"), "shape mismatch: layers.0.attention.wk.weight"),  # flags that disagree
             (good, ("--n_layers", "3"), "missing keys: layers.2."),
             (tmp_path / "missing.pth", (), "checkpoint not found")]
    for path, extra, phrase in runs:
        code = eval_chat.main(_eval_argv(path, tiny_clip_dir, *extra))
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and "Traceback" not in err and "[A]" not in out, (path, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (path, lines)
        assert path.name in lines[0] or "config.json" in lines[0], lines
    assert not marker.exists()


def test_eval_chat_subprocess_refuses_a_malicious_checkpoint(evil, tiny_clip_dir):
    files, marker = evil
    res = subprocess.run([sys.executable, str(ROOT / "3-eval_chat.py"), *_eval_argv(files[0], tiny_clip_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{files[0]}: refused to load" in errors[0] and "could run code" in errors[0]
    assert not marker.exists()


# ------------------------------------------------------------------------------------- the web demo's picker
def test_web_picker_shows_each_bad_checkpoint_clearly(corrupt, evil, tiny_clip_dir, monkeypatch, tmp_path):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    folder, cases = corrupt
    files, marker = evil
    for path in files:
        (folder / path.name).write_bytes(path.read_bytes())
    torch.manual_seed(0)
    save_checkpoint(MiniMindVLM(tiny_config()), folder / "64_vlm_sft.pth", tokenizer=PROJECT_TOKENIZER)
    monkeypatch.setenv("MINIMIND_OUT_DIR", str(folder))
    monkeypatch.setenv("MINIMIND_CLIP_PATH", str(tiny_clip_dir))
    monkeypatch.setenv("MINIMIND_TOKENIZER_PATH", TOKENIZER_PATH)
    monkeypatch.setenv("MINIMIND_DEVICE", "cpu")
    at = AppTest.from_file(str(ROOT / "web_server.py"), default_timeout=60)
    at.run()
    assert not at.exception and not at.error and at.title[0].value.startswith("MiniMind-V (0.")
    picker = at.sidebar.selectbox(key="checkpoint")
    expected = {name: phrase for name, phrase in cases.items() if name.endswith(".pth")}
    expected.update({p.name: "refused to load" for p in files})
    by_name = {label.split(" (")[0]: label for label in picker.options}
    assert set(expected) | {"64_vlm_sft.pth"} == set(by_name)
    for name, phrase in expected.items():
        at.sidebar.selectbox(key="checkpoint").set_value(by_name[name])
        at.run()
        assert not at.exception, (name, at.exception)
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and errors[0].startswith("Could not load the model: ") and phrase in errors[0], \
            (name, errors)
        assert name in errors[0] or "config.json" in errors[0]
        assert at.title[0].value == "MiniMind-V (no model loaded)"
    at.sidebar.selectbox(key="checkpoint").set_value(by_name["64_vlm_sft.pth"])
    at.run()
    assert not at.exception and not at.error and at.title[0].value.startswith("MiniMind-V (0.")  # back to work
    assert not marker.exists()


# ------------------------------------------------------------------------------------- malformed sidecar records
MALFORMED_SIDECAR = {  # field -> (its value in the sidecar, what the error line says)
    "tokenizer path is an int": ("tokenizer", {"path": 5, "fingerprint": "ab"}, "tokenizer.path is 5 (int), not a "
                                                                                "string"),
    "tokenizer path is a list": ("tokenizer", {"path": ["model"], "fingerprint": "ab"}, "tokenizer.path is ['model']"),
    "tokenizer record is a string": ("tokenizer", "model/minimind_tokenizer", "tokenizer is 'model/minimind_tok"),
    "tokenizer fingerprint is missing": ("tokenizer", {"path": "model/minimind_tokenizer"},
                                         "tokenizer.fingerprint is missing"),
    "2 MB tokenizer path": ("tokenizer", {"path": "p" * 2_000_000, "fingerprint": "ab"},
                            "tokenizer.path is 2,000,000 long (at most 4,096 allowed)"),
    "5 MB tokenizer fingerprint": ("tokenizer", {"path": "model/minimind_tokenizer", "fingerprint": "f" * 5_000_000},
                                   "tokenizer.fingerprint is 5,000,000 long"),
    "5 MB vision fingerprint": ("vision_encoder", {"path": "clip", "fingerprint": "f" * 5_000_000},
                                "vision_encoder.fingerprint is 5,000,000 long"),
    "vision path is an int": ("vision_encoder", {"path": 7, "fingerprint": "ab"}, "vision_encoder.path is 7 (int)"),
    "image_ids is a string": ("image_ids", "abc", "image_ids is 'abc' (str), not a list or null"),
    "rope_yarn is a string": ("rope_yarn", "x", "rope_yarn is 'x' (str), not an object or null"),
    "image_special_token is an int": ("image_special_token", 5, "image_special_token is 5 (int)"),
}


def test_malformed_sidecar_records_are_one_bounded_line(tmp_path, tiny_clip_dir, capsys):
    ckpt = tmp_path / "64_vlm_sft.pth"
    save_checkpoint(MiniMindVLM(tiny_config()), ckpt, tokenizer=PROJECT_TOKENIZER)
    sidecar = ckpt.with_suffix(".config.json")
    good = json.loads(sidecar.read_text())
    eval_chat = _eval_chat()
    for name, (field, value, expected) in MALFORMED_SIDECAR.items():
        sidecar.write_text(json.dumps({**good, field: value}))
        with pytest.raises(CheckpointError) as err:
            load_model(ckpt)
        assert str(err.value) == f"{sidecar}: {expected}" if expected.endswith("string") else \
            expected in str(err.value) and len(str(err.value)) < 300, (name, str(err.value)[:300])
        argv = [a for a in _eval_argv(ckpt, tiny_clip_dir) if a not in ("--tokenizer_path", TOKENIZER_PATH)]
        assert eval_chat.main(argv) == 1, name  # the chat script reads the record itself: one short line
        err_text = capsys.readouterr().err
        lines = [line for line in err_text.splitlines() if line.strip()]
        assert "Traceback" not in err_text and len(lines) == 1 and expected in lines[0], (name, err_text[:500])
        assert str(sidecar) in lines[0] and len(lines[0]) < 300, (name, lines[0][:300])
