"""Worker: the robot. Decodes every prompt with every method through the delay proxy, then the ROS hop.

Pinned to the robot's core with one torch thread. For each RTT profile it talks to two
verifier servers through proxies of that profile: one without early exits (cloud
autoregressive and vanilla speculative) and one with them (the preemptive rungs). Methods
are interleaved per prompt (in a rotating order), so load from anything else on the machine hits them alike.
The auto rung keeps one decoder per link (RTT profile): it chooses each session's method from the
sessions before it there, so its first two sessions on each link (the warm-up prompt, not
recorded) give it something to go on, as a robot's earlier commands would.
The ROS line decodes the full method twice per prompt at one RTT: straight over gRPC, and
through ROS 2 (this process's RosVerifier -> spec/draft over DDS -> the bridge node process ->
gRPC -> proxy -> server). Every output is compared with the target's own (the in-process
references); the orchestrator fails the run on any difference.

    python -m speculative_vlm.benchmark.robot_side JOB.json   (started by `speculative-vlm bench`)
"""

from __future__ import annotations

import threading
import time

from speculative_vlm.benchmark import ladder
from speculative_vlm.benchmark.processes import pin, progress, read_job, write_result
from speculative_vlm.benchmark.workload import BenchPrompt


def _wait_connected(verifiers, timeout: float = 60.0) -> None:
    from speculative_vlm.protocol.link import LinkState

    deadline = time.monotonic() + timeout
    for v in verifiers:
        while v.link_state is not LinkState.CONNECTED and time.monotonic() < deadline:
            time.sleep(0.05)


def cloud_autoregressive(verifier, request, reference: list[int], forced: list[bool], decode) -> dict:
    start = time.perf_counter()
    first = []
    tokens = verifier.generate(request, on_token=lambda _t: first or first.append(time.perf_counter() - start))
    wall = time.perf_counter() - start
    diverged = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b),
                    -1 if len(tokens) == len(reference) else min(len(tokens), len(reference)))
    return {"method": ladder.CLOUD_AR.key, "wall_s": wall, "open_s": first[0] if first else wall,
            "tokens": len(tokens), "passes": sum(not f for f in forced) if diverged == -1 else len(tokens),
            "exact": diverged == -1, "first_divergence": diverged, "text": decode(tokens)}


