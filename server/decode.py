"""Camera frames from the wire: an ``InspectRequest``'s image -> uint8 grayscale ``[H, W]``.

The decoding itself (JPEG in strict libjpeg-turbo, PNG, raw GRAY8/BGR8, the header checks against
decompression bombs) is :mod:`engine.decode`, shared with ``trainer fit``'s check of the training
images; this module picks the request's image and the server's limits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.decode import FrameRejected, decode_encoded, decode_raw, image_format

__all__ = ["FrameRejected", "decode_request", "image_format"]


def decode_request(request: Any, expected: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Decodes an ``inspection.v1.InspectRequest``'s image (encoded or raw)."""
    kind = request.WhichOneof("image")
    if kind == "encoded_image":
        return decode_encoded(request.encoded_image, expected, max_pixels)
    if kind == "raw_image":
        raw = request.raw_image
        return decode_raw(raw.width, raw.height, raw.channels, raw.data, expected, max_pixels)
    raise FrameRejected("request carries no image: set encoded_image (JPEG/PNG) or raw_image")
