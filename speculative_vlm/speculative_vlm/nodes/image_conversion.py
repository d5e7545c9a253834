"""``sensor_msgs/Image`` <-> numpy arrays.

Uses cv_bridge when it is importable (a ROS 2 install), else this module's own converter,
which follows cv_bridge's conventions for the encodings a camera pipeline needs: 8- and
16-bit mono, 8-bit BGR/RGB/BGRA/RGBA, rows padded to ``step``, big-endian data swapped.
"""

from __future__ import annotations

import sys

import numpy as np
from sensor_msgs.msg import Image
from std_msgs.msg import Header

try:  # pragma: no cover - not installable from PyPI (see ANCHORS)
    from cv_bridge import CvBridge

    _BRIDGE = CvBridge()
except ImportError:
    _BRIDGE = None

# encoding -> (numpy dtype, channels)
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgb8": (np.dtype(np.uint8), 3),
    "8UC3": (np.dtype(np.uint8), 3),
    "bgra8": (np.dtype(np.uint8), 4),
    "rgba8": (np.dtype(np.uint8), 4),
    "32FC1": (np.dtype(np.float32), 1),
}


class ImageConversionError(ValueError):
    """An image whose encoding, size or buffer does not allow the conversion; says which."""


def using_cv_bridge() -> bool:
    return _BRIDGE is not None


def numpy_to_image(array: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """An Image holding ``array`` (H x W or H x W x C) with the given encoding."""
    if encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported encoding {encoding!r}; supported: {sorted(ENCODINGS)}")
    dtype, channels = ENCODINGS[encoding]
    if array.dtype != dtype:
        raise ImageConversionError(f"{encoding} needs dtype {dtype}, got {array.dtype}")
    got = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else -1
    if got != channels:
        raise ImageConversionError(f"{encoding} needs {channels} channel(s), got array of shape {array.shape}")
    if _BRIDGE is not None:  # pragma: no cover
        msg = _BRIDGE.cv2_to_imgmsg(array, encoding=encoding)
    else:
        array = np.ascontiguousarray(array)
        msg = Image()
        msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
        msg.encoding = encoding
        msg.is_bigendian = int(sys.byteorder == "big")
        msg.step = int(array.strides[0])
        msg.data = array.tobytes()
    if header is not None:
        msg.header = header
    return msg


def image_to_numpy(msg: Image) -> np.ndarray:
    """A numpy view (copy) of an Image: H x W for one channel, H x W x C otherwise."""
    if _BRIDGE is not None:  # pragma: no cover
        return _BRIDGE.imgmsg_to_cv2(msg, desired_encoding="passthrough")
    if msg.encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported encoding {msg.encoding!r}; supported: {sorted(ENCODINGS)}")
    dtype, channels = ENCODINGS[msg.encoding]
    row = msg.width * channels * dtype.itemsize
    if msg.step < row:
        raise ImageConversionError(f"step {msg.step} is shorter than a row ({row} bytes) of a {msg.width}-wide {msg.encoding}")
    buf = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    if buf.size < msg.step * msg.height:
        raise ImageConversionError(f"data has {buf.size} bytes, {msg.height} rows of step {msg.step} need {msg.step * msg.height}")
    rows = buf[: msg.step * msg.height].reshape(msg.height, msg.step)[:, :row]
    dt = dtype.newbyteorder(">" if msg.is_bigendian else "<")
    array = np.ascontiguousarray(rows).view(dt).astype(dtype)
    shape = (msg.height, msg.width) if channels == 1 else (msg.height, msg.width, channels)
    return array.reshape(shape)
