"""sensor_msgs/Image <-> numpy without cv_bridge (not installable here), following its conventions."""

from __future__ import annotations

import numpy as np
import pytest
from sensor_msgs.msg import Image
from speculative_vlm.nodes.image_conversion import ImageConversionError, image_to_numpy, numpy_to_image
from std_msgs.msg import Header

rng = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("encoding", "shape", "dtype"),
    [
        ("bgr8", (4, 5, 3), np.uint8),
        ("rgb8", (4, 5, 3), np.uint8),
        ("rgba8", (3, 2, 4), np.uint8),
        ("mono8", (4, 5), np.uint8),
        ("mono16", (4, 5), np.uint16),
        ("32FC1", (2, 3), np.float32),
    ],
)
def test_an_array_round_trips_through_an_image_message(encoding, shape, dtype):
    array = (rng.random(shape) * 1000).astype(dtype)
    msg = numpy_to_image(array, encoding, Header(frame_id="cam"))
    assert (msg.height, msg.width, msg.encoding, msg.header.frame_id) == (shape[0], shape[1], encoding, "cam")
    assert msg.step == shape[1] * (shape[2] if len(shape) == 3 else 1) * np.dtype(dtype).itemsize
    back = image_to_numpy(msg)
    assert back.dtype == dtype and np.array_equal(back, array)


def test_rows_padded_beyond_the_width_are_read_without_the_padding():
    array = rng.integers(0, 255, (3, 5), dtype=np.uint8)
    padded = np.zeros((3, 8), np.uint8)
    padded[:, :5] = array
    msg = Image(height=3, width=5, encoding="mono8", step=8, data=padded.tobytes())
    assert np.array_equal(image_to_numpy(msg), array)


def test_big_endian_16_bit_data_is_swapped_to_native():
    array = np.array([[1, 256, 65535]], np.uint16)
    msg = Image(height=1, width=3, encoding="mono16", step=6, is_bigendian=1, data=array.astype(">u2").tobytes())
    assert np.array_equal(image_to_numpy(msg), array)


def test_a_short_buffer_is_refused_with_the_sizes():
    msg = Image(height=4, width=4, encoding="bgr8", step=12, data=bytes(10))
    with pytest.raises(ImageConversionError, match="48"):
        image_to_numpy(msg)


def test_an_unsupported_encoding_is_refused():
    with pytest.raises(ImageConversionError, match="bayer"):
        image_to_numpy(Image(height=1, width=1, encoding="bayer_rggb8", step=1, data=b"\x00"))


def test_an_array_that_does_not_fit_the_encoding_is_refused():
    with pytest.raises(ImageConversionError, match="channel"):
        numpy_to_image(np.zeros((2, 2), np.uint8), "bgr8")
    with pytest.raises(ImageConversionError, match="dtype"):
        numpy_to_image(np.zeros((2, 2, 3), np.float64), "bgr8")
