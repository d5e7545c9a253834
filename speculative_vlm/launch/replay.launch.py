"""A recorded bag as the camera: the graph of sim.launch.py on sim time, fed by `speculative-vlm replay`.

    ros2 launch speculative_vlm replay.launch.py bag:=/path/to/rosbag2_folder

The bag's camera topic stands in for the camera node (not started), /clock comes from the
bag, and every node runs with use_sim_time, so timestamps, timeouts and the monitor follow
the recording. The simulated Go2 and local verifier start as the params file says.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription
from launch.conditions import IfCondition, UnlessCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, ThisLaunchFileDir

DEFAULT_PARAMS = os.path.join(get_package_share_directory("speculative_vlm"), "config", "sim.yaml")
REPLAY_EXECUTABLES = ("speculative-vlm",)


def _replay(loop: bool) -> ExecuteProcess:
    """The player; launch has no optional command-line flag, so looping is a second, conditional action."""
    # One `--flag=value` token each (a list element is concatenated), so an empty value such as
    # the default namespace stays an argument instead of vanishing.
    cmd = [
        "speculative-vlm", "replay", LaunchConfiguration("bag"),
        ["--rate=", LaunchConfiguration("rate")],
        ["--start-offset=", LaunchConfiguration("start_offset")],
        ["--namespace=", LaunchConfiguration("namespace")],
        ["--topics=", LaunchConfiguration("camera_topic")],
        # Nodes start alongside the player: wait for them so the first frames are not lost.
        "--wait-for-subscribers=10",
    ]
    condition = IfCondition if loop else UnlessCondition
    return ExecuteProcess(cmd=cmd + (["--loop"] if loop else []), name="bag_replay", output="screen",
                          condition=condition(LaunchConfiguration("loop")))


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="rosbag2 folder to play (MCAP or SQLite)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="Playback speed factor"),
        DeclareLaunchArgument("loop", default_value="false", description="Play the bag over and over"),
        DeclareLaunchArgument("start_offset", default_value="0.0", description="Seconds of the bag to skip"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/image_raw",
                              description="The bag's camera topic (played under namespace)"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of every node and played topic"),
        DeclareLaunchArgument("params_file", default_value=DEFAULT_PARAMS,
                              description="YAML in ros__parameters form with a section per node name"),
        DeclareLaunchArgument("use_sim_time", default_value="true", description="Follow the bag's /clock"),
        DeclareLaunchArgument("cloud_address", default_value="",
                              description="host:port of the verifier; empty keeps the params file's"),
        DeclareLaunchArgument("nodes", default_value="drafter,bridge,motion,monitor",
                              description="Nodes to start: the bag stands in for the camera"),
        _replay(loop=False),
        _replay(loop=True),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution([ThisLaunchFileDir(), "sim.launch.py"])),
            launch_arguments={
                "namespace": LaunchConfiguration("namespace"),
                "params_file": LaunchConfiguration("params_file"),
                "use_sim_time": LaunchConfiguration("use_sim_time"),
                "cloud_address": LaunchConfiguration("cloud_address"),
                "nodes": LaunchConfiguration("nodes"),
            }.items(),
        ),
    ])
