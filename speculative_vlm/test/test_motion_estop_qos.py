"""The e-stop hears every publisher: one ``True`` on ``motion/estop`` from another process,
whatever its QoS, stops a moving simulated Go2 and latches.

The publisher runs as a separate process (estop_publisher.py) and publishes exactly once;
the StopMove is watched on the wire (rt/api/sport/request). The e-stop-to-StopMove latency is
printed (``pytest -s``) and recorded as a test property.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from go2_harness import MOVE, STOP_MOVE
from polling import wait_for
from speculative_vlm.nodes.motion import LATCHED
from std_msgs.msg import Bool

pytestmark = pytest.mark.ros

PUBLISHER = Path(__file__).with_name("estop_publisher.py")


class EstopProcess:
    """estop_publisher.py in a child process, publishing on the rig's motion/estop with one QoS."""

    def __init__(self, namespace: str, kind: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PUBLISHER), namespace, kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.output: list[str] = []
        for line in self.proc.stdout:
            self.output.append(line)
            if line.strip() in ("matched", "unmatched"):
                break
        self.matched = bool(self.output) and self.output[-1].strip() == "matched"

    def publish_once(self) -> float:
        """Publish True once; the publisher's time.monotonic() just before the publish."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("published"), f"publisher said {line!r}"
        return float(line.split()[1])

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("kind", ["default", "transient_local", "best_effort"])
def test_one_estop_from_another_process_stops_the_moving_robot_and_latches_whatever_its_qos(
    motion_rig, kind, record_property
):
    engaged: list[bool] = []
    motion_rig.probe.create_subscription(Bool, "motion/estop_engaged", lambda m: engaged.append(m.data), LATCHED)
    publisher = EstopProcess(motion_rig.ns, kind)
    try:
        assert publisher.matched, f"no motion/estop subscription matches a {kind} publisher: {publisher.output}"
        t0 = motion_rig.move(0.5, 4.0)
        assert wait_for(lambda: motion_rig.state.speed() > 0.3, 5.0), "the robot never started moving"
        t_estop = publisher.publish_once()
        assert wait_for(lambda: motion_rig.sport.since(t_estop, STOP_MOVE), 1.0), f"no StopMove after a {kind} e-stop"
        t_stop = motion_rig.sport.since(t_estop, STOP_MOVE)[0][0]
        latency = t_stop - t_estop
        record_property(f"estop_to_stopmove_s_{kind}", round(latency, 4))
        print(f"\ne-stop ({kind} QoS, other process) -> StopMove on the wire: {1000 * latency:.1f} ms")
        assert latency < 0.1, f"StopMove {latency:.3f} s after the e-stop"

        # Latched: nothing moves the robot afterwards, not even a new command.
        assert wait_for(lambda: engaged and engaged[-1] is True, 2.0), "motion/estop_engaged never said True"
        t_new = motion_rig.move(0.4, 1.0)
        time.sleep(0.5)
        requests = [api for _, api, _ in motion_rig.sport.since(t0)]
        first_stop = requests.index(STOP_MOVE)
        assert MOVE not in requests[first_stop:], "Move sent after the e-stop's StopMove"
        assert not motion_rig.sport.moves_since(t_new)
        motion_rig.wait_still(2.0)
        assert motion_rig.node.stream.estop_engaged
    finally:
        publisher.close()
