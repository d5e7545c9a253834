"""Everything on one machine: the simulated Go2, a local cloud verifier and the node graph.

    ros2 launch speculative_vlm sim.launch.py

Reads config/sim.yaml (or params_file): its `bringup` section says whether to start the
simulated Go2 (`sim_go2`, scene `sim_scene`) and a local verifier (`local_cloud`, settings
from the `cloud_server` section); the nodes come from robot.launch.py with the same file.
These are the peers `speculative-vlm up` starts, run here as processes of their own.
"""

import os
import tempfile

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution, ThisLaunchFileDir

DEFAULT_PARAMS = os.path.join(get_package_share_directory("speculative_vlm"), "config", "sim.yaml")
PEER_EXECUTABLES = ("speculative-vlm-sim-go2", "speculative-vlm-cloud")


def _peers(context):
    params_file = LaunchConfiguration("params_file").perform(context)
    with open(params_file, encoding="utf-8") as f:
        sections = yaml.safe_load(f) or {}
    bringup = (sections.get("bringup") or {}).get("ros__parameters") or {}
    actions = []
    if bringup.get("sim_go2", False):
        motion = (sections.get("motion") or {}).get("ros__parameters") or {}
        cmd = ["speculative-vlm-sim-go2", "--interface", str(motion.get("network_interface", "lo")),
               "--domain-id", str(motion.get("dds_domain_id", 0))]
        scene = str(bringup.get("sim_scene", "default"))
        if scene != "default":
            cmd += ["--scene", scene]
        actions.append(ExecuteProcess(cmd=cmd, name="sim_go2", output="screen"))
    if bringup.get("local_cloud", False):
        # The verifier reads a file holding only its own section.
        server = {"ros__parameters": (sections.get("cloud_server") or {}).get("ros__parameters") or {}}
        with tempfile.NamedTemporaryFile("w", prefix="speculative_vlm_cloud_", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(server, f)
        actions.append(ExecuteProcess(cmd=["speculative-vlm-cloud", "--config", f.name], name="cloud", output="screen"))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of every node"),
        DeclareLaunchArgument("params_file", default_value=DEFAULT_PARAMS,
                              description="YAML in ros__parameters form with a section per node name"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Follow /clock"),
        DeclareLaunchArgument("cloud_address", default_value="",
                              description="host:port of the verifier; empty keeps the params file's"),
        DeclareLaunchArgument("nodes", default_value="",
                              description="Comma-separated nodes to start; empty starts the params file's bringup list"),
        OpaqueFunction(function=_peers),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(PathJoinSubstitution([ThisLaunchFileDir(), "robot.launch.py"])),
            launch_arguments={
                "namespace": LaunchConfiguration("namespace"),
                "params_file": LaunchConfiguration("params_file"),
                "use_sim_time": LaunchConfiguration("use_sim_time"),
                "cloud_address": LaunchConfiguration("cloud_address"),
                "nodes": LaunchConfiguration("nodes"),
            }.items(),
        ),
    ])
