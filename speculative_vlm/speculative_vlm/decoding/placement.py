"""Where a model runs: the ``device`` and ``dtype`` settings, parsed, checked on this machine, named.

Both sides take the same two settings (the verifier's ``--device/--dtype`` and YAML keys, the
drafter's ``draft_device``/``draft_dtype`` parameters): ``device`` is ``cpu``, ``cuda`` or
``cuda:N``; ``dtype`` is ``float32``, ``bfloat16`` or ``float16``. :func:`parse` checks the
spelling only (a config can be written on a machine without the GPU it names);
:func:`check` checks that this machine can run the pair, with an error that says what to do.

Lossless decoding is defined against the same model in the same dtype on the same device:
a bfloat16 target's own greedy output is the reference for a bfloat16 verifier, not the
float32 one (rounding changes near-ties, so the two may differ after a few tokens).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_KINDS = ("cpu", "cuda")


class PlacementError(ValueError):
    """A device or dtype setting that cannot be used; the message says which and what to do."""


class DeviceNotAvailable(PlacementError):
    """The device named is not on this machine (no CUDA build of torch, no GPU, index out of range)."""


class DtypeNotSupported(PlacementError):
    """The dtype cannot run on the device named."""


@dataclass(frozen=True)
class Placement:
    """A device and a dtype for one model."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(name for name, d in DTYPES.items() if d == self.dtype)

    def __str__(self) -> str:
        return f"{self.device} {self.dtype_name}"


def parse_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch.device (None = cpu); raises PlacementError otherwise."""
    if device is None or device == "":
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PlacementError(f"device {device!r} is not a device name ({exc}); use cpu, cuda or cuda:N") from None
    if parsed.type not in DEVICE_KINDS or (parsed.type == "cpu" and parsed.index not in (None, 0)):
        raise PlacementError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return parsed


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` as a torch.dtype (None = float32); raises PlacementError otherwise."""
    if dtype is None or dtype == "":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise PlacementError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise PlacementError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def parse(device: str | torch.device | None, dtype: str | torch.dtype | None) -> Placement:
    """The placement the settings name, spelling checked only (see :func:`check` for this machine)."""
    return Placement(parse_device(device), parse_dtype(dtype))


def check(device: str | torch.device | None, dtype: str | torch.dtype | None) -> Placement:
    """The placement the settings name, after checking that this machine can run it.

    Raises DeviceNotAvailable when CUDA is asked for and ``torch.cuda.is_available()`` is
    false (or the index is past the last GPU), and DtypeNotSupported when the device cannot
    compute in the dtype (bfloat16 before compute capability 8.0, or a dtype whose matrix
    products and softmax fail on the device).
    """
    placement = parse(device, dtype)
    if placement.device.type == "cuda":
        _check_cuda(placement)
    _probe(placement.device, placement.dtype)
    return placement


def _check_cuda(placement: Placement) -> None:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is a CPU-only build"
            fix = "install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
        else:
            why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
            fix = "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
        raise DeviceNotAvailable(f"device {str(placement.device)!r} was asked for but torch.cuda.is_available() is "
                                 f"False: {why}; {fix}, or run with device cpu")
    count = torch.cuda.device_count()
    if placement.device.index is not None and placement.device.index >= count:
        raise DeviceNotAvailable(f"device {str(placement.device)!r} was asked for but this machine has {count} GPU(s) "
                                 f"(cuda:0..cuda:{count - 1}); pick one of them")
    if placement.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(placement.device)
        raise DtypeNotSupported(f"dtype bfloat16 is not supported on {placement.device} ({name}, compute capability "
                                "below 8.0); use float16 or float32")


@functools.cache
def _probe(device: torch.device, dtype: torch.dtype) -> None:
    """Run what a decoder layer runs (matrix product, softmax) once in ``dtype`` on ``device``."""
    try:
        x = torch.ones((2, 8), dtype=dtype, device=device)
        torch.softmax(x @ x.T, dim=-1).float().sum().item()
    except RuntimeError as exc:
        raise DtypeNotSupported(f"dtype {dtype} does not run on {device} ({exc}); use float32") from None
