"""Training faults: a NaN loss (stop after saving the last good weights, or skip and count), SIGTERM in the
middle of an epoch (save, exit 0, and --resume continues with exactly the loss trace of an uninterrupted run),
a full disk while saving (the previous checkpoint stays intact and loadable, one-line error), a run in which
nothing trained (one-line error, exit 1), temp files of interrupted saves, and flag values the loop cannot use."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from helpers import make_dataset, run_stage, train_argv

from data_pipeline.dataset import VLMDataset
from checkpoints import checkpoint as checkpoint_module
from checkpoints.checkpoint import load_model, load_object
from model.vlm import MiniMindVLM
from checkpoints.weights import read_state_dict
from trainer.config import PRETRAIN
from trainer.loop import main

STEM = "64_vlm_pretrain"


def run(argv):
    return run_stage(PRETRAIN, argv)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / f"{STEM}_log.jsonl").read_text().splitlines()]


def error_lines(err: str) -> list[str]:
    """The `error: ...` lines of stderr. The trainer leaves its tqdm bar open when it stops on an error, so the
    line can follow the bar's last refresh (no newline between them): cut that off."""
    return [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]


def clone(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def equal_weights(file_sd: dict, model_sd: dict) -> bool:
    """The saved file (v1 layout: plus a zero projection bias) holds exactly model_sd."""
    return set(model_sd) <= set(file_sd) and all(torch.equal(file_sd[k], v) for k, v in model_sd.items())


class NaNAt:
    """Patch MiniMindVLM.forward: training calls (labels given) numbered from 1; those in `bad` return a NaN loss
    (still attached to the graph). The weights are recorded at every training call, before it runs."""

    def __init__(self, monkeypatch, bad: set[int]):
        self.bad, self.calls, self.before = bad, 0, {}
        real = MiniMindVLM.forward

        def forward(model, *args, **kwargs):
            if kwargs.get("labels") is None:
                return real(model, *args, **kwargs)
            self.calls += 1
            self.before[self.calls] = clone(model.state_dict())
            out = real(model, *args, **kwargs)
            if self.calls in self.bad:
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(MiniMindVLM, "forward", forward)


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path, 12)  # 3 steps per epoch at batch size 4


# ------------------------------------------------------------------------------------------------- NaN loss
def test_nan_loss_stops_after_saving_the_last_good_weights(tmp_path, data, tiny_clip_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = train_argv(*data, tiny_clip_dir, out, "--max_steps", "6", "--epochs", "2")
    nan = NaNAt(monkeypatch, {4})  # the 4th step (global step 3) gets a NaN loss
    with pytest.raises(SystemExit) as code:
        main(PRETRAIN, argv)
    err = capsys.readouterr().err
    assert code.value.code == 1 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and re.search(r"non-finite loss.*\bnan\b.* at step 3: stopped", lines[0]), err
    assert str(out / f"{STEM}.pth") in lines[0] and "--resume" in lines[0] and "--nan_policy skip" in lines[0]
    assert nan.calls == 4  # nothing ran after the bad step
    saved = read_state_dict(out / f"{STEM}.pth")
    assert equal_weights(saved, nan.before[4])  # the weights before the bad step, not after it
    assert not equal_weights(saved, nan.before[3])  # (and the steps before it did train)
    load_model(out / f"{STEM}.pth")
    state = load_object(out / f"{STEM}_resume.pth")
    assert state["step"] == 3 and equal_weights(state["model"], nan.before[4])
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]

    # once the cause is gone, --resume redoes the failed step and ends where a clean run ends
    monkeypatch.undo()
    resumed = run(argv + ["--resume"])
    clean = run(train_argv(*data, tiny_clip_dir, tmp_path / "clean", "--max_steps", "6", "--epochs", "2"))
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(tmp_path / "clean")]
    assert resumed["losses"] == clean["losses"][3:]
    assert equal_weights(read_state_dict(out / f"{STEM}.pth"),
                         read_state_dict(tmp_path / "clean" / f"{STEM}.pth"))


def test_nan_policy_skip_skips_and_counts(tmp_path, data, tiny_clip_dir, monkeypatch):
    nan = NaNAt(monkeypatch, {2, 5})
    summary = run(train_argv(*data, tiny_clip_dir, tmp_path / "out", "--max_steps", "6", "--epochs", "2",
                             "--nan_policy", "skip"))
    assert summary["nan_skips"] == 2 and summary["step"] == 6 and not summary["stopped"]
    assert len(summary["losses"]) == 4 and all(map(lambda x: x == x, summary["losses"]))  # no NaN recorded
    for step in (2, 5):  # a skipped step leaves the weights as they were
        assert equal_weights(nan.before[step + 1], nan.before[step])
    assert not equal_weights(nan.before[2], nan.before[1])  # the good steps trained
    assert load_object(tmp_path / "out" / f"{STEM}_resume.pth")["nan_skips"] == 2


