"""A recorded bag as the camera: the graph of sim.launch.py on sim time, fed by `speculative-vlm replay`.

    ros2 launch speculative_vlm replay.launch.py bag:=/path/to/rosbag2_folder

The bag's camera topic stands in for the camera node (not started), /clock comes from the
bag, and every node runs with use_sim_time, so timestamps, timeouts and the monitor follow
the recording. The player is this package's `speculative-vlm` executable (lib/speculative_vlm);
the simulated Go2 and local verifier start as the params file says.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, ThisLaunchFileDir
from launch_ros.substitutions import ExecutableInPackage
from speculative_vlm.launch_graph import PACKAGE, flag, replay_launch

DEFAULT_PARAMS = os.path.join(get_package_share_directory(PACKAGE), "config", "sim.yaml")
FORWARDED = ("namespace", "use_sim_time", "params_file", "log_level", "autostart", "use_respawn",
             "cloud_address", "nodes", "foxglove")


def _player(context):
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    player = replay_launch(arg("bag"), rate=arg("rate"), start_offset=arg("start_offset"), namespace=arg("namespace"),
                           camera_topic=arg("camera_topic"), loop=flag(arg("loop")), log_level=arg("log_level"))
    return [ExecuteProcess(cmd=[ExecutableInPackage(package=PACKAGE, executable=player.executable), *player.arguments],
                           name=player.name, output="screen")]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="rosbag2 folder to play (MCAP or SQLite)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="Playback speed factor"),
        DeclareLaunchArgument("loop", default_value="false", description="Play the bag over and over"),
        DeclareLaunchArgument("start_offset", default_value="0.0", description="Seconds of the bag to skip"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/image_raw",
                              description="The bag's camera topic (played under namespace)"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of every node and played topic"),
        DeclareLaunchArgument("use_sim_time", default_value="true", description="Follow the bag's /clock"),
        DeclareLaunchArgument("params_file", default_value=DEFAULT_PARAMS,
                              description="YAML in ros__parameters form with a section per node name"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error or fatal"),
        DeclareLaunchArgument("autostart", default_value="",
                              description="Configure and activate the motion node at start; empty keeps the file's"),
        DeclareLaunchArgument("use_respawn", default_value="false", description="Restart a node that exits, after 2 s"),
        DeclareLaunchArgument("cloud_address", default_value="",
                              description="host:port of the verifier; empty keeps the params file's"),
        DeclareLaunchArgument("nodes", default_value="drafter,bridge,motion,monitor",
                              description="Nodes to start: the bag stands in for the camera"),
        DeclareLaunchArgument("foxglove", default_value="",
                              description="Start the Foxglove WebSocket view (true/false); empty keeps the params file's"),
        OpaqueFunction(function=_player),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution([ThisLaunchFileDir(), "sim.launch.py"])),
            launch_arguments={name: LaunchConfiguration(name) for name in FORWARDED}.items(),
        ),
    ])
