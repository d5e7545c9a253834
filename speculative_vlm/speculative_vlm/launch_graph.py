"""What the launch files start, decided without ROS 2 `launch`, so it can be tested here.

robot.launch.py, sim.launch.py and replay.launch.py read one YAML (the same file
`speculative-vlm up` reads) and turn the plans below into launch_ros actions: a
:class:`NodeLaunch` becomes ``Node``/``LifecycleNode(package="speculative_vlm", executable=...)``,
a :class:`ProcessLaunch` an ``ExecuteProcess`` whose command starts with
``ExecutableInPackage(package="speculative_vlm", executable=...)``. Every executable is a
console script that setup.py installs into ``lib/speculative_vlm`` (``ros2 run`` finds it there),
never a command looked up on PATH. Node parameters come from the file rewritten for the
namespace (:mod:`speculative_vlm.launch_params`) and reach the node as ``-p`` rules: nothing
is written to disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from speculative_vlm.launch_params import (
    normalize_namespace,
    parameter_arguments,
    parameters_for,
    rewrite_for_namespace,
)

PACKAGE = "speculative_vlm"
# Node name (and section name in the YAML) -> console script (setup.py). The executables carry
# the package prefix: `bridge`, `monitor` or `motion` on PATH would shadow common commands.
NODE_EXECUTABLES = {
    "camera": "speculative-vlm-camera",
    "drafter": "speculative-vlm-drafter",
    "bridge": "speculative-vlm-bridge",
    "motion": "speculative-vlm-motion",
    "monitor": "speculative-vlm-monitor",
    "foxglove": "speculative-vlm-foxglove",
}
LIFECYCLE_NODES = ("motion",)
# The nodes a bringup list may name; the Foxglove view is started by its own `enabled` switch.
GRAPH_NODES = ("camera", "drafter", "bridge", "motion", "monitor")
SIM_GO2_EXECUTABLE = "speculative-vlm-sim-go2"
CLOUD_EXECUTABLE = "speculative-vlm-cloud"
CLI_EXECUTABLE = "speculative-vlm"  # `speculative-vlm replay` plays a bag
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")


class LaunchConfigError(ValueError):
    """Launch arguments or a parameter file that cannot be launched; the message says what to fix."""


@dataclass(frozen=True)
class NodeLaunch:
    """One node: ``ros_arguments`` follow ``--ros-args`` (log level, then ``-p`` parameter rules)."""

    name: str
    executable: str
    namespace: str
    lifecycle: bool
    parameters: dict[str, Any]
    ros_arguments: list[str]


@dataclass(frozen=True)
class ProcessLaunch:
    """A process that is not a ROS node of the graph (the simulated Go2, the verifier, the player)."""

    name: str
    executable: str
    arguments: list[str] = field(default_factory=list)


def flag(text: str | bool) -> bool:
    """A launch argument as a boolean: true/1/yes/on, case-insensitive."""
    return text if isinstance(text, bool) else text.strip().lower() in ("true", "1", "yes", "on")


def optional_flag(text: str) -> bool | None:
    """An empty launch argument keeps the parameter file's value."""
    return None if not text.strip() else flag(text)


