"""engine.decode on broken JPEGs: corruption libjpeg only warns about is an error, and orientation
metadata never rotates a frame."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from engine.decode import FrameRejected, decode_encoded
from tests.jpeg_faults import declaring, jpeg, strip_image, truncated_mid_scan, with_orientation

SIZE = (128, 800)  # (height, width)
LIMIT = 4096 * 4096


@pytest.fixture(scope="module")
def strip_jpeg() -> bytes:
    return jpeg(strip_image(*SIZE))


def test_intact_jpeg_decodes_like_cv2_imread(strip_jpeg, tmp_path):
    # The training data layer reads with cv2.imread(IMREAD_GRAYSCALE): the same grey levels exactly.
    path = tmp_path / "strip.jpg"
    path.write_bytes(strip_jpeg)
    assert np.array_equal(decode_encoded(strip_jpeg, SIZE, LIMIT), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))


def test_jpeg_truncated_mid_scan_is_rejected(strip_jpeg):
    broken = truncated_mid_scan(strip_jpeg)
    # What made this a bug: OpenCV "decodes" it, filling the missing rows with grey.
    assert cv2.imdecode(np.frombuffer(broken, np.uint8), cv2.IMREAD_GRAYSCALE).shape == SIZE
    with pytest.raises(FrameRejected, match="JPEG image is corrupt or truncated"):
        decode_encoded(broken, SIZE, LIMIT)


def test_jpeg_header_claiming_more_pixels_than_its_data_is_rejected(strip_jpeg):
    lying = declaring(strip_jpeg, 1600, 256)  # 800x128 of scan data under a 1600x256 header
    assert cv2.imdecode(np.frombuffer(lying, np.uint8), cv2.IMREAD_GRAYSCALE).shape == (256, 1600)
    with pytest.raises(FrameRejected, match="JPEG image is corrupt or truncated"):
        decode_encoded(lying, (256, 1600), LIMIT)
    with pytest.raises(FrameRejected, match="1600x256"):  # and for a model of the real size, the size error
        decode_encoded(lying, SIZE, LIMIT)


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_orientation_never_rotates_the_frame(strip_jpeg, orientation):
    # 3: rotate 180 degrees, 6: 90 degrees. A line camera's frame is the strip as it passed the sensor.
    tagged = with_orientation(strip_jpeg, orientation)
    assert np.array_equal(decode_encoded(tagged, SIZE, LIMIT), decode_encoded(strip_jpeg, SIZE, LIMIT))


def test_any_size_is_accepted_without_an_expected_size(strip_jpeg):
    assert decode_encoded(strip_jpeg, None, LIMIT).shape == SIZE
    with pytest.raises(FrameRejected, match="over the server's limit"):
        decode_encoded(strip_jpeg, None, 1000)
