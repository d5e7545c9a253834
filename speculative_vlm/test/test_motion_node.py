"""The motion node driving the simulated Go2 over real DDS with the real SportClient.

The simulated Go2 runs as a separate process; these tests watch the sport requests on the
wire (rt/api/sport/request) and the robot's own state (rt/sportmodestate), not the node's
account of itself.
"""

from __future__ import annotations

import math
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from geometry_msgs.msg import Twist, Vector3
from go2_harness import STOP_MOVE, MotionRig, SportTap, assert_parameter_file_matches
from polling import wait_for
from rclpy.node import Node
from rclpy.parameter import Parameter
from speculative_vlm.nodes.motion import MotionNode
from std_msgs.msg import Bool

from speculative_vlm_msgs.msg import LocomotionCommand

pytestmark = pytest.mark.ros

RATE, STALE = MotionRig.RATE, MotionRig.STALE  # the rig's move_rate_hz and stale_timeout_s



def vec(x: float = 0.0, y: float = 0.0, z: float = 0.0) -> Vector3:
    return Vector3(x=x, y=y, z=z)


def test_move_command_moves_the_robot_the_expected_distance_at_the_move_rate_then_stops(motion_rig):
    x0, y0 = motion_rig.state.position()
    t0 = motion_rig.move(0.5, 2.0)
    assert wait_for(lambda: motion_rig.sport.since(t0, STOP_MOVE), 4.0), "no StopMove after the command's duration"
    t_stop = motion_rig.sport.since(t0, STOP_MOVE)[0][0]
    moves = motion_rig.sport.moves_since(t0)
    assert all(m["x"] == pytest.approx(0.5) and m["y"] == 0 and m["z"] == 0 for _, m in moves)
    motion_rig.wait_still()
    x1, y1 = motion_rig.state.position()
    # Moves per second of the command's duration. This caught rclpy's MultiThreadedExecutor
    # starving the Move thread (10-16 Moves in 1 s; see speculative_vlm.nodes.spin).
    assert len(moves) / 2.0 == pytest.approx(RATE, rel=0.1)
    assert 1.9 <= t_stop - moves[0][0] <= 2.1, "StopMove not at the end of the 2 s duration"
    assert math.hypot(x1 - x0, y1 - y0) == pytest.approx(1.0, rel=0.15)


def test_velocity_above_the_limit_is_clamped_before_it_reaches_the_robot(motion_rig):
    t0 = motion_rig.move(5.0, 1.0, vy=-3.0, vyaw=9.0)
    assert wait_for(lambda: motion_rig.sport.since(t0, STOP_MOVE), 3.0)
    moves = motion_rig.sport.moves_since(t0)
    assert moves
    assert {(m["x"], m["y"], m["z"]) for _, m in moves} == {(0.6, -0.5, 1.5)}
    assert motion_rig.state.speed() <= 0.6 * math.sqrt(2) + 1e-3


def test_cmd_vel_above_the_limit_is_clamped(motion_rig):
    t0 = time.monotonic()
    motion_rig.cmd_vel.publish(Twist(linear=vec(-4.0), angular=vec(0.0, 0.0, -7.0)))
    assert wait_for(lambda: motion_rig.sport.moves_since(t0), 5.0)
    _, m = motion_rig.sport.moves_since(t0)[0]
    assert (m["x"], m["y"], m["z"]) == (-0.5, 0.0, -1.5)


def test_stale_cmd_vel_stops_the_robot_within_the_timeout_plus_one_period(motion_rig):
    t0 = time.monotonic()
    for _ in range(8):
        last = time.monotonic()
        motion_rig.cmd_vel.publish(Twist(linear=vec(0.3)))
        time.sleep(0.1)
    assert wait_for(lambda: motion_rig.sport.since(t0, STOP_MOVE), 4.0), "no StopMove after cmd_vel stopped"
    t_stop = motion_rig.sport.since(t0, STOP_MOVE)[0][0]
    assert t_stop > last, "stopped while cmd_vel was still fresh"
    print(f"\nlast cmd_vel -> StopMove on the wire: {1000 * (t_stop - last):.1f} ms (stale_timeout_s {STALE})")
    # 50 ms on top for delivery and scheduling on a busy 2-core machine (measured idle: 20-27 ms).
    assert t_stop - last <= STALE + 1.0 / RATE + 0.05, f"StopMove {t_stop - last:.3f} s after the last cmd_vel"
    motion_rig.wait_still()


