"""The speculative_vlm node graph on a robot: camera, drafter, bridge, motion (and monitor).

    ros2 launch speculative_vlm robot.launch.py cloud_address:=verifier.example.org:50561

Reads the same YAML as `speculative-vlm up` (config/robot.yaml by default): the nodes listed
in its `bringup` section are started, each with the `ros__parameters` of its own section,
so one file configures both ways of starting the graph. Sections are looked up by node
name and handed over as parameters, which keeps them valid under any namespace. The motion
node is a lifecycle node; with `autostart: false` (the robot default) an operator activates
it (`ros2 lifecycle set motion configure`, then `activate`) once the robot is clear.
sim.launch.py and replay.launch.py include this file.
"""

import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

PACKAGE = "speculative_vlm"
# Node name == console script name (setup.py) == section name in the YAML.
NODE_EXECUTABLES = ("camera", "drafter", "bridge", "motion", "monitor")
LIFECYCLE_NODES = ("motion",)
DEFAULT_PARAMS = os.path.join(get_package_share_directory(PACKAGE), "config", "robot.yaml")


def _flag(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


def _graph(context):
    params_file = LaunchConfiguration("params_file").perform(context)
    namespace = LaunchConfiguration("namespace").perform(context)
    use_sim_time = _flag(LaunchConfiguration("use_sim_time").perform(context))
    cloud_address = LaunchConfiguration("cloud_address").perform(context)
    only = [n.strip() for n in LaunchConfiguration("nodes").perform(context).split(",") if n.strip()]
    with open(params_file, encoding="utf-8") as f:
        sections = yaml.safe_load(f) or {}
    bringup = (sections.get("bringup") or {}).get("ros__parameters") or {}
    names = only or list(bringup.get("nodes") or NODE_EXECUTABLES)
    unknown = [n for n in names if n not in NODE_EXECUTABLES]
    if unknown:
        raise RuntimeError(f"{params_file} or nodes:= names unknown nodes {unknown}; known: {list(NODE_EXECUTABLES)}")
    actions = []
    for name in names:
        params = dict((sections.get(name) or {}).get("ros__parameters") or {})
        params["use_sim_time"] = use_sim_time
        if name == "bridge" and cloud_address:
            params["cloud_address"] = cloud_address
        node_type = LifecycleNode if name in LIFECYCLE_NODES else Node
        actions.append(node_type(
            package=PACKAGE, executable=name, name=name, namespace=namespace,
            parameters=[params], output="screen", emulate_tty=True,
        ))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of every node"),
        DeclareLaunchArgument("params_file", default_value=DEFAULT_PARAMS,
                              description="YAML in ros__parameters form with a section per node name"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Follow /clock (bag replay, sim)"),
        DeclareLaunchArgument("cloud_address", default_value="",
                              description="host:port of the cloud verifier; empty keeps the params file's"),
        DeclareLaunchArgument("nodes", default_value="",
                              description="Comma-separated nodes to start; empty starts the params file's bringup list"),
        OpaqueFunction(function=_graph),
    ])
