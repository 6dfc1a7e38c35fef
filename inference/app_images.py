"""Images as the apps decode them, by generation.

v1 composites a transparent image onto white (data_pipeline.image_decode.open_image, the one decoding boundary).
minimind-3v's upstream drops the alpha channel of an RGBA or LA image instead (`image.convert('RGB')`, spec §4
`image2tensor`): the colours under transparent pixels are kept, so the features match upstream's only when the
apps do the same. open_app_image decodes through open_image (every check, limit and one-line error), and for
a 3v model drops the alpha channel of an RGBA/LA image in that same decode.
"""
from __future__ import annotations

from typing import Optional

from PIL import Image

from data_pipeline.image_decode import ImageSource, open_image


def open_app_image(source: ImageSource, name: Optional[str] = None, generation: str = "v1") -> Image.Image:
    """An RGB image for a model of `generation`: open_image's for v1 (transparency over white), the alpha channel
    dropped for 3v, in the same single decode. Raises ImageError (one line naming the image) for anything
    open_image refuses."""
    return open_image(source, name=name, drop_alpha=generation == "3v")
