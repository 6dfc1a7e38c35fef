"""Decoding image files and bytes into RGB PIL images: the one boundary where untrusted image data is opened.

Pillow's global limits are set here, by the code that opens images (not at import of the network): a
decompression bomb is refused before decoding, and compressed PNG text chunks are capped.
"""
from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Union

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from checkpoints.files import first_line, regular_file_problem
from model.vision import to_rgb

# Refuse images larger than this before decoding them (a decompression bomb is tiny on disk).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Compressed PNG text and ICC chunks inflate at most this much each / in total per image (Pillow's defaults are
# 1 MB and 64 MB): a few hundred bytes on disk must not become hundreds of MB of metadata we never use.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 2 * 1024 * 1024

ImageSource = Union[str, os.PathLike, bytes, Image.Image]
ALPHA_MODES = ("RGBA", "LA")  # what drop_alpha converts; other modes go through to_rgb


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and says what is wrong."""


def _image_label(source: ImageSource, name: Optional[str]) -> str:
    """How an image is named in error messages: the name given, its path, or "<uploaded image>"."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<uploaded image>"


class ImageTooLargeError(ValueError):
    """An image over MAX_IMAGE_PIXELS, refused from its header; the caller puts the image's name in front."""


@contextmanager
def decompression_bomb_guard() -> Iterator[None]:
    """Pillow calls inside this block see no warnings about odd metadata, and a decompression bomb raises
    ImageTooLargeError: Pillow's own refusal (over twice MAX_IMAGE_PIXELS) and its multi-line warning (between
    one and two times the limit) alike; check_pixel_count covers an image opened before the block."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"refused, image too large ({first_line(e)})") from None


def check_pixel_count(img: Image.Image) -> None:
    """ImageTooLargeError for an image of more than MAX_IMAGE_PIXELS pixels, from its header alone."""
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(f"refused, {width}x{height} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")


def open_image(source: ImageSource, name: Optional[str] = None, drop_alpha: bool = False) -> Image.Image:
    """Open and fully decode an image as RGB, or raise ImageError with a one-line reason.

    Handles RGBA/LA/P (transparency over white), L, CMYK, 16-bit and float images, EXIF rotation,
    and animated images (first frame). Images over MAX_IMAGE_PIXELS are refused before decoding.
    drop_alpha: an RGBA or LA image loses its alpha channel instead (the colours under transparent pixels are
    kept), as minimind-3v's upstream converts images (inference.app_images).
    This is the one boundary for image decoding: whatever Pillow raises on a malformed file while
    opening, loading or converting it (OSError, ValueError, SyntaxError, NotImplementedError, struct
    errors, ...) becomes ImageError; Pillow's warnings about odd metadata are silenced.
    """
    label = _image_label(source, name)
    if isinstance(source, bytes) and not source:
        raise ImageError(f"{label}: empty file (0 bytes)")
    if isinstance(source, (str, os.PathLike)):
        problem = regular_file_problem(source, "an image file")
        if problem is not None:
            raise ImageError(f"{label}: {problem}")
    stage = "open"
    try:
        with decompression_bomb_guard():
            if isinstance(source, Image.Image):
                img = source
            else:
                img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            check_pixel_count(img)
            stage = "decode"
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            if drop_alpha and img.mode in ALPHA_MODES:
                return img.convert("RGB")
            return to_rgb(img)
    except ImageTooLargeError as e:
        raise ImageError(f"{label}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (unrecognised format)") from None
    except MemoryError:
        raise ImageError(f"{label}: refused, decoding it needs more memory than is available") from None
    except Exception as e:  # noqa: BLE001 - the decoding boundary: any Pillow failure is a bad file
        what = "unreadable image" if stage == "open" else "corrupt or truncated image"
        raise ImageError(f"{label}: {what} ({type(e).__name__}: {first_line(e)})") from None