def test_estop_stops_the_robot_at_once(motion_rig):
    t0 = motion_rig.move(0.5, 3.0)
    assert wait_for(lambda: motion_rig.state.speed() > 0.3, 5.0)
    t_estop = time.monotonic()
    motion_rig.estop.publish(Bool(data=True))
    assert wait_for(lambda: motion_rig.sport.since(t_estop, STOP_MOVE), 0.5)
    t_stop = motion_rig.sport.since(t_estop, STOP_MOVE)[0][0]
    assert t_stop - t_estop < 0.1, f"StopMove {t_stop - t_estop:.3f} s after the e-stop"
    time.sleep(0.2)
    assert not motion_rig.sport.moves_since(t_stop + 0.02), "Move sent while the e-stop was engaged"
    motion_rig.wait_still(2.0)
    assert motion_rig.sport.moves_since(t0)


def test_estop_blocks_new_commands_until_released(motion_rig):
    assert motion_rig.call(motion_rig.engage).success
    time.sleep(0.1)
    t0 = motion_rig.move(0.4, 1.0)
    motion_rig.cmd_vel.publish(Twist(linear=vec(0.4)))
    motion_rig.estop.publish(Bool(data=False))  # not a release: release is explicit
    time.sleep(0.5)
    assert not motion_rig.sport.moves_since(t0), "a command moved the robot through the e-stop"
    assert motion_rig.call(motion_rig.release).success
    t1 = motion_rig.move(0.4, 0.5)
    assert wait_for(lambda: motion_rig.sport.moves_since(t1), 5.0), "commands still blocked after release"
    assert wait_for(lambda: motion_rig.sport.since(t1, STOP_MOVE), 5.0)


def test_an_unverified_command_is_refused(motion_rig):
    t0 = motion_rig.move(0.4, 1.0, verified=False)
    time.sleep(0.3)
    assert not motion_rig.sport.moves_since(t0)
    assert motion_rig.node.stream.unverified_refused == 1


def test_an_unverified_stop_is_still_obeyed(motion_rig):
    motion_rig.move(0.4, 3.0)
    assert wait_for(lambda: motion_rig.state.speed() > 0.2, 5.0)
    t0 = time.monotonic()
    motion_rig.command.publish(LocomotionCommand(action=LocomotionCommand.STOP, verified=False))
    assert wait_for(lambda: motion_rig.sport.since(t0, STOP_MOVE), 2.0)
    motion_rig.wait_still()


def test_shutting_the_node_down_sends_stop_move(motion_rig):
    motion_rig.move(0.4, 4.0)
    assert wait_for(lambda: motion_rig.state.speed() > 0.2, 5.0)
    t_shutdown = time.monotonic()
    motion_rig.node.trigger_shutdown()
    assert motion_rig.sport.since(t_shutdown, STOP_MOVE), "no StopMove on shutdown"
    time.sleep(0.2)
    assert not motion_rig.sport.moves_since(t_shutdown + 0.05)
    motion_rig.wait_still(2.0)


def test_deactivating_the_node_sends_stop_move_and_ignores_commands(motion_rig):
    motion_rig.move(0.4, 4.0)
    assert wait_for(lambda: motion_rig.state.speed() > 0.2, 5.0)
    t0 = time.monotonic()
    assert motion_rig.node.trigger_deactivate().name == "SUCCESS"
    assert motion_rig.sport.since(t0, STOP_MOVE)
    t1 = motion_rig.move(0.4, 1.0)
    time.sleep(0.4)
    assert not motion_rig.sport.moves_since(t1)


def test_status_tells_when_a_command_has_finished(motion_rig):
    stamp_before = len(motion_rig.active)
    t0 = motion_rig.move(0.3, 0.6)
    assert wait_for(lambda: len(motion_rig.active) > stamp_before, 5.0)
    assert motion_rig.active[-1].vx == pytest.approx(0.3) and motion_rig.active[-1].duration == pytest.approx(0.6)
    assert wait_for(lambda: motion_rig.idle and motion_rig.idle[-1] is False, 3.0)
    assert wait_for(lambda: motion_rig.idle[-1] is True, 5.0)
    finished = time.monotonic() - t0
    assert 0.55 <= finished <= 1.0


def test_odometry_reports_the_robot_pose_from_sportmodestate(motion_rig):
    assert wait_for(lambda: len(motion_rig.odom) > 5, 10.0), "no odometry"
    t0 = motion_rig.move(0.5, 1.0, vyaw=0.5)
    assert wait_for(lambda: motion_rig.sport.since(t0, STOP_MOVE), 5.0)
    motion_rig.wait_still()
    time.sleep(0.2)
    odom = motion_rig.odom[-1]
    x, y = motion_rig.state.position()
    assert odom.header.frame_id == "odom" and odom.child_frame_id == "base_link"
    assert odom.pose.pose.position.x == pytest.approx(x, abs=0.01) and x > 0.3
    assert odom.pose.pose.position.y == pytest.approx(y, abs=0.01)
    yaw = 2 * math.atan2(odom.pose.pose.orientation.z, odom.pose.pose.orientation.w)
    assert yaw == pytest.approx(float(motion_rig.state.latest.imu_state.rpy[2]), abs=0.01)