def load_parameter_file(path: str | Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise LaunchConfigError(f"cannot read params_file {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise LaunchConfigError(f"params_file {path} is not a mapping of sections")
    return document


def _section(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict((document.get(name) or {}).get("ros__parameters") or {})


def bringup_section(document: Mapping[str, Any]) -> dict[str, Any]:
    return _section(document, "bringup")


def scene_of(document: Mapping[str, Any]) -> str:
    """The sim scene the file names (name or YAML path), or "" when it runs no simulated Go2."""
    bringup = bringup_section(document)
    return str(bringup.get("sim_scene", "default") or "default") if bringup.get("sim_go2", False) else ""


def node_launches(params_file: str | Path, *, namespace: str = "", use_sim_time: bool = False,
                  log_level: str = "info", autostart: bool | None = None, cloud_address: str = "",
                  nodes: list[str] | None = None, foxglove: bool | None = None) -> list[NodeLaunch]:
    """The nodes to start and the arguments of each.

    ``nodes`` empty or None starts the file's ``bringup.nodes`` list; ``autostart``,
    ``foxglove`` and an empty ``cloud_address`` keep the file's values.
    """
    if log_level.lower() not in LOG_LEVELS:
        raise LaunchConfigError(f"log_level {log_level!r} is not one of {list(LOG_LEVELS)}")
    document = load_parameter_file(params_file)
    names = list(nodes or bringup_section(document).get("nodes") or GRAPH_NODES)
    unknown = [n for n in names if n not in GRAPH_NODES]
    if unknown:
        raise LaunchConfigError(f"{params_file} or nodes:= names unknown nodes {unknown}; known: {list(GRAPH_NODES)}")
    view = _section(document, "foxglove")
    if (bool(view.get("enabled", False)) if foxglove is None else foxglove) and "foxglove" not in names:
        names.append("foxglove")
    namespace = normalize_namespace(namespace)
    sections = rewrite_for_namespace(document, namespace)
    launches = []
    for name in names:
        params = parameters_for(sections, f"{namespace}/{name}")
        params["use_sim_time"] = use_sim_time
        if name == "bridge" and cloud_address:
            params["cloud_address"] = cloud_address
        if name == "motion" and autostart is not None:
            params["autostart"] = autostart
        if name == "foxglove":
            params.pop("enabled", None)  # the switch is the launch's, not a node parameter
            params.setdefault("scene", scene_of(document))
        launches.append(NodeLaunch(
            name=name, executable=NODE_EXECUTABLES[name], namespace=namespace, lifecycle=name in LIFECYCLE_NODES,
            parameters=params, ros_arguments=["--log-level", log_level.lower(), *parameter_arguments(params)],
        ))
    return launches


def peer_launches(params_file: str | Path) -> list[ProcessLaunch]:
    """The simulated Go2 and the local verifier, when the file's ``bringup`` section asks for them."""
    document = load_parameter_file(params_file)
    bringup = bringup_section(document)
    peers = []
    if bringup.get("sim_go2", False):
        motion = _section(document, "motion")
        arguments = ["--interface", str(motion.get("network_interface", "lo")),
                     "--domain-id", str(motion.get("dds_domain_id", 0))]
        scene = scene_of(document)
        if scene != "default":
            arguments += ["--scene", scene]
        peers.append(ProcessLaunch("sim_go2", SIM_GO2_EXECUTABLE, arguments))
    if bringup.get("local_cloud", False):
        if "cloud_server" not in document:
            raise LaunchConfigError(f"{params_file} asks for local_cloud but has no cloud_server section")
        # The verifier reads its own section of the same file: no copy is written.
        peers.append(ProcessLaunch("cloud", CLOUD_EXECUTABLE,
                                   ["--config", str(params_file), "--config-section", "cloud_server"]))
    return peers


def replay_launch(bag: str, *, rate: str = "1.0", start_offset: str = "0.0", namespace: str = "",
                  camera_topic: str = "/camera/image_raw", loop: bool = False, log_level: str = "info",
                  wait_for_subscribers_s: float = 10.0) -> ProcessLaunch:
    """`speculative-vlm replay` playing the bag's camera topic into the graph, with /clock."""
    arguments = ["replay", bag, f"--rate={rate}", f"--start-offset={start_offset}",
                 f"--namespace={normalize_namespace(namespace)}", f"--topics={camera_topic}",
                 # Nodes start alongside the player: wait for them so the first frames are not lost.
                 f"--wait-for-subscribers={wait_for_subscribers_s:g}"]
    if loop:
        arguments.append("--loop")
    return ProcessLaunch("bag_replay", CLI_EXECUTABLE, arguments + ["--ros-args", "--log-level", log_level.lower()])


def launched_executables() -> set[str]:
    """Every executable a launch file can start (each must be a console script of the package)."""
    return set(NODE_EXECUTABLES.values()) | {SIM_GO2_EXECUTABLE, CLOUD_EXECUTABLE, CLI_EXECUTABLE}
