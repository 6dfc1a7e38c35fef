"""The image-decoding boundary under hostile files: a seeded mutation fuzzer over every format Pillow can
write here, float TIFFs, PNG text chunks that inflate without bound, and files that are not regular files.

`open_image` must return an RGB image or raise the one-line ImageError, never anything else.
"""
from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.image_decode import ImageError, open_image

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "TGA", "SGI", "DDS", "XBM"]
MUTATIONS_PER_FORMAT = 40  # 480 in all, about a second


def _valid_file(fmt: str) -> bytes:
    pixels = (np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    (img.convert("1") if fmt == "XBM" else img).save(buf, fmt)
    return buf.getvalue()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: flip a few bytes, truncate, insert random bytes, or stamp an extreme value into the header."""
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:
        out = out[:rng.randrange(len(out))]
    elif kind == 2:
        at = rng.randrange(len(out))
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        at = rng.randrange(min(64, len(out)))
        out[at:at + 4] = bytes([rng.choice([0x00, 0xFF, 0x7F, 0x80])] * 4)
    return bytes(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_files_give_an_image_or_an_image_error(fmt):
    data = _valid_file(fmt)
    assert open_image(data).mode == "RGB"  # the unmutated file works
    rng = random.Random(f"fuzz-{fmt}")
    escaped = []
    for i in range(MUTATIONS_PER_FORMAT):
        try:
            img = open_image(_mutate(data, rng), name=f"{fmt.lower()}-mutant-{i}")
            assert img.mode == "RGB"
        except ImageError as e:
            assert "\n" not in str(e) and f"{fmt.lower()}-mutant-{i}" in str(e)
        except Exception as e:  # noqa: BLE001 - the point of the test
            escaped.append(f"mutant {i}: {type(e).__name__}: {e}")
    assert not escaped, escaped


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_png_text_chunks_are_capped_in_total():
    """40 compressed text chunks of 200 KB each: under Pillow's defaults they would take 8 MB; refused."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    pixels = _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + b"\1\2\3" * 8 for _ in range(8))))
    text = b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"a" * (200 << 10))) for i in range(40))
    data = b"\x89PNG\r\n\x1a\n" + header + text + pixels + _chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="text chunks"):
        open_image(data, name="texty.png")


def test_float_tiff_in_unit_range_is_not_black(tmp_path):
    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, "F").save(tmp_path / "unit.tif")
    out = np.asarray(open_image(str(tmp_path / "unit.tif")))[..., 0]
    assert out.max() == 255 and abs(out.mean() - 127.5) < 2  # 0..1 maps to 0..255
    big = np.full((4, 4), 200.0, dtype=np.float32)  # a float image already on a 0..255 scale stays there
    Image.fromarray(big, "F").save(tmp_path / "byte_scale.tif")
    assert np.asarray(open_image(str(tmp_path / "byte_scale.tif")))[0, 0, 0] == 200


def test_files_that_are_not_regular_files_are_named_honestly(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it to read would block forever
    with pytest.raises(ImageError, match=r"pipe.png: not a regular file \(a FIFO"):
        open_image(str(fifo))
    if Path("/dev/urandom").exists():
        with pytest.raises(ImageError, match=r"/dev/urandom: not a regular file \(a character device\)"):
            open_image("/dev/urandom")
    with pytest.raises(ImageError, match="is a directory"):
        open_image(str(tmp_path))
