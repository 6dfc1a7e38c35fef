"""Bad and unusual image files through every path that opens an image: open_image, the training dataset,
3-eval_chat.py and the web upload. Each file either works (as RGB) or is refused with one line naming it.

The files are generated here: truncated PNG/JPEG, a zero-byte file, text named .jpg, 16-bit PNG, CMYK JPEG,
palette PNG with transparency, animated GIF, EXIF-rotated JPEG, a 1x1 image, and decompression bombs (PNG
headers declaring 20000x20000 and 9000x9000 pixels in a few hundred bytes on disk).
"""
from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TOKENIZER_PATH
from helpers import count_prompt_images, load_script, run_stage, train_argv
from PIL import Image

from data_pipeline.dataset import VLMDataset, collate
from data_pipeline.records import DataError
from data_pipeline.image_decode import MAX_IMAGE_PIXELS, ImageError, open_image
from trainer.config import PRETRAIN

# name -> None when the file must work, else a phrase its one-line error must contain
CASES: dict[str, str | None] = {
    "good.png": None,
    "truncated.png": "corrupt or truncated",
    "truncated.jpg": "truncated",
    "empty.png": "empty file (0 bytes)",
    "text.jpg": "not an image",
    "deep16.png": None,
    "cmyk.jpg": None,
    "palette_alpha.png": None,
    "animated.gif": None,
    "exif_rotated.jpg": None,
    "one_pixel.png": None,
    "bomb.png": "refused",
    "bomb_81mp.png": "refused",
    "short_ihdr.png": "unreadable image",  # Pillow raises ValueError for these three (they escaped as 500s)
    "ztxt_bomb.png": "unreadable image",  # a compressed text chunk inflating to 100 MB
    "iccp_bomb.png": "unreadable image",  # a compressed ICC profile inflating to 100 MB
}
GOOD = [n for n, e in CASES.items() if e is None]
BAD = [n for n, e in CASES.items() if e is not None]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking RGB PNG header declaring width x height, with a tiny IDAT: small on disk, huge decoded."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _chunk(b"IEND", b""))


def make_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "good.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    noise.save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n")
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(folder / "deep16.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    pal = Image.new("P", (20, 10), 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)  # index 0 transparent, index 1 green
    pal.paste(1, (10, 0, 20, 10))
    pal.save(folder / "palette_alpha.png", transparency=0)
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    rot = Image.new("RGB", (40, 20), (230, 20, 20))
    rot.paste((20, 20, 230), (20, 0, 40, 20))  # left half red, right half blue
    exif = rot.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rot.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one_pixel.png")
    (folder / "bomb.png").write_bytes(bomb_png(20000, 20000))  # 400 Mpx: PIL's own hard limit refuses it
    (folder / "bomb_81mp.png").write_bytes(bomb_png(9000, 9000))  # 81 Mpx: only our MAX_IMAGE_PIXELS refuses it
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    rows = b"".join(b"\0" + b"\x01\x02\x03" * 8 for _ in range(8))  # 8x8 RGB, filter byte 0 per row
    pixels = _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    signature, inflates_to_100mb = b"\x89PNG\r\n\x1a\n", zlib.compress(b"a" * (100 << 20))
    (folder / "short_ihdr.png").write_bytes(signature + _chunk(b"IHDR", header[:6]) + pixels)
    (folder / "ztxt_bomb.png").write_bytes(signature + _chunk(b"IHDR", header)
                                           + _chunk(b"zTXt", b"key\0\0" + inflates_to_100mb) + pixels)
    (folder / "iccp_bomb.png").write_bytes(signature + _chunk(b"IHDR", header)
                                           + _chunk(b"iCCP", b"icc\0\0" + inflates_to_100mb) + pixels)
    assert set(os.listdir(folder)) == set(CASES)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("bad_images") / "images")


# ---------------------------------------------------------------------------------------- (a) open_image
@pytest.mark.parametrize("name", list(CASES))
def test_open_image(images, name):
    expected = CASES[name]
    if expected is None:
        img = open_image(str(images / name))
        assert img.mode == "RGB"
        img.load()
        return
    with pytest.raises(ImageError) as err:
        open_image(str(images / name))
    message = str(err.value)
    assert expected in message and str(images / name) in message and "\n" not in message