class Robot:
    def __init__(self, job: dict):
        from speculative_vlm.decoding.models import load_model

        self.job = job
        self.draft = load_model(job["draft"], dtype=job.get("draft_dtype"))
        self.settings = ladder.Settings(gamma=job["gamma"], early_threshold=job["early_threshold"])
        self.prompts = [BenchPrompt.from_json(p) for p in job["prompts"]]
        self.refs = job["references"]
        self.max_new = job["max_new_tokens"]
        self.methods = [m for m in ladder.NETWORKED if m.key in job.get("methods", [m.key for m in ladder.NETWORKED])]
        self.auto: dict[int, object] = {}  # id(verifier) -> the auto rung's decoder on that link
        self.rows: list[dict] = []

    def grpc(self, address: str):
        from speculative_vlm.protocol.client import GrpcVerifier

        return GrpcVerifier(address, token=self.job["token"], verdict_timeout_s=120, open_timeout_s=120)

    def decode(self, method: ladder.Method, verifier: ladder.OpenTimer, prompt: BenchPrompt) -> dict:
        key = "command" if method.grammar else "free"
        request = prompt.request(method.grammar, self.max_new)
        reference = self.refs[str(prompt.index)][key]
        if method.kind == "cloud_ar":
            forced = self.refs[str(prompt.index)][key + "_forced"]
            return cloud_autoregressive(verifier.inner, request, reference, forced, self.draft.decode)
        if method.kind == "auto":
            result = self.auto_decoder(verifier).generate(request)
            return ladder.record(method, result, result.open_s, reference)
        decoder = ladder.decoder_for(method, self.draft, verifier, self.settings)
        if method.kind == "edge":
            return ladder.record(method, decoder.generate_unverified(request), 0.0, reference)
        return ladder.record(method, decoder.generate(request), verifier.last_open_s, reference)

    def auto_decoder(self, verifier: ladder.OpenTimer):
        """The auto rung's decoder on this link, made on first use and warmed by two unrecorded sessions."""
        if id(verifier) not in self.auto:
            decoder = ladder.decoder_for(ladder.AUTO, self.draft, verifier, self.settings)
            warm = self.prompts[0].request(True, self.max_new)
            for _ in range(2):
                decoder.generate(warm)
            self.auto[id(verifier)] = decoder
        return self.auto[id(verifier)]

    def add(self, row: dict, prompt: BenchPrompt, rtt_ms: float | None, transport: str) -> dict:
        row.update(prompt=prompt.index, rtt_ms=rtt_ms, transport=transport)
        self.rows.append(row)
        return row

    def run(self) -> None:
        job = self.job
        rtts = [float(r) for r in job["rtts_ms"]]
        verifiers = {(float(rtt), kind): ladder.OpenTimer(self.grpc(address))
                     for rtt, kinds in job["addresses"].items() for kind, address in kinds.items()}
        _wait_connected([v.inner for v in verifiers.values()])
        # Warm-up (not recorded): the first passes on each side allocate and pick kernels.
        warm = self.prompts[0]
        for kind, method in (("plain", ladder.VANILLA), ("exits", ladder.PIPELINE)):
            decoder = ladder.decoder_for(method, self.draft, verifiers[(rtts[0], kind)], self.settings)
            decoder.generate(warm.request(True, 12))
        verifiers[(rtts[0], "plain")].inner.generate(warm.request(True, 4))
        for prompt in self.prompts:  # the draft alone: no network, once
            self.add(self.decode(ladder.EDGE_ONLY, verifiers[(rtts[0], "plain")], prompt), prompt, None, "none")
        progress("robot", f"edge-only done ({len(self.prompts)} prompts)")
        for rtt in rtts:
            if ladder.AUTO in self.methods:
                self.auto_decoder(verifiers[(rtt, "exits")])
            for n, prompt in enumerate(self.prompts):
                # The order rotates per prompt, so no method always runs first (or right after another).
                shift = n % len(self.methods)
                for method in self.methods[shift:] + self.methods[:shift]:
                    v = verifiers[(rtt, "exits" if method.exits else "plain")]
                    self.add(self.decode(method, v, prompt), prompt, rtt, "grpc")
                if rtt == job["free_rtt_ms"] and n < job["free_prompts"]:
                    self.add(self.decode(ladder.FREE, verifiers[(rtt, "exits")], prompt), prompt, rtt, "grpc")
                done = [r for r in self.rows if r["rtt_ms"] == rtt and r["prompt"] == prompt.index]
                progress("robot", f"RTT {rtt:g} ms, prompt {n + 1}/{len(self.prompts)}: " + ", ".join(
                    f"{r['method']} {r['wall_s']:.2f}s" + (f" ({r['chosen']})" if r["method"] == ladder.AUTO.key
                                                           else "") + ("" if r["exact"] else " DIFFERS")
                    for r in done))
        if job.get("ros"):
            self.run_ros(verifiers[(float(job["ros"]["rtt_ms"]), "exits")], float(job["ros"]["rtt_ms"]))
        for v in verifiers.values():
            v.inner.close()

    def run_ros(self, direct: ladder.OpenTimer, rtt: float) -> None:
        import rclpy

        from speculative_vlm.nodes.ros_verifier import RosVerifier
        from speculative_vlm.nodes.spin import PoolExecutor

        rclpy.init()
        node = rclpy.create_node("bench_drafter")
        over_ros = ladder.OpenTimer(RosVerifier(node, service_timeout_s=120))
        executor = PoolExecutor(num_threads=4)  # verdicts arrive while a service call waits
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        try:
            self.decode(ladder.ADAPTIVE, over_ros, self.prompts[0])  # warm-up: discovery, first messages
            for n, prompt in enumerate(self.prompts):
                a = self.add(self.decode(ladder.ADAPTIVE, direct, prompt), prompt, rtt, "grpc-ros-line")
                b = self.add(self.decode(ladder.ADAPTIVE, over_ros, prompt), prompt, rtt, "ros")
                progress("robot", f"ROS hop, prompt {n + 1}/{len(self.prompts)}: direct {a['wall_s']:.2f}s, "
                                  f"via ROS {b['wall_s']:.2f}s" + ("" if b["exact"] else " DIFFERS"))
        finally:
            executor.shutdown()
            node.destroy_node()
            rclpy.try_shutdown()


def main() -> int:
    job = read_job()
    pin(job["cores"], job["threads"])
    robot = Robot(job)
    started = time.perf_counter()
    try:
        robot.run()
    finally:
        write_result(job, {"rows": robot.rows, "draft_load": job["draft"],
                           "seconds": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
