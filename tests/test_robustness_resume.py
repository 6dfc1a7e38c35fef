"""Resuming and stopping: a resume that would continue in another order than it was saved in is refused in one
line naming the flag (or, for a file from before orders were recorded, stops in one line when its position is
past this run's epoch); the loop can never rebuild its data loader without progress; a stop request is honoured
at the next step boundary wherever in the loop it arrives, and a second signal gives up at once in one line."""
from __future__ import annotations

import logging
import os
import signal
from itertools import islice
from pathlib import Path

import pytest
import torch
from helpers import make_dataset, run_stage, train_argv

from checkpoints.checkpoint import load_object
from trainer import build as trainer_build
from trainer import loop as trainer_loop
from trainer.config import PRETRAIN
from trainer.loop import main

STEM = "64_vlm_pretrain"


def run(argv: list[str]) -> dict:
    return run_stage(PRETRAIN, argv)


def error_line(argv: list[str], capsys, code: int = 1) -> str:
    """Run the trainer as its script does; it must exit with `code` and print exactly one `error:` line."""
    with pytest.raises(SystemExit) as exit_code:
        main(PRETRAIN, argv)
    err = capsys.readouterr().err
    lines = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert exit_code.value.code == code and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def forget_the_order(resume_path: Path) -> None:
    """Make a resume file look like one written before orders were recorded."""
    state = load_object(resume_path)
    del state["order"]
    torch.save(state, resume_path)


@pytest.fixture
def no_spinning(monkeypatch):
    """Fail (instead of hanging) when the loop keeps rebuilding its data loader: a real run needs one per epoch."""
    real, calls = trainer_build.TrainData.epoch, {"n": 0}

    def epoch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:
            raise AssertionError("the loop rebuilt its data loader 10 times without progress")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer_build.TrainData, "epoch", epoch)


@pytest.fixture
def saved_at_batch_5(tmp_path, tiny_clip_dir):
    """A run of 12 samples in batches of 2 (6 per epoch), saved at batch 5; returns (argv builder, out dir)."""
    data, images = make_dataset(tmp_path, 12, extra_records=[  # three more questions on img_0: packable
        {"id": f"q{i}", "image": "img_0.png", "conversations": [{"from": "human", "value": f"<image>\nQ{i}?"},
                                                              {"from": "gpt", "value": "Red."}]} for i in range(3)])
    out = tmp_path / "out"

    def argv(*extra: str) -> list[str]:
        return train_argv(data, images, tiny_clip_dir, out, "--batch_size", "2", *extra)

    run(argv("--max_steps", "5"))
    return argv, out


# ------------------------------------------------------------------------------------------------ changed flags
@pytest.mark.parametrize("flags, saved, now", [
    (("--batch_size", "4"), "2", "4"),  # epoch of 4 batches, saved at batch 5: the old loop spun forever here
    (("--pack_same_image", "3"), "1", "3"),
    (("--group_by_length",), "False", "True"),
    (("--seed", "7"), "1337", "7"),
    (("--accumulation_steps", "2"), "1", "2"),
], ids=["batch_size", "pack_same_image", "group_by_length", "seed", "accumulation_steps"])
def test_resume_with_another_order_is_refused_naming_the_flag(saved_at_batch_5, capsys, no_spinning, flags, saved,
                                                             now):
    argv, out = saved_at_batch_5
    line = error_line(argv(*flags, "--resume"), capsys)
    flag = flags[0]
    assert f"{out / f'{STEM}_resume.pth'} was saved with {flag} {saved}, but this run has {now};" in line, line
    assert load_object(out / f"{STEM}_resume.pth")["step"] == 5  # the resume file is untouched


