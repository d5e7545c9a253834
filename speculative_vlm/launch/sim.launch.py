"""Everything on one machine: the simulated Go2, a local cloud verifier and the node graph.

    ros2 launch speculative_vlm sim.launch.py
    ros2 launch speculative_vlm sim.launch.py namespace:=go2_a log_level:=debug

Reads config/sim.yaml (or params_file): its `bringup` section says whether to start the
simulated Go2 (`sim_go2`, scene `sim_scene`) and a local verifier (`local_cloud`, which reads
the file's `cloud_server` section itself: no copy is written); the nodes (and the Foxglove
view, on in sim.yaml) come from robot.launch.py with the same file. These are the peers
`speculative-vlm up` starts, each run here as an executable of this package
(`speculative-vlm-sim-go2`, `speculative-vlm-cloud` in lib/speculative_vlm).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, ThisLaunchFileDir
from launch_ros.substitutions import ExecutableInPackage
from speculative_vlm.launch_graph import PACKAGE, flag, peer_launches

DEFAULT_PARAMS = os.path.join(get_package_share_directory(PACKAGE), "config", "sim.yaml")
FORWARDED = ("namespace", "use_sim_time", "params_file", "log_level", "autostart", "use_respawn",
             "cloud_address", "nodes", "foxglove")


def _peers(context):
    params_file = LaunchConfiguration("params_file").perform(context)
    use_respawn = flag(LaunchConfiguration("use_respawn").perform(context))
    return [
        ExecuteProcess(cmd=[ExecutableInPackage(package=PACKAGE, executable=peer.executable), *peer.arguments],
                       name=peer.name, output="screen", respawn=use_respawn, respawn_delay=2.0)
        for peer in peer_launches(params_file)
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="Top-level namespace of every node"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Follow /clock"),
        DeclareLaunchArgument("params_file", default_value=DEFAULT_PARAMS,
                              description="YAML in ros__parameters form with a section per node name"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error or fatal"),
        DeclareLaunchArgument("autostart", default_value="",
                              description="Configure and activate the motion node at start (true/false); "
                                          "empty keeps the params file's (sim.yaml: true)"),
        DeclareLaunchArgument("use_respawn", default_value="false",
                              description="Restart a node or peer that exits, after 2 s"),
        DeclareLaunchArgument("cloud_address", default_value="",
                              description="host:port of the verifier; empty keeps the params file's"),
        DeclareLaunchArgument("nodes", default_value="",
                              description="Comma-separated nodes to start; empty starts the params file's bringup list"),
        DeclareLaunchArgument("foxglove", default_value="",
                              description="Start the Foxglove WebSocket view (true/false); empty keeps the params file's"),
        OpaqueFunction(function=_peers),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution([ThisLaunchFileDir(), "robot.launch.py"])),
            launch_arguments={name: LaunchConfiguration(name) for name in FORWARDED}.items(),
        ),
    ])