def test_decoded_content_is_right(images):
    rotated = np.asarray(open_image(str(images / "exif_rotated.jpg")), dtype=int)
    assert rotated.shape == (40, 20, 3)  # 40x20 with orientation 6 comes out 20 wide, 40 high
    top, bottom = rotated[5, 10], rotated[35, 10]
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # the left (red) half is now on top
    assert 150 < np.asarray(open_image(str(images / "deep16.png")))[0, 0, 0] < 160  # 40000/65535, not clipped
    pal = np.asarray(open_image(str(images / "palette_alpha.png")))
    assert tuple(pal[5, 2]) == (255, 255, 255) and tuple(pal[5, 15]) == (0, 200, 0)  # transparent -> white
    assert tuple(np.asarray(open_image(str(images / "animated.gif")))[8, 8]) == (255, 0, 0)  # first frame
    cmyk = open_image(str(images / "cmyk.jpg"))
    assert cmyk.size == (24, 24) and cmyk.mode == "RGB"
    assert open_image(str(images / "one_pixel.png")).size == (1, 1)


@pytest.mark.parametrize("name", ["bomb.png", "bomb_81mp.png"])
def test_decompression_bomb_is_refused_before_decoding(images, name):
    path = images / name
    assert path.stat().st_size < 1000
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # read off the IHDR chunk
    assert width * height > MAX_IMAGE_PIXELS  # 20000x20000 RGB would need 1.2 GB decoded
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    for _ in range(3):
        with pytest.raises(ImageError, match="refused"):
            open_image(str(path))
        with pytest.raises(ImageError, match="refused"):
            open_image(path.read_bytes(), name=name)
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 50 * 1024  # < 50 MB more


