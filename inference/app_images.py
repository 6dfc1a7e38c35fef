"""Images as the apps decode them, by generation.

v1 composites a transparent image onto white (data_pipeline.image_decode.open_image, the one decoding boundary).
minimind-3v's upstream drops the alpha channel of an RGBA or LA image instead (`image.convert('RGB')`, spec §4
`image2tensor`): the colours under transparent pixels are kept, so the features match upstream's only when the
apps do the same. open_app_image decodes through open_image first (every check, limit and one-line error), and for
a 3v model reopens an RGBA/LA file to drop its alpha channel.
"""
from __future__ import annotations

import io
import os
from typing import Optional

from PIL import Image, ImageOps

from data_pipeline.image_decode import ImageError, ImageSource, decompression_bomb_guard, open_image

ALPHA_MODES = ("RGBA", "LA")  # what upstream's image2tensor converts; other modes go through to_rgb as in v1


def open_app_image(source: ImageSource, name: Optional[str] = None, generation: str = "v1") -> Image.Image:
    """An RGB image for a model of `generation`: open_image's for v1 (transparency over white), the alpha channel
    dropped for 3v. Raises ImageError (one line naming the image) for anything open_image refuses."""
    image = open_image(source, name=name)
    if generation != "3v":
        return image
    try:
        with decompression_bomb_guard():  # open_image has checked the size; the file decoded once already
            if isinstance(source, Image.Image):
                raw = source
            elif isinstance(source, bytes):
                raw = Image.open(io.BytesIO(source))
            else:
                raw = Image.open(os.fspath(source))
            if raw.mode not in ALPHA_MODES:
                return image
            if getattr(raw, "is_animated", False):
                raw.seek(0)
            raw.load()
            return ImageOps.exif_transpose(raw).convert("RGB")
    except Exception as e:  # noqa: BLE001 - the file changed since open_image read it
        raise ImageError(f"{name or source}: could not be read again to drop its alpha channel "
                         f"({type(e).__name__})") from None
