"""Images decoded for the vision tower: each one resized to the tower's input size as soon as it is decoded.

A batch of questions then holds small images whatever size their files declare (16 images declared 7000x7000
would otherwise be held full-size, gigabytes, until the batch is encoded). The encoder's preprocessing resizes to
that same size with the same bicubic filter, which leaves an image already that size as it is: the features are
unchanged. The API server does the same with the images of a queued request.
"""
from __future__ import annotations

from typing import Optional

from PIL import Image

from data_pipeline.image_decode import ImageSource
from inference.app_images import open_app_image


def tower_size(encoder) -> Optional[int]:
    """The side of the square the encoder resizes every image to, or None when it says none."""
    return getattr(getattr(encoder, "preprocess", None), "size", None)


def decode_for_encoder(encoder, source: ImageSource, name: Optional[str] = None) -> Image.Image:
    """open_image (ImageError with one line naming the image), resized to tower_size(encoder). For 3v's SigLIP2
    tower a transparent image loses its alpha channel, as upstream's does (inference.app_images); v1's CLIP gets it
    over white."""
    generation = "3v" if getattr(encoder, "kind", "clip") == "siglip" else "v1"
    image = open_app_image(source, name, generation)
    size = tower_size(encoder)
    return image if size is None or image.size == (size, size) else image.resize((size, size), Image.BICUBIC)
