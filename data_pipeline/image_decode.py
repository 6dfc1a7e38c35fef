"""Decoding image files and bytes into RGB PIL images: the one boundary where untrusted image data is opened.

Pillow's global limits are set here, by the code that opens images (not at import of the network): a
decompression bomb is refused before decoding, and compressed PNG text chunks are capped.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from typing import Optional, Union

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from model.vision import to_rgb

# Refuse images larger than this before decoding them (a decompression bomb is tiny on disk).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# Compressed PNG text and ICC chunks inflate at most this much each / in total per image (Pillow's defaults are
# 1 MB and 64 MB): a few hundred bytes on disk must not become hundreds of MB of metadata we never use.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 2 * 1024 * 1024

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and says what is wrong."""


def _image_label(source: ImageSource, name: Optional[str]) -> str:
    """How an image is named in error messages: the name given, its path, or "<uploaded image>"."""
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "<uploaded image>"


def _refuse_special_file(source: Union[str, os.PathLike], label: str) -> None:
    """Only regular files are images: a FIFO would block the reader, a device (/dev/urandom) never ends."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except OSError as e:
        raise ImageError(f"{label}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{label}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else
                "a character device" if stat.S_ISCHR(st.st_mode) else
                "a block device" if stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise ImageError(f"{label}: not a regular file ({kind})")
    if st.st_size == 0:
        raise ImageError(f"{label}: empty file (0 bytes)")


def open_image(source: ImageSource, name: Optional[str] = None) -> Image.Image:
    """Open and fully decode an image as RGB, or raise ImageError with a one-line reason.

    Handles RGBA/LA/P (transparency over white), L, CMYK, 16-bit and float images, EXIF rotation,
    and animated images (first frame). Images over MAX_IMAGE_PIXELS are refused before decoding.
    This is the one boundary for image decoding: whatever Pillow raises on a malformed file while
    opening, loading or converting it (OSError, ValueError, SyntaxError, NotImplementedError, struct
    errors, ...) becomes ImageError; Pillow's warnings about odd metadata are silenced.
    """
    label = _image_label(source, name)
    if isinstance(source, bytes) and not source:
        raise ImageError(f"{label}: empty file (0 bytes)")
    if isinstance(source, (str, os.PathLike)):
        _refuse_special_file(source, label)
    stage = "open"
    try:
        # PIL only warns (on stderr, several lines) between MAX_IMAGE_PIXELS and twice that: refuse those too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                img = source
            else:
                img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(f"{label}: refused, {w}x{h} pixels exceeds the limit of {MAX_IMAGE_PIXELS}")
            stage = "decode"
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{label}: refused, image too large ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image (unrecognised format)") from None
    except MemoryError:
        raise ImageError(f"{label}: refused, decoding it needs more memory than is available") from None
    except Exception as e:  # noqa: BLE001 - the decoding boundary: any Pillow failure is a bad file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        what = "unreadable image" if stage == "open" else "corrupt or truncated image"
        raise ImageError(f"{label}: {what} ({type(e).__name__}: {reason})") from None
