"""Test-wide settings: an isolated DDS domain per test run, so parallel runs never cross-talk."""

import os
import random

import pytest

# Chosen before any test imports rclpy or unitree_sdk2py; child processes inherit it.
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random().randint(1, 100)))
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ros_domain_id() -> int:
    return int(os.environ["ROS_DOMAIN_ID"])


@pytest.fixture(scope="module")
def ros():
    """rclpy initialised in this process, which has joined the simulated Go2's DDS domain (go2_harness).
    Modules that need rclpy set up otherwise define their own ``ros``."""
    import rclpy
    from go2_harness import init_rclpy, join_domain

    join_domain()
    init_rclpy()
    yield None
    rclpy.try_shutdown()
