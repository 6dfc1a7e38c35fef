"""scripts/inspect_attention.py end to end on a tiny random checkpoint and a tiny CLIP."""
from __future__ import annotations

import pytest
import torch
from conftest import TOKENIZER_PATH
from helpers import load_script
from PIL import Image, ImageDraw

script = load_script("scripts/inspect_attention.py", "inspect_attention_script")


def shape_image(path):
    img = Image.new("RGB", (96, 64), (240, 240, 240))
    ImageDraw.Draw(img).ellipse([10, 10, 40, 40], fill=(200, 30, 30))
    img.save(path)
    return path


def run_script(ckpt, tmp_path, clip, *extra: str) -> int:
    return script.main(["--ckpt", str(ckpt), "--image", str(shape_image(tmp_path / "circle.png")),
                        "--prompt", "what shape is in the image?", "--clip_path", str(clip),
                        "--tokenizer_path", TOKENIZER_PATH, "--device", "cpu", *extra])


def test_script_writes_the_png_and_prints_the_table(tmp_path, tiny_ckpt, tiny_clip_dir, capsys):
    out = tmp_path / "figs" / "attention.png"
    rc = run_script(tiny_ckpt, tmp_path, tiny_clip_dir, "--out", str(out), "--max_new_tokens", "3")
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


def test_out_naming_a_directory_writes_a_named_png_inside_it(tmp_path, tiny_ckpt, tiny_clip_dir, capsys):
    """An existing directory as --out was an IsADirectoryError traceback."""
    folder = tmp_path / "figs"
    folder.mkdir()
    assert run_script(tiny_ckpt, tmp_path, tiny_clip_dir, "--out", str(folder), "--max_new_tokens", "2") == 0
    written = folder / "circle_attention.png"
    assert f"wrote {written}" in capsys.readouterr().out
    with Image.open(written) as png:
        assert png.format == "PNG"


def test_out_that_cannot_be_written_is_one_line(tmp_path, tiny_ckpt, tiny_clip_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = run_script(tiny_ckpt, tmp_path, tiny_clip_dir, "--out", str(blocker / "x.png"), "--max_new_tokens", "2")
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: cannot write ") and "\n" not in err


def test_token_maps_drawn_are_capped_and_the_cap_is_said(tmp_path, tiny_ckpt, tiny_clip_dir, capsys):
    """--max_tokens_drawn 400 drew an 84,018-pixel-wide PNG in 435 s."""
    from inference.attention_plot import MAX_TOKENS_DRAWN

    out = tmp_path / "many.png"
    rc = run_script(tiny_ckpt, tmp_path, tiny_clip_dir, "--out", str(out), "--max_new_tokens", "24",
                    "--max_tokens_drawn", "400")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    table = printed.split("answer token (all layers)")[1].split("note: drawing")[0].strip().splitlines()
    assert len(table) == 1 + 24  # a header, then every token (the tiny random model does not stop early)
    notes = [line for line in printed.splitlines() if line.startswith("note: drawing")]
    assert len(notes) == 1 and f"first {MAX_TOKENS_DRAWN} token maps, not 24" in notes[0]
    with Image.open(out) as png:  # 2 + 16 columns of 1.9 inches at 110 dpi
        assert png.width <= (2 + MAX_TOKENS_DRAWN) * 1.9 * 110 + 10


def test_heat_map_of_an_extreme_aspect_ratio_stays_small():
    """A 1x700 image asked for a figure 2240 inches tall (246,000 pixels)."""
    import io

    from inference.attention_plot import heatmap_png

    grid = torch.rand(7, 7)
    for size in ((1, 700), (700, 1)):
        with Image.open(io.BytesIO(heatmap_png(Image.new("RGB", size, (9, 9, 9)), grid, "t"))) as png:
            assert max(png.size) < 2000, (size, png.size)
