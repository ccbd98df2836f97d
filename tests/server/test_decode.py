"""Frame decoding: the same grayscale the training data layer reads, and a clear error for every bad frame."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from engine.decode import FrameRejected, declared_size, decode_encoded, decode_raw
from protos.inspection.v1 import inspection_pb2 as pb
from server.decode import decode_request

SIZE = (64, 320)  # (height, width)
LIMIT = 4096 * 4096


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=SIZE, dtype=np.uint8)


def encode(image: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def test_png_round_trips_exactly(frame: np.ndarray) -> None:
    assert np.array_equal(decode_encoded(encode(frame, ".png"), SIZE, LIMIT), frame)


def test_three_identical_channels_decode_to_that_channel(frame: np.ndarray) -> None:
    # Severstal JPEGs are three equal channels; as PNG (lossless) the gray result must be exact.
    bgr = np.repeat(frame[:, :, None], 3, axis=2)
    assert np.array_equal(decode_encoded(encode(bgr, ".png"), SIZE, LIMIT), frame)
    raw = decode_raw(SIZE[1], SIZE[0], 3, bgr.tobytes(), SIZE, LIMIT)
    assert np.array_equal(raw, frame)


def test_jpeg_is_read_like_the_training_data(tmp_path: Path, frame: np.ndarray) -> None:
    from trainer.data import DataConfig, read_image

    bgr = np.stack([frame, np.roll(frame, 1, axis=1), frame // 2], axis=2)  # a colour image: conversion matters
    path = tmp_path / "strip.jpg"
    path.write_bytes(encode(bgr, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 90))
    training = read_image(path, DataConfig(height=SIZE[0], width=SIZE[1]))
    assert np.array_equal(decode_encoded(path.read_bytes(), SIZE, LIMIT), training)


def test_raw_bgr8_uses_cvtcolor(frame: np.ndarray) -> None:
    bgr = np.stack([frame, np.roll(frame, 3, axis=0), 255 - frame], axis=2)
    expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(decode_raw(SIZE[1], SIZE[0], 3, bgr.tobytes(), SIZE, LIMIT), expected)
    assert not np.array_equal(expected, frame)  # the conversion really mixed the channels


def test_raw_gray8(frame: np.ndarray) -> None:
    request = pb.InspectRequest(raw_image=pb.RawImage(width=SIZE[1], height=SIZE[0], channels=1, data=frame.tobytes()))
    assert np.array_equal(decode_request(request, SIZE, LIMIT), frame)


@pytest.mark.parametrize("params", [(), (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)], ids=["baseline", "progressive"])
def test_jpeg_header_size(frame: np.ndarray, params: tuple[int, ...]) -> None:
    assert declared_size(encode(frame, ".jpg", *params)) == ("jpeg", SIZE[1], SIZE[0])


def png_declaring(data: bytes, width: int, height: int) -> bytes:
    return data[:16] + struct.pack(">II", width, height) + data[24:]


def jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    sof = data.index(b"\xff\xc0")  # baseline frame header: marker, length (2), precision (1), height, width
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9:]


def bad_requests(frame: np.ndarray) -> dict[str, tuple[pb.InspectRequest, str]]:
    """Every kind of bad frame, with a phrase its error message must contain."""
    png = encode(frame, ".png")
    jpeg = encode(frame, ".jpg")
    small = encode(frame[:32, :160], ".png")
    h, w = SIZE

    def raw(width: int, height: int, channels: int, data: bytes) -> pb.InspectRequest:
        return pb.InspectRequest(raw_image=pb.RawImage(width=width, height=height, channels=channels, data=data))

    return {
        "no image": (pb.InspectRequest(), "carries no image"),
        "empty bytes": (pb.InspectRequest(encoded_image=b""), "empty"),
        "not an image": (pb.InspectRequest(encoded_image=b"GIF89a" + bytes(100)), "neither JPEG nor PNG"),
        "truncated PNG header": (pb.InspectRequest(encoded_image=png[:20]), "PNG header is truncated"),
        "corrupt PNG data": (pb.InspectRequest(encoded_image=png[:40] + bytes(200)), "could not be decoded"),
        "truncated JPEG header": (pb.InspectRequest(encoded_image=jpeg[:30]), "JPEG"),
        "wrong size PNG": (pb.InspectRequest(encoded_image=small), "160x32"),
        "PNG bomb": (pb.InspectRequest(encoded_image=png_declaring(png, 100_000, 100_000)), "over the server's limit"),
        "JPEG bomb": (pb.InspectRequest(encoded_image=jpeg_declaring(jpeg, 65_000, 65_000)), "over the server's limit"),
        "empty raw": (raw(0, 0, 1, b""), "empty"),
        "raw 2 channels": (raw(w, h, 2, bytes(w * h * 2)), "2 channels"),
        "raw wrong size": (raw(w // 2, h, 1, bytes(w * h // 2)), "160x64"),
        "raw short data": (raw(w, h, 1, bytes(w * h - 1)), f"{w * h - 1} bytes"),
        "raw bomb": (raw(100_000, 100_000, 1, b""), "over the server's limit"),
    }


@pytest.mark.parametrize("kind", list(bad_requests(np.zeros(SIZE, np.uint8))))
def test_bad_frame_is_rejected_with_a_clear_message(frame: np.ndarray, kind: str) -> None:
    request, phrase = bad_requests(frame)[kind]
    with pytest.raises(FrameRejected) as info:
        decode_request(request, SIZE, LIMIT)
    assert phrase in str(info.value), f"{kind}: {info.value}"


def test_size_check_happens_before_decoding(frame: np.ndarray) -> None:
    # The bomb's header says 100000x100000 but its pixel data is the small frame's: had it been
    # decoded, cv2 would have failed or allocated 10 GB. The limit error proves it was not.
    bomb = png_declaring(encode(frame, ".png"), 100_000, 100_000)
    with pytest.raises(FrameRejected, match="declares 100000x100000"):
        decode_encoded(bomb, SIZE, LIMIT)
