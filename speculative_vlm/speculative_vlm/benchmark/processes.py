"""Process plumbing for the benchmark: pinned worker processes with JSON jobs, and verifier servers.

Every side of the benchmark runs in its own OS process pinned to its own cores with one torch
thread, as the robot's CPU and the cloud's accelerator are separate machines in the real
system: a shared core would let the robot's drafting steal the cloud's verification time.
Workers are Python modules run as ``python -m MODULE JOB.json``; they read the job, write their
result JSON to ``job["out"]`` and report progress on stderr.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class BenchProcessError(RuntimeError):
    """A benchmark process failed; the message names it and quotes the end of its log."""


def pin(cores: Iterable[int], torch_threads: int | None = None) -> None:
    """Pin the calling process to ``cores`` (and its torch to ``torch_threads``), before any work."""
    available = os.sched_getaffinity(0)
    wanted = {c for c in cores if c in available} or available
    os.sched_setaffinity(0, wanted)
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # OpenMP/MKL pools sized to the process's share of cores, before torch starts them.
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def _affinity(cores: Sequence[int]):
    def apply() -> None:
        available = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {c for c in cores if c in available} or available)

    return apply


@dataclass
class Worker:
    """A worker process running ``python -m module job.json``; ``result()`` waits for its JSON."""

    name: str
    process: subprocess.Popen
    out: Path
    log: Path

    def result(self, timeout: float | None = None) -> dict:
        try:
            rc = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise BenchProcessError(f"{self.name} did not finish within {timeout:g} s; see {self.log}") from None
        if rc != 0 or not self.out.exists():
            raise BenchProcessError(f"{self.name} exited with code {rc}; last log lines:\n{tail(self.log)}")
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _copy_lines(stream, log: Path, echo: bool) -> None:
    with open(log, "wb") as f:
        for line in stream:
            f.write(line)
            f.flush()
            if echo:
                sys.stderr.buffer.write(line)
                sys.stderr.flush()


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_worker(name: str, module: str, job: dict, workdir: Path, cores: Sequence[int], threads: int,
                 env: dict[str, str] | None = None, echo: bool = True) -> Worker:
    """Start ``python -m module`` on ``job`` pinned to ``cores``; its stderr is echoed (progress) and logged."""
    out = workdir / f"{name}.result.json"
    log = workdir / f"{name}.log"
    job_path = workdir / f"{name}.job.json"
    job_path.write_text(json.dumps(dict(job, out=str(out), cores=list(cores), threads=threads)))
    process = subprocess.Popen([sys.executable, "-m", module, str(job_path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=child_env(threads, env), preexec_fn=_affinity(cores))
    # Progress lines reach the user at once; the log keeps them for a failure message.
    threading.Thread(target=_copy_lines, args=(process.stderr, log, echo), daemon=True).start()
    return Worker(name, process, out, log)


@dataclass
class ServerSpec:
    name: str
    model: str
    exit_layers: tuple[int, ...] = ()
    exit_heads: str | None = None
    max_batch: int = 1
    max_wait_ms: float = 0.0
    metrics: bool = False  # serve Prometheus metrics (the fleet reads batch sizes and pass times)
    replicas: int = 0  # N: N verifier replicas on Ray Serve behind the one address (--ray); 0: one process


@dataclass
class CloudServer:
    """A ``speculative-vlm-cloud`` process pinned to the cloud's cores, with a private tokens file."""

    spec: ServerSpec
    cores: Sequence[int]
    workdir: Path
    clients: int = 8
    port: int = 0
    tokens: list[str] = field(default_factory=list)
    metrics_port: int | None = None
    process: subprocess.Popen | None = None
    log: Path | None = None

    def start(self) -> CloudServer:
        import secrets

        self.port = free_port()
        self.tokens = self.tokens or [secrets.token_hex(16) for _ in range(self.clients)]
        fd, tokens_file = tempfile.mkstemp(prefix=f"{self.spec.name}-tokens-", dir=self.workdir)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"robot{i} {t}\n" for i, t in enumerate(self.tokens))
        args = [sys.executable, "-m", "speculative_vlm.cloud.server", "--model", self.spec.model,
                "--bind", f"127.0.0.1:{self.port}", "--tokens-file", tokens_file,
                "--max-batch", str(self.spec.max_batch), "--max-wait-ms", str(self.spec.max_wait_ms),
                "--torch-threads", "1", "--log-level", "WARNING", "--session-idle-s", "600",
                "--max-sessions-per-client", "16", "--requests-per-second", "10000"]
        if self.spec.exit_layers:
            args += ["--exit-layers", ",".join(str(x) for x in self.spec.exit_layers)]
        if self.spec.exit_heads:
            args += ["--exit-heads", self.spec.exit_heads]
        if self.spec.replicas:
            args += ["--ray", "--replicas", str(self.spec.replicas)]
        if self.spec.metrics:
            self.metrics_port = free_port()
            args += ["--metrics-port", str(self.metrics_port)]
        self.log = self.workdir / f"server-{self.spec.name}.log"
        self.process = subprocess.Popen(args, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                        env=child_env(1), preexec_fn=_affinity(self.cores))
        return self

    def wait_ready(self, timeout: float = 300.0) -> CloudServer:
        """Block until the port accepts connections (the model is loaded before the port opens)."""
        assert self.process is not None and self.log is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchProcessError(f"verifier server {self.spec.name} exited with code "
                                        f"{self.process.returncode}:\n{tail(self.log)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise BenchProcessError(f"verifier server {self.spec.name} not listening after {timeout:g} s:\n{tail(self.log)}")

    def scrape(self) -> dict[str, float]:
        """The server's Prometheus samples (histogram sums and counts), summed over labels."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        if self.metrics_port is None:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
        return samples

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def read_job(argv: Sequence[str] | None = None) -> dict:
    """The job of a worker process (``python -m module JOB.json``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m <worker module> JOB.json (started by `speculative-vlm bench`)")
    return json.loads(Path(args[0]).read_text())


def write_result(job: dict, result: dict) -> None:
    tmp = Path(job["out"] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(job["out"])


def progress(who: str, message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {who}: {message}", file=sys.stderr, flush=True)