def test_limits_and_rate_changed_at_runtime_apply_to_the_next_command(motion_rig):
    assert motion_rig.node.set_parameters([Parameter("max_vx", value=0.2), Parameter("move_rate_hz", value=20.0)])[0].successful
    t0 = motion_rig.move(0.5, 1.0)
    assert wait_for(lambda: motion_rig.sport.since(t0, STOP_MOVE), 5.0)
    moves = motion_rig.sport.moves_since(t0)
    assert {m["x"] for _, m in moves} == {0.2}
    assert abs(len(moves) - 20) <= 2, f"{len(moves)} Moves in 1 s at 20 Hz"


def test_the_robot_connection_cannot_be_changed_after_start(motion_rig):
    result = motion_rig.node.set_parameters([Parameter("network_interface", value="eth0")])[0]
    assert not result.successful and "read-only" in result.reason
    assert motion_rig.node.get_parameter("network_interface").value == "lo"


def test_autostart_configures_and_activates_the_node_by_itself(go2_world):
    ns = "/t" + uuid.uuid4().hex[:8]
    node = MotionNode(
        namespace=ns,
        parameter_overrides=[
            Parameter("autostart", value=True),
            Parameter("dds_domain_id", value=go2_world["domain"]),
            Parameter("network_interface", value="lo"),
        ],
    )
    go2_world["spinner"].add(node)
    try:
        assert wait_for(lambda: node.lifecycle_state == "active", 20.0), "autostart did not activate the node"
    finally:
        go2_world["spinner"].remove(node)
        if node.lifecycle_state in ("unconfigured", "inactive", "active"):
            node.trigger_shutdown()
        node.destroy_node()


def test_the_motion_executable_sends_stop_move_when_interrupted(go2_world):
    ns = "/t" + uuid.uuid4().hex[:8]
    proc = subprocess.Popen(
        [
            shutil.which("speculative-vlm-motion") or "speculative-vlm-motion",
            "--ros-args", "-r", f"__ns:={ns}",
            "-p", "network_interface:=lo", "-p", f"dds_domain_id:={go2_world['domain']}", "-p", "autostart:=true",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    probe = Node("probe", namespace=ns)
    pub = probe.create_publisher(LocomotionCommand, "motion/command", 10)
    sport: SportTap = go2_world["sport"]
    try:
        assert wait_for(lambda: pub.get_subscription_count() > 0, 15.0)
        t0 = time.monotonic()

        def moving() -> bool:
            pub.publish(LocomotionCommand(action=LocomotionCommand.MOVE, vx=0.3, duration=5.0, verified=True))
            return bool(sport.moves_since(t0))

        assert wait_for(moving, 10.0, step=0.2), "the motion executable never moved the robot"
        t_int = time.monotonic()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, output
        assert sport.since(t_int, STOP_MOVE), "no StopMove when the executable was interrupted"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        probe.destroy_node()
        go2_world["state"].latest = None
        assert wait_for(lambda: go2_world["state"].latest is not None and go2_world["state"].speed() < 1e-3, 5.0)


def test_the_shipped_parameter_file_sets_exactly_the_declared_parameters(ros):
    assert_parameter_file_matches(MotionNode, Path(__file__).parents[1] / "config" / "motion.yaml", "motion")


def test_the_limit_parameters_default_to_the_command_schemas_bounds_and_refuse_values_past_them(ros):
    from speculative_vlm.commands.schema import DEFAULT_LIMITS
    from speculative_vlm.go2.motion_rules import LIMIT_RANGES

    node = MotionNode(namespace="/t" + uuid.uuid4().hex[:8])
    try:
        assert node.get_parameter("max_vx").value == DEFAULT_LIMITS.max_vx
        assert node.get_parameter("max_duration_s").value == DEFAULT_LIMITS.max_duration
        for name, (lo, hi) in LIMIT_RANGES.items():
            [span] = node.describe_parameter(name).floating_point_range
            assert (span.from_value, span.to_value) == (lo, hi), name
        assert node.set_parameters([Parameter("max_vx", value=DEFAULT_LIMITS.max_vx / 2)])[0].successful
        past = node.set_parameters([Parameter("max_vx", value=DEFAULT_LIMITS.max_vx + 0.5)])[0]
        assert not past.successful and node.get_parameter("max_vx").value == DEFAULT_LIMITS.max_vx / 2
    finally:
        node.destroy_node()
