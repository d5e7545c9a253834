"""The simulated Go2 started in-process (as bringup does) beside an SDK client in the same process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from go2_harness import go2_domain_id

pytestmark = pytest.mark.ros


def test_the_sim_runs_in_process_beside_its_client():
    # A fresh process: the SDK's DDS participant is per process, so this one's domain stays untouched.
    script = textwrap.dedent(
        f"""
        import time
        from speculative_vlm.go2.sim import SimulatedGo2
        from speculative_vlm.go2.sdk_backend import SportBackend
        sim = SimulatedGo2(domain_id={go2_domain_id()}, interface="lo").start()
        backend = SportBackend({go2_domain_id()}, "lo")
        before = sim.distance_to("the red ball")
        for _ in range(40):
            backend.move(0.5, 0.2, 0.0)
            time.sleep(0.04)
        backend.stop_move()
        time.sleep(0.5)
        after = sim.distance_to("the red ball")
        print("distances", before, after, backend.latest_state() is not None)
        sim.close()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("distances"))
    _, before, after, got_state = line.split()
    assert float(after) < float(before) - 0.3 and got_state == "True"
