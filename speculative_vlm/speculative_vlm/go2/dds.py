"""The process-wide unitree_sdk2py DDS domain.

unitree_sdk2py keeps one CycloneDDS participant per process (``ChannelFactory`` is a
singleton), so a process can talk to exactly one robot domain on one network interface.
This module initialises it once and refuses a second, different request loudly instead of
letting the SDK silently keep the first one.
"""

from __future__ import annotations

import threading

from unitree_sdk2py.core.channel import ChannelFactoryInitialize

# The real Go2 talks on DDS domain 0; domains 0..232 are the valid RTPS domain ids.
GO2_DOMAIN_ID = 0
MAX_DOMAIN_ID = 232

_lock = threading.Lock()
_current: tuple[int, str] | None = None


class DdsDomainError(RuntimeError):
    """The SDK's process-wide DDS domain cannot be (re)initialised as asked."""


def init_domain(domain_id: int, interface: str) -> None:
    """Initialise the SDK's DDS domain on ``interface`` (e.g. ``lo``, ``eth0``); idempotent.

    Raises :class:`DdsDomainError` if this process already joined another domain or
    interface: run the second robot connection in its own process.
    """
    global _current
    if not 0 <= domain_id <= MAX_DOMAIN_ID:
        raise DdsDomainError(f"DDS domain id {domain_id} is outside 0..{MAX_DOMAIN_ID}")
    if not interface:
        raise DdsDomainError("network interface is empty; name one, e.g. 'lo' for the sim or 'eth0' for a Go2")
    with _lock:
        if _current is not None:
            if _current != (domain_id, interface):
                raise DdsDomainError(
                    f"this process already uses DDS domain {_current[0]} on {_current[1]!r}; "
                    f"domain {domain_id} on {interface!r} needs its own process "
                    "(unitree_sdk2py keeps one participant per process)"
                )
            return
        try:
            ChannelFactoryInitialize(domain_id, interface)
        except Exception as exc:  # the SDK raises a bare Exception
            raise DdsDomainError(
                f"could not join DDS domain {domain_id} on interface {interface!r}: {exc}; "
                "check the interface name with `ip link`"
            ) from exc
        _current = (domain_id, interface)


def current_domain() -> tuple[int, str] | None:
    """The (domain id, interface) this process joined, or None."""
    return _current
