"""Broken JPEGs as a faulty camera or a bad copy makes them, from real encoded bytes (shared by the
decoder, server and trainer tests)."""

from __future__ import annotations

import struct

import cv2
import numpy as np


def strip_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A steel-strip-like grey frame: streaks along the rolling direction, texture, a dark scratch."""
    rng = np.random.default_rng(seed)
    image = rng.normal(120, 25, (height, width)) + rng.normal(0, 15, (1, width))
    image[height // 3: height // 3 + 4, width // 4: width // 2] = 30
    return cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def truncated_mid_scan(data: bytes) -> bytes:
    """The scan cut in half, with an end-of-image marker appended (a transfer that stopped early)."""
    scan = data.index(b"\xff\xda")
    return data[: scan + (len(data) - scan) // 2] + b"\xff\xd9"


def declaring(data: bytes, width: int, height: int) -> bytes:
    """The same bytes with a baseline frame header (SOF0) declaring another size."""
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def with_orientation(data: bytes, orientation: int) -> bytes:
    """The same JPEG with an EXIF APP1 segment carrying only an Orientation tag (0x0112)."""
    entry = struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)  # tag, SHORT, count 1, value
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]
