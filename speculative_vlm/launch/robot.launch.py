"""The speculative_vlm node graph on a robot: camera, drafter, bridge, motion, monitor (and the Foxglove view).

    ros2 launch speculative_vlm robot.launch.py cloud_address:=verifier.example.org:50561
    ros2 launch speculative_vlm robot.launch.py namespace:=go2_a log_level:=debug use_respawn:=true

Reads the same YAML as `speculative-vlm up` (config/robot.yaml by default): the nodes listed
in its `bringup` section are started, each an executable of this package
(`speculative-vlm-<node>` in lib/speculative_vlm), with its own section of the file rewritten
for `namespace` (`/**` sections reach every node) and handed over as `-p` rules, so no
temporary parameter file is written. The Foxglove view starts when the file's `foxglove`
section says `enabled: true` (or `foxglove:=true`). The motion node is a lifecycle node; with
`autostart` false (the robot default) an operator activates it (`ros2 lifecycle set motion
configure`, then `activate`) once the robot is clear. sim.launch.py and replay.launch.py
include this file. The decisions are made in speculative_vlm.launch_graph, tested without ROS 2
`launch`.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from speculative_vlm.launch_graph import PACKAGE, flag, node_launches, optional_flag

DEFAULT_PARAMS = os.path.join(get_package_share_directory(PACKAGE), "config", "robot.yaml")


def _graph(context):
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    only = [n.strip() for n in arg("nodes").split(",") if n.strip()]
    use_respawn = flag(arg("use_respawn"))
    actions = []
    for plan in node_launches(
        arg("params_file"), namespace=arg("namespace"), use_sim_time=flag(arg("use_sim_time")),
        log_level=arg("log_level"), autostart=optional_flag(arg("autostart")), cloud_address=arg("cloud_address"),
        nodes=only, foxglove=optional_flag(arg("foxglove")),
    ):
        node_type = LifecycleNode if plan.lifecycle else Node
        actions.append(node_type(
            package=PACKAGE, executable=plan.executable, name=plan.name, namespace=plan.namespace,
            # As nav2 passes its log level: `arguments` with --ros-args works on every launch_ros.
            arguments=["--ros-args", *plan.ros_arguments], respawn=use_respawn, respawn_delay=2.0,
            output="screen", emulate_tty=True,
        ))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        SetEnvironmentVariable("RCUTILS_LOGGING_BUFFERED_STREAM", "1"),
        DeclareLaunchArgument("namespace", default_value="", description="Top-level namespace of every node"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Follow /clock (bag replay, sim)"),
        DeclareLaunchArgument("params_file", default_value=DEFAULT_PARAMS,
                              description="YAML in ros__parameters form with a section per node name"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error or fatal"),
        DeclareLaunchArgument("autostart", default_value="",
                              description="Configure and activate the motion node at start (true/false); "
                                          "empty keeps the params file's (robot.yaml: false)"),
        DeclareLaunchArgument("use_respawn", default_value="false",
                              description="Restart a node that exits, after 2 s"),
        DeclareLaunchArgument("cloud_address", default_value="",
                              description="host:port of the cloud verifier; empty keeps the params file's"),
        DeclareLaunchArgument("nodes", default_value="",
                              description="Comma-separated nodes to start; empty starts the params file's bringup list"),
        DeclareLaunchArgument("foxglove", default_value="",
                              description="Start the Foxglove WebSocket view (true/false); empty keeps the params file's"),
        OpaqueFunction(function=_graph),
    ])
