"""scripts/inspect_attention.py end to end on a tiny random checkpoint and a tiny CLIP."""
from __future__ import annotations

import importlib.util

import torch
from conftest import PROJECT_TOKENIZER, ROOT, TOKENIZER_PATH, tiny_config
from PIL import Image, ImageDraw

from model.checkpoint import save_checkpoint
from model.vlm import MiniMindVLM

spec = importlib.util.spec_from_file_location("inspect_attention_script", ROOT / "scripts" / "inspect_attention.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def shape_image(path):
    img = Image.new("RGB", (96, 64), (240, 240, 240))
    ImageDraw.Draw(img).ellipse([10, 10, 40, 40], fill=(200, 30, 30))
    img.save(path)
    return path


def test_script_writes_the_png_and_prints_the_table(tmp_path, tokenizer, tiny_clip_dir, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "64_vlm_sft.pth"
    save_checkpoint(MiniMindVLM(tiny_config(tokenizer)), ckpt, tokenizer=PROJECT_TOKENIZER)
    out = tmp_path / "figs" / "attention.png"
    rc = script.main(["--ckpt", str(ckpt), "--image", str(shape_image(tmp_path / "circle.png")),
                      "--prompt", "what shape is in the image?", "--out", str(out), "--max_new_tokens", "3",
                      "--clip_path", str(tiny_clip_dir), "--tokenizer_path", TOKENIZER_PATH, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 400
    lines = printed.splitlines()
    header = lines.index("layer  image%   CLS%  patches%  text%  top patch (row,col)")
    rows = [line.split() for line in lines[header + 1:header + 4]]
    assert [r[0] for r in rows] == ["0", "1", "all"]
    for r in rows:  # image = CLS + patches, image + text = 100 %
        image, cls, patches, text = map(float, r[1:5])
        assert abs(image - cls - patches) < 0.11 and abs(image + text - 100) < 0.11
    assert "answer token (all layers)" in printed and f"wrote {out}" in printed


def test_script_reports_a_bad_image_in_one_line(tmp_path, tiny_clip_dir, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    rc = script.main(["--ckpt", str(tmp_path / "missing.pth"), "--image", str(bad), "--prompt", "q",
                      "--clip_path", str(tiny_clip_dir), "--tokenizer_path", TOKENIZER_PATH])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and "broken.png" in err and "\n" not in err
