"""Waiting in tests for something another thread or process does: poll a condition until a deadline.

``wait_for`` answers whether the condition came true in time (the test asserts on it, with its own
message); ``wait_until`` asserts itself, naming what it waited for; ``read_until`` returns the last
reading (a scrape, a health answer) for the test to judge; ``result_of`` waits for a future (rclpy's
or concurrent.futures') and returns its result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.01) -> bool:
    """Poll ``predicate`` every ``step`` s for up to ``timeout`` s; whether it held (it is asked once
    more at the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05,
               unless: Callable[[], Any] | None = None) -> None:
    """Poll ``predicate`` until it holds; fail the test, naming ``what``, if ``timeout`` s pass first
    or if ``unless`` comes true first (say, the goal that should have shown it ended)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert unless is None or not unless(), f"{what} never came: it ended first"
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(step)


def read_until(read: Callable[[], T], done: Callable[[T], Any], timeout: float, step: float = 0.05) -> T:
    """Call ``read`` every ``step`` s until ``done`` holds for what it read or ``timeout`` s pass;
    the last value read."""
    deadline = time.monotonic() + timeout
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(step)
    return value


def result_of(future, timeout: float, what: str = "a future") -> Any:
    """The result of ``future`` once it is done; fail the test, naming ``what``, after ``timeout`` s."""
    wait_until(future.done, timeout, what, step=0.02)
    return future.result()
