"""Test-wide settings and the fixtures many test files share.

An isolated DDS domain per test run, so parallel runs never cross-talk. Fixtures: rclpy for a
module (``rclpy_context``; ``ros`` also joins the simulated Go2's DDS domain), the nodes' executor
on a background thread (``spinner``), the simulated Go2 with wire taps (``go2_world``) and a
motion node driving it (``motion_rig``), a tiny
target and its draft (``models``), verifier servers started for a test (``cloud_server``), and
the package logger put back after a CLI's ``main()`` (``restore_logging``). Plain helpers: waiting
in polling.py, the robot side (ROS and the Go2) in go2_harness.py, the cloud's in cloud_harness.py,
tiny models in tiny_models.py.
"""

import contextlib
import logging
import os
import random
from collections.abc import Callable, Iterator

import pytest

# Chosen before any test imports rclpy or unitree_sdk2py; child processes inherit it.
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random().randint(1, 100)))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fixtures import rclpy, the Go2 SDK and torch when first used: after the lines above, and
# never for the tests that need none of them.


@pytest.fixture(scope="session")
def ros_domain_id() -> int:
    return int(os.environ["ROS_DOMAIN_ID"])


def _rclpy_for_the_module() -> Iterator:
    import rclpy

    if not rclpy.ok():
        rclpy.init()
    yield rclpy.get_default_context()
    rclpy.try_shutdown()


@pytest.fixture(scope="module")
def rclpy_context():
    """rclpy's default context, initialised for this module's tests and shut down after them."""
    yield from _rclpy_for_the_module()


@pytest.fixture(scope="module")
def ros():
    """As ``rclpy_context``, in a process that has first joined the simulated Go2's DDS domain
    (go2_harness), as the camera and motion nodes need."""
    from go2_harness import join_domain

    join_domain()
    yield from _rclpy_for_the_module()


@pytest.fixture
def spinner():
    """The nodes' executor spinning on a background thread for one test: ``spinner.add(node)``."""
    from go2_harness import Spinner

    spinning = Spinner()
    yield spinning
    spinning.shutdown()


@pytest.fixture(scope="module")
def go2_world(ros) -> Iterator[dict]:
    """The simulated Go2 (a subprocess) publishing state, with taps on its sport requests and state and
    an executor for the module's nodes: ``domain``, ``spinner``, ``sport``, ``state``."""
    from go2_harness import SimProcess, Spinner, SportTap, StateTap, go2_domain_id
    from polling import wait_for

    sim = SimProcess()
    spinning = Spinner()
    sport, state = SportTap(), StateTap()
    assert wait_for(lambda: state.received > 0, 10.0), "no state from the simulated Go2"
    yield {"domain": go2_domain_id(), "spinner": spinning, "sport": sport, "state": state}
    sport.close()
    state.close()
    spinning.shutdown()
    sim.stop()


@pytest.fixture
def motion_rig(go2_world):
    """A fresh, active motion node on the simulated Go2 with a probe node (go2_harness.MotionRig),
    the robot at rest; shut down after the test."""
    from go2_harness import MotionRig

    rig = MotionRig(go2_world)
    rig.wait_still()
    yield rig
    rig.close()


@pytest.fixture(scope="module")
def models():
    """A tiny llama target and its noisy-copy draft (tiny_models.tiny_pair), built once per module."""
    from tiny_models import tiny_pair

    return tiny_pair()


@pytest.fixture
def cloud_server() -> Iterator[Callable]:
    """Starts verifier servers in this process for one test, all stopped after it:
    ``cloud_server(config, engine, tokens="robot:TOKEN")`` (see cloud_harness.serving)."""
    from cloud_harness import serving

    with contextlib.ExitStack() as stack:
        yield lambda config, engine, **kwargs: stack.enter_context(serving(config, engine, **kwargs))


@pytest.fixture
def restore_logging():
    """main() configures the package logger for a process; put it back for the other tests."""
    logger = logging.getLogger("speculative_vlm")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved
