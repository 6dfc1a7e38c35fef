"""Where a record's images are: files under --images_path, or images stored in a parquet file."""
from __future__ import annotations

import os
from typing import Any, Union

from PIL import Image

from data_pipeline.image_decode import open_image

from .parquet import ParquetImage

ImageRef = Union[str, ParquetImage]  # an image file's path, or an image stored in a parquet file


def image_ref_key(ref: ImageRef) -> str:
    """What identifies an image among a dataset's samples: a file by its path, a parquet image by its hash."""
    return ref if isinstance(ref, str) else ref.key


def open_image_ref(ref: ImageRef) -> Image.Image:
    """The decoded RGB image behind a reference (ImageError with a one-line reason if it cannot be used)."""
    if isinstance(ref, ParquetImage):
        return open_image(ref.read(), name=ref.name)
    return open_image(ref)


def image_file(image: Any, images_path: str, images_root: str, image_prefix: str = "") -> str:
    """The record's image path, which must exist and lie under images_path once `..` and symlinks are resolved."""
    if not isinstance(image, str) or not image:
        raise ValueError("no image file named")
    path = os.path.join(images_path, image_prefix + image)
    try:
        real = os.path.realpath(path)
    except ValueError as e:  # an embedded NUL byte
        raise ValueError(f"bad image path {image!r} ({e})") from None
    if os.path.commonpath([images_root, real]) != images_root:
        raise ValueError(f"image outside --images_path: {image!r} resolves to {real}")
    if not os.path.exists(real):
        raise ValueError(f"missing image: {path}")
    return path