# ------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_mid_epoch_saves_exits_0_and_resume_is_exact(tmp_path, tiny_clip_dir):
    data, images = make_dataset(tmp_path, 12)
    args = ("--max_steps", "12", "--epochs", "2", "--batch_size", "2")  # 6 steps per epoch
    out = tmp_path / "interrupted"
    cmd = [sys.executable, str(ROOT / "1-pretrain_vlm.py"), *train_argv(data, images, tiny_clip_dir, out, *args)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if re.search(r"\bstep 1\b.*\bloss\b", line):  # the first progress line: training is under way
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log = "".join(seen) + rest
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log and "received signal 15" in log
    state = load_object(out / f"{STEM}_resume.pth")
    stopped_at = state["step"]
    assert 1 <= stopped_at < 6, log[-2000:]  # stopped inside the first epoch, at a step boundary
    assert f"stopped by signal 15 at step {stopped_at}; resume with --resume" in log
    assert state["epoch"] == 0 and state["batches_in_epoch"] == stopped_at
    load_model(out / f"{STEM}.pth")
    assert [m["step"] for m in metrics(out)] == list(range(1, stopped_at + 1))

    resumed = run(train_argv(data, images, tiny_clip_dir, out, *args, "--resume"))
    full = run(train_argv(data, images, tiny_clip_dir, tmp_path / "full", *args))
    assert resumed["step"] == full["step"] == 12
    trace, reference = metrics(out), metrics(tmp_path / "full")
    assert [m["step"] for m in trace] == list(range(1, 13))
    assert [(m["step"], m["loss"], m["lr"]) for m in trace] == [(m["step"], m["loss"], m["lr"]) for m in reference]
    assert equal_weights(read_state_dict(out / f"{STEM}.pth"), read_state_dict(tmp_path / "full" / f"{STEM}.pth"))


# ------------------------------------------------------------------------------------------------- disk full
@pytest.mark.parametrize("failing_write", [3, 4], ids=["weights", "resume_state"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, data, tiny_clip_dir, monkeypatch, capsys,
                                                              failing_write):
    """Saves happen at steps 2, 4, 6, each writing the weights then the resume state (torch.save calls 1-2, 3-4,
    ...). The second save's weights (call 3) or resume state (call 4) hits a full disk after a few bytes."""
    out = tmp_path / "out"
    real_save = torch.save
    calls = {"n": 0, "objects": {}}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        calls["objects"][calls["n"]] = obj
        if calls["n"] == failing_write:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    argv = train_argv(*data, tiny_clip_dir, out, "--max_steps", "6", "--epochs", "2", "--save_interval", "2")
    with pytest.raises(SystemExit) as code:
        main(PRETRAIN, argv)
    err = capsys.readouterr().err
    assert code.value.code == 1 and "Traceback" not in err
    failed_file = out / (f"{STEM}.pth" if failing_write == 3 else f"{STEM}_resume.pth")
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0] == f"error: {failed_file}: could not write (No space left on device); the previous file is unchanged"
    assert calls["n"] == failing_write  # training stopped there
    monkeypatch.undo()
    assert not list(out.glob(".*.tmp"))  # the partial temp file is removed
    # the previous checkpoint is intact: the step-2 resume state, and the weights last written in full
    assert load_object(out / f"{STEM}_resume.pth")["step"] == 2
    weights = read_state_dict(out / f"{STEM}.pth")
    assert equal_weights(weights, calls["objects"][1 if failing_write == 3 else 3])
    load_model(out / f"{STEM}.pth")
    # with room again, --resume continues from step 2 to the end
    summary = run(argv + ["--resume"])
    assert summary["step"] == 6 and len(summary["losses"]) == 4


# ------------------------------------------------------------------------------------------------- nothing trained
def test_a_run_in_which_nothing_trained_is_a_one_line_error(tmp_path, data, tiny_clip_dir, monkeypatch, capsys):
    real = VLMDataset.__getitem__

    def every_image_fails(self, index):  # as when every image file is junk that only decoding finds out
        item = real(self, index)
        item.pop("pixels", None)
        item["error"] = "cannot identify image file"
        return item

    monkeypatch.setattr(VLMDataset, "__getitem__", every_image_fails)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as code:
        main(PRETRAIN, train_argv(*data, tiny_clip_dir, out, "--max_steps", "3"))
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code.value.code == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: nothing trained: none of the 3 optimizer steps of this run trained"), lines
    assert str(data[0]) in lines[0] and "12 samples whose images failed to decode" in lines[0], lines
    assert not (out / f"{STEM}.pth").exists()  # no final weights for a run that trained nothing


# ------------------------------------------------------------------------------------------------- temp files
def test_temp_files_of_interrupted_saves_are_removed_at_start(tmp_path, data, tiny_clip_dir):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / f".{STEM}_best.pth.k2j4x9.tmp", out / f".{STEM}_best.config.json.k2j4x9.tmp",
             out / f".{STEM}.pth.a8b7c6.tmp", out / f".{STEM}_resume.pth.q1w2e3.tmp"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    (out / "notes.tmp").write_text("not ours")
    run(train_argv(*data, tiny_clip_dir, out, "--max_steps", "1"))
    assert not [p for p in stale if p.exists()] and (out / "notes.tmp").exists()


# ------------------------------------------------------------------------------------------------- flag values
@pytest.mark.parametrize("flag", ["--log_interval", "--save_interval", "--accumulation_steps", "--batch_size",
                                  "--max_steps", "--pack_same_image"])
def test_a_count_flag_below_one_is_a_one_line_error(tmp_path, data, tiny_clip_dir, capsys, flag):
    with pytest.raises(SystemExit) as code:
        main(PRETRAIN, train_argv(*data, tiny_clip_dir, tmp_path / "out", flag, "0"))
    err = capsys.readouterr().err
    assert code.value.code == 1 and "Traceback" not in err, err
    assert error_lines(err) == [f"error: {flag} must be at least 1 (got 0)"], err