# ---------------------------------------------------------------------------------------- (b) the dataset
def _records(names):
    return [{"id": f"rec_{Path(n).stem}", "image": n, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A picture."}]} for n in names]


def test_dataset_uses_good_images_and_skips_bad_ones_by_name(images, tokenizer, tmp_path, tiny_clip_dir):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(_records(CASES)))
    ds = VLMDataset(str(data), str(images), tokenizer, 96)
    assert len(ds) == len(CASES)  # every file exists: the image is checked when the batch is made
    items = {Path(s.images[0]).name: ds[i] for i, s in enumerate(ds.samples)}
    for name, item in items.items():
        if CASES[name] is None:
            [pixels] = item["pixels"]
            assert pixels.shape == (3, 224, 224) and torch.isfinite(pixels).all(), name
        else:
            assert CASES[name] in item["error"] and name in item["error"] and "\n" not in item["error"]
    batch = collate(list(items.values()))
    assert sorted(rid for rid, _ in batch.skipped) == sorted(f"rec_{Path(n).stem}" for n in BAD)
    assert batch.pixels.shape[0] == len(GOOD)
    # --strict_data: the first bad image is an error naming the record and the file
    strict = VLMDataset(str(data), str(images), tokenizer, 96, strict=True)
    for i, s in enumerate(strict.samples):
        name = Path(s.images[0]).name
        if CASES[name] is not None:
            with pytest.raises(DataError, match=f"record rec_{Path(name).stem}: .*{name}"):
                strict[i]

    # training over them: runs to the end, every bad image counted
    argv = train_argv(data, images, tiny_clip_dir, tmp_path / "out", "--epochs", "1", "--batch_size", "5")
    summary = run_stage(PRETRAIN, argv)
    assert summary["skipped_images"] == len(BAD) and summary["step"] == -(-len(CASES) // 5)
    assert all(np.isfinite(summary["losses"]))


# ---------------------------------------------------------------------------------------- (c) 3-eval_chat.py
def _eval_chat_module():
    return load_script("3-eval_chat.py", "eval_chat_robustness")


def _eval_argv(ckpt, clip, image) -> list[str]:
    return ["--ckpt", str(ckpt), "--clip_path", str(clip), "--tokenizer_path", TOKENIZER_PATH, "--image", str(image),
            "--max_new_tokens", "4", "--device", "cpu", "--no_stream"]


@pytest.fixture(scope="module")
def eval_chat():
    return _eval_chat_module()


@pytest.mark.parametrize("name", list(CASES))
def test_eval_chat_single_image(eval_chat, images, tiny_ckpt, tiny_clip_dir, capsys, name):
    code = eval_chat.main(_eval_argv(tiny_ckpt, tiny_clip_dir, images / name))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if CASES[name] is None:
        assert code == 0 and out.count("[A]: ") == 1 and f"[Image]: {name}" in out, err
    else:
        assert code == 1 and "[A]:" not in out
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and str(images / name) in errors[0] and CASES[name] in errors[0], err


def test_eval_chat_two_images_are_asked_about_together(eval_chat, images, tiny_ckpt, tiny_clip_dir, capsys,
                                                        monkeypatch):
    counts = count_prompt_images(monkeypatch)
    good = [name for name, expected in CASES.items() if expected is None][:2]
    argv = _eval_argv(tiny_ckpt, tiny_clip_dir, images / good[0]) + ["--image", str(images / good[1])]
    code = eval_chat.main(argv)
    out, err = capsys.readouterr()
    assert code == 0 and out.count("[A]: ") == 1 and f"[Image]: {good[0]}, {good[1]}" in out, err
    assert counts == [2]


def _run_eval(ckpt, clip, image, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "3-eval_chat.py"), *_eval_argv(ckpt, clip, image)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"})


def test_eval_chat_folder_of_good_and_bad_files_processes_every_good_file(images, tiny_ckpt, tiny_clip_dir):
    res = _run_eval(tiny_ckpt, tiny_clip_dir, images)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]  # some failed
    assert "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    assert res.stdout.count("[A]: ") == len(GOOD), res.stdout
    assert sorted(line.split(": ", 1)[1] for line in res.stdout.splitlines() if line.startswith("[Image]: ")) == \
        sorted(GOOD)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(BAD), res.stderr
    for name in BAD:
        assert sum(str(images / name) + ":" in line and CASES[name] in line for line in errors) == 1, (name, errors)


def test_eval_chat_subprocess_bomb_is_one_line(images, tiny_ckpt, tiny_clip_dir):
    res = _run_eval(tiny_ckpt, tiny_clip_dir, images / "bomb.png")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [line for line in res.stderr.splitlines() if str(images / "bomb.png") in line]
    assert len(errors) == 1 and "refused" in errors[0]


# ---------------------------------------------------------------------------------------- (d) web upload
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".gif": "image/gif"}


def test_web_upload_of_each_file(images, tiny_ckpt, tiny_clip_dir, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MINIMIND_OUT_DIR", str(tiny_ckpt.parent))
    monkeypatch.setenv("MINIMIND_CLIP_PATH", str(tiny_clip_dir))
    monkeypatch.setenv("MINIMIND_TOKENIZER_PATH", TOKENIZER_PATH)
    monkeypatch.setenv("MINIMIND_DEVICE", "cpu")
    at = AppTest.from_file(str(ROOT / "web_server.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    at.slider(key="max_new_tokens").set_value(16)
    last_good = None
    for name in ["text.jpg", *CASES]:  # a bad file first, before any image is set
        at.file_uploader(key="uploader").set_value([(name, (images / name).read_bytes(), MIME[Path(name).suffix])])
        at.run()
        assert not at.exception, (name, at.exception)
        errors = [e.value for e in at.error]
        if CASES[name] is None:
            assert not errors, (name, errors)
            assert at.session_state["image_names"] == [name] and len(at.image) == 1
            last_good = name
        else:
            assert len(errors) == 1 and name in errors[0] and CASES[name] in errors[0], (name, errors)
            assert "\n" not in errors[0].split(". ")[0]
            assert at.session_state["image_names"] == ([last_good] if last_good else [])  # the previous image stays
    torch.manual_seed(0)
    at.chat_input(key="question").set_value("What is it?")
    at.run()
    assert not at.exception
    assert all(name in e.value for e in at.error)  # the uploader still holds the last (bad) file: same message
    assert at.session_state["image_names"] == [last_good]
    assert len(at.session_state["history"]) == 1  # still answering, about the last good image