def test_resume_without_a_flag_it_was_saved_with_is_refused(tmp_path, tiny_clip_dir, capsys):
    data, images = make_dataset(tmp_path, 12)
    argv = train_argv(data, images, tiny_clip_dir, tmp_path / "out", "--group_by_length")
    run(argv + ["--max_steps", "2"])
    line = error_line([a for a in argv if a != "--group_by_length"] + ["--resume"], capsys)
    assert "was saved with --group_by_length True, but this run has False;" in line, line


def test_resume_with_other_training_rows_is_refused(saved_at_batch_5, tmp_path, capsys, no_spinning):
    argv, _ = saved_at_batch_5
    other_data, _ = make_dataset(tmp_path / "other", 10)
    changed = argv("--resume")
    changed[changed.index("--data_path") + 1] = str(other_data)
    line = error_line(changed, capsys)
    assert "saved with training rows (from --data_path) '15 rows, lengths" in line, line
    assert "but this run has '10 rows, lengths" in line, line


def test_resume_with_the_same_order_in_another_place_continues(saved_at_batch_5, tmp_path):
    argv, out = saved_at_batch_5
    moved = tmp_path / "moved.json"  # the same data file copied elsewhere: the same rows, so the same order
    data_arg = argv()[argv().index("--data_path") + 1]
    moved.write_text(Path(data_arg).read_text())
    resumed = argv("--resume", "--max_steps", "7")
    resumed[resumed.index("--data_path") + 1] = str(moved)
    assert run(resumed)["step"] == 7


# ------------------------------------------------------------------------------------------------ older files
def test_an_old_resume_file_resumes_with_a_warning(saved_at_batch_5, caplog):
    argv, out = saved_at_batch_5
    forget_the_order(out / f"{STEM}_resume.pth")
    with caplog.at_level(logging.WARNING, logger="minimind"):
        summary = run(argv("--resume", "--max_steps", "7"))
    assert summary["step"] == 7 and len(summary["losses"]) == 2
    warnings = [r.getMessage() for r in caplog.records if "could not be checked" in r.getMessage()]
    assert len(warnings) == 1 and "records no batching flags" in warnings[0], caplog.text


def test_an_old_resume_file_past_the_end_of_the_epoch_stops_in_one_line(saved_at_batch_5, capsys, no_spinning):
    argv, out = saved_at_batch_5
    forget_the_order(out / f"{STEM}_resume.pth")
    line = error_line(argv("--batch_size", "4", "--resume"), capsys)  # the last --batch_size wins: 4
    assert "saved at batch 5 of epoch 1, but an epoch of this run has 4 batches" in line, line


# ------------------------------------------------------------------------------------------------ no spinning
def test_a_data_loader_that_ends_early_stops_the_run(tmp_path, tiny_clip_dir, monkeypatch, capsys, no_spinning):
    data, images = make_dataset(tmp_path, 12)  # 3 batches per epoch
    real = trainer_build.TrainData.epoch

    def short_epoch(self, epoch, skip_batches):  # a loader that yields one batch, then (restarted) none
        return islice(real(self, epoch, skip_batches), 0 if skip_batches else 1)

    monkeypatch.setattr(trainer_build.TrainData, "epoch", short_epoch)
    line = error_line(train_argv(data, images, tiny_clip_dir, tmp_path / "out"), capsys)
    assert line == f"error: {data}: the data ended after batch 1 of epoch 1, which should have 3", line


# ------------------------------------------------------------------------------------------------ signals
def test_a_signal_during_validation_stops_before_the_next_step(tmp_path, tiny_clip_dir, monkeypatch):
    data, images = make_dataset(tmp_path, 12)
    val, _ = make_dataset(tmp_path, 2, name="val")
    real_run, real_step, steps = trainer_build.Validator.run, trainer_loop.train_step, []
    handler_before = signal.getsignal(signal.SIGTERM)

    def validate_then_signal(self, model):
        result = real_run(self, model)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer_build.Validator, "run", validate_then_signal)
    monkeypatch.setattr(trainer_loop, "train_step", lambda *a: steps.append(1) or real_step(*a))
    out = tmp_path / "out"
    summary = run(train_argv(data, images, tiny_clip_dir, out, "--max_steps", "6", "--eval_interval", "2",
                             "--val_data", str(val)))
    assert summary["stopped"] and summary["step"] == 2 and len(steps) == 2
    assert load_object(out / f"{STEM}_resume.pth")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the run's handler is gone with it


