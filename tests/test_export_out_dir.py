"""export_model.py --out: a path that is a file, a path under a file, a non-empty folder (refused unless
--overwrite, naming what it would replace), and a folder, symlink or special file where an output file goes
(never replaced)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, tiny_config

import export_model
from checkpoints.checkpoint import save_checkpoint
from model.vlm import MiniMindVLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(MiniMindVLM(tiny_config(tokenizer)).eval(), path, tokenizer=PROJECT_TOKENIZER)
    return path


def _export(checkpoint, out, *extra) -> list[str]:
    return ["--ckpt", str(checkpoint), "--out", str(out), "--tokenizer_path", TOKENIZER_PATH, "--no_verify", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export_model.py: error: "), err
    return err[0]


def test_an_out_path_that_is_a_file_is_one_line(tmp_path, checkpoint):
    target = tmp_path / "model.hf"
    target.write_text("not a folder")
    proc = subprocess.run([sys.executable, str(ROOT / "export_model.py"), *_export(checkpoint, target)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"export_model.py: error: --out {target}: it exists and is a "
                                                "file, not a folder"]
    assert target.read_text() == "not a folder"


def test_an_out_path_under_a_file_is_one_line(tmp_path, checkpoint, capsys):
    (tmp_path / "file").write_text("x")
    assert export_model.main(_export(checkpoint, tmp_path / "file" / "sub" / "hf")) == 1
    assert f"{tmp_path / 'file'} is a file, not a folder" in _one_line_error(capsys)


def test_a_non_empty_folder_is_refused_naming_what_would_be_replaced(tmp_path, checkpoint, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    (out / "keep.txt").write_text("mine")
    assert export_model.main(_export(checkpoint, out)) == 1
    line = _one_line_error(capsys)
    assert "not empty (3 entries; it would replace README.md, config.json)" in line and "--overwrite" in line
    assert (out / "README.md").read_text() == "my notes" and (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "keep.txt"]  # no staging left

    assert export_model.main(_export(checkpoint, out, "--overwrite")) == 0
    assert (out / "README.md").read_text() != "my notes"
    assert '"model_type": "minimind"' in (out / "config.json").read_text()
    assert (out / "keep.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".export-staging-")]


def test_an_empty_folder_is_written_without_overwrite(tmp_path, checkpoint):
    (tmp_path / "hf").mkdir()
    assert export_model.main(_export(checkpoint, tmp_path / "hf")) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["folder", "fifo", "symlink"])
def test_overwrite_never_replaces_anything_but_a_regular_file(tmp_path, checkpoint, capsys, kind):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("old card")
    target = out / "model.safetensors"
    if kind == "folder":
        target.mkdir()
        (target / "inside.bin").write_bytes(b"data")
    elif kind == "fifo":
        os.mkfifo(target)  # writing into it would block forever with no reader
    else:
        (tmp_path / "elsewhere.bin").write_bytes(b"precious")
        target.symlink_to(tmp_path / "elsewhere.bin")
    assert export_model.main(_export(checkpoint, out, "--overwrite")) == 1
    line = _one_line_error(capsys)
    assert f"{target} is a" in line and "never replaces" in line
    assert (out / "README.md").read_text() == "old card"  # refused before anything was written
    if kind == "folder":
        assert (target / "inside.bin").read_bytes() == b"data"
    elif kind == "symlink":
        assert target.is_symlink() and (tmp_path / "elsewhere.bin").read_bytes() == b"precious"


def test_a_special_file_found_only_when_moving_is_refused_before_anything_moves(tmp_path):
    # names the early check does not know (files.move_into checks every staged name before moving any)
    from hf_export.files import ExportError, move_into

    staged, out = tmp_path / "staged", tmp_path / "out"
    (staged / "sub").mkdir(parents=True)
    (staged / "a.json").write_text("new")
    (staged / "sub" / "b.json").write_text("new")
    (out / "sub").mkdir(parents=True)
    (out / "a.json").write_text("old")
    os.mkfifo(out / "sub" / "b.json")
    with pytest.raises(ExportError, match="is a special file"):
        move_into(staged, out)
    assert (out / "a.json").read_text() == "old"
