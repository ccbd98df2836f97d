"""Images to uint8 grayscale ``[H, W]``: JPEG/PNG bytes or raw GRAY8/BGR8 pixels. One decoder for
the server's frames and for ``trainer fit``'s check of the training images.

JPEG goes through libjpeg-turbo in strict mode (``simplejpeg``, which ships libjpeg-turbo in its
wheel): data libjpeg calls corrupt (a scan cut short, a header declaring more rows than the scan
holds, bad Huffman codes) is an error, never a frame padded with grey. OpenCV's ``imdecode``
decodes such data "successfully" and prints the warning only on stderr, which is why it is not
used for JPEG. The grey levels are libjpeg's own grayscale output, identical to
``cv2.imread(path, cv2.IMREAD_GRAYSCALE)`` on the training JPEGs (a test checks it). PNG (lossless,
checksummed) goes through OpenCV; raw BGR8 through ``cv2.cvtColor(..., cv2.COLOR_BGR2GRAY)``.

Orientation metadata (EXIF) is ignored, deliberately: a line camera's frame is the strip as it
passed the sensor, and rotating it by a tag would hand the model a different image from the one
inspected (or, at 90 degrees, the wrong shape).

Encoded images declare their size in a header; it is read and checked against the pixel limit
and the expected size *before* anything is decoded, so a decompression bomb (a few KB declaring
gigapixels) costs nothing. Every rejection raises :class:`FrameRejected` with a message naming the
problem; the caller prefixes what the image is (the camera and frame id, the file).
"""

from __future__ import annotations

import struct

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers carry the image size; 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


class FrameRejected(ValueError):
    """An image (a camera frame, a training image) that cannot be used; the message says why."""


def image_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"``, or None when the bytes are neither."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SOI):
        return "jpeg"
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    # signature (8) | IHDR length (4) | b"IHDR" | width (4) | height (4), big-endian
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise FrameRejected("PNG header is truncated or corrupt (no IHDR chunk after the signature)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    view = memoryview(data)
    pos = 2
    end = len(data)
    while pos < end:
        if view[pos] != 0xFF:
            raise FrameRejected(f"JPEG is corrupt: expected a marker at byte {pos}")
        while pos < end and view[pos] == 0xFF:  # fill bytes may pad markers
            pos += 1
        if pos >= end:
            break
        marker = view[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            raise FrameRejected("JPEG has no frame header (SOF) before its scan data")
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", view[pos:pos + 2])
        if length < 2:
            raise FrameRejected(f"JPEG is corrupt: segment 0x{marker:02X} has length {length}")
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                break
            height, width = struct.unpack(">HH", view[pos + 3:pos + 7])
            return width, height
        pos += length
    raise FrameRejected("JPEG header is truncated (no frame header found)")


def declared_size(data: bytes) -> tuple[str, int, int]:
    """The format and the ``(width, height)`` an encoded image's header declares, without decoding.

    Raises:
        FrameRejected: empty bytes, neither JPEG nor PNG, or a truncated/corrupt header.
    """
    if not data:
        raise FrameRejected("encoded_image is empty")
    fmt = image_format(data)
    if fmt is None:
        raise FrameRejected(
            f"encoded_image is neither JPEG nor PNG (starts with {bytes(data[:8]).hex(' ')}); "
            "send JPEG/PNG bytes or a raw_image"
        )
    width, height = _png_size(data) if fmt == "png" else _jpeg_size(data)
    return fmt, width, height


def check_size(width: int, height: int, expected: tuple[int, int], max_pixels: int, what: str) -> None:
    """Rejects a declared size over the pixel limit, empty, or different from the model's input size.

    Args:
        expected: the model's input ``(height, width)``.
    """
    if width * height > max_pixels:
        raise FrameRejected(
            f"{what} declares {width}x{height} = {width * height} pixels, over the server's limit of "
            f"{max_pixels} pixels per frame"
        )
    if width == 0 or height == 0:
        raise FrameRejected(f"{what} is empty ({width}x{height} pixels)")
    if (height, width) != tuple(expected):
        raise FrameRejected(
            f"{what} is {width}x{height} (width x height); the model takes {expected[1]}x{expected[0]} frames"
        )


def decode_encoded(data: bytes, expected: tuple[int, int] | None, max_pixels: int) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 grayscale ``[H, W]``, of exactly the ``expected`` ``(height, width)``
    when given (None takes any size within ``max_pixels``).

    Raises:
        FrameRejected: not JPEG/PNG, over the pixel limit, the wrong size, or corrupt/truncated data.
    """
    fmt, width, height = declared_size(data)
    what = f"{fmt.upper()} image"
    check_size(width, height, expected if expected is not None else (height, width), max_pixels, what)
    frame = _decode_jpeg(data) if fmt == "jpeg" else _decode_png(data)
    if frame.shape != (height, width):  # a header that lied about its size
        raise FrameRejected(
            f"{what} decoded to {frame.shape[1]}x{frame.shape[0]} although its header declares {width}x{height}"
        )
    return frame


def _decode_jpeg(data: bytes) -> np.ndarray:
    import simplejpeg

    try:
        # strict: libjpeg's "corrupt data" warnings are errors (the default, stated for the reader).
        frame = simplejpeg.decode_jpeg(data, colorspace="GRAY", strict=True)
    except ValueError as exc:
        raise FrameRejected(f"JPEG image is corrupt or truncated ({exc})") from None
    return frame[:, :, 0]


def _decode_png(data: bytes) -> np.ndarray:
    import cv2

    flags = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        frame = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise FrameRejected(f"PNG image could not be decoded ({exc.err or exc})") from None
    if frame is None:
        raise FrameRejected("PNG image could not be decoded (corrupt or truncated data)")
    return frame


def decode_raw(
    width: int, height: int, channels: int, data: bytes, expected: tuple[int, int], max_pixels: int
) -> np.ndarray:
    """Raw GRAY8 (1 channel) or BGR8 (3 channels) row-major pixels -> uint8 grayscale ``[H, W]``."""
    if channels not in (1, 3):
        raise FrameRejected(f"raw_image has {channels} channels; expected 1 (GRAY8) or 3 (BGR8)")
    check_size(width, height, expected, max_pixels, "raw_image")
    if len(data) != width * height * channels:
        raise FrameRejected(
            f"raw_image data has {len(data)} bytes; {width}x{height}x{channels} needs {width * height * channels}"
        )
    pixels = np.frombuffer(data, dtype=np.uint8)
    if channels == 1:
        return pixels.reshape(height, width)
    import cv2

    return cv2.cvtColor(pixels.reshape(height, width, 3), cv2.COLOR_BGR2GRAY)