def test_a_second_signal_gives_up_at_once_in_one_line(tmp_path, tiny_clip_dir, monkeypatch, capsys):
    data, images = make_dataset(tmp_path, 12)
    real_step, steps = trainer_loop.train_step, []

    def step_then_two_signals(*args):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args)

    monkeypatch.setattr(trainer_loop, "train_step", step_then_two_signals)
    try:
        line = error_line(train_argv(data, images, tiny_clip_dir, tmp_path / "out"), capsys, code=130)
    except KeyboardInterrupt:
        pytest.fail("the second signal ended the run with a KeyboardInterrupt traceback")
    assert line.startswith("error: interrupted") and len(steps) == 2, line


# ------------------------------------------------------------------------------------------------ malformed files
def _set(name, value):
    return lambda state: state.__setitem__(name, value)


def _del(name):
    return lambda state: state.__delitem__(name)


def _huge_tokenizer_path(state):
    state["tokenizer"] = {**state["tokenizer"], "path": "x" * 2_000_000}


# (how the resume file is damaged, the field the error line must name)
MALFORMED_RESUME = {
    "tokenizer is a string": (_set("tokenizer", "model/minimind_tokenizer"), "tokenizer is 'model/minimind"),
    "vision_encoder is a string": (_set("vision_encoder", "clip"), "vision_encoder is 'clip' (str)"),
    "order is a string": (_set("order", "batch_size=2"), "order is 'batch_size=2' (str)"),
    "rng is a string": (_set("rng", "seed"), "rng is 'seed' (str)"),
    "step is a string": (_set("step", "5"), "step is '5' (str), not an integer"),
    "model is missing": (_del("model"), "model is missing"),
    "optimizer is a list": (_set("optimizer", [1, 2]), "optimizer is [1, 2] (list)"),
    "scaler is missing": (_del("scaler"), "scaler is missing"),
    "step is negative": (_set("step", -3), "step is -3, below 0"),
    "rng of another world size": (lambda s: s.__setitem__("rng", []), "rng holds 0 process states"),
    "rng state of the wrong kind": (lambda s: s["rng"][0].__setitem__("python", "abc"), "rng[0].python is 'abc'"),
    "the file is a list": (lambda s: (s.clear(), s.__setitem__("_list", True)), "the resume file is [1, 2, 3]"),
    "2 MB tokenizer path": (_huge_tokenizer_path, "tokenizer.path is 2,000,000 long"),
    "5 MB order value": (lambda s: s["order"].__setitem__("training_rows", "y" * 5_000_000),
                         "order.training_rows is 5,000,000 long"),
    "optimizer state of another model": (lambda s: s["optimizer"]["param_groups"].append(
        dict(s["optimizer"]["param_groups"][0], params=[10_000])), "optimizer does not fit this run's model"),
}


def test_resume_file_with_wrongly_typed_records_is_one_bounded_line(saved_at_batch_5, capsys, no_spinning):
    argv, out = saved_at_batch_5
    path = out / f"{STEM}_resume.pth"
    good = path.read_bytes()
    for name, (damage, expected) in MALFORMED_RESUME.items():
        state = load_object(path)
        damage(state)
        torch.save([1, 2, 3] if state.get("_list") else state, path)
        line = error_line(argv("--resume"), capsys)
        assert line.startswith(f"error: {path}: ") and expected in line and len(line) < 400, (name, line[:500])
        path.write_bytes(good)
    assert run(argv("--resume", "--max_steps", "6"))["step"] == 6  # the good file still resumes
