"""ament_python package speculative_vlm (builds with colcon on ROS 2, or pip in a venv)."""

from glob import glob

from setuptools import find_packages, setup

package_name = "speculative_vlm"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "bench"]),
    package_data={package_name: ["protocol/*.proto", "go2/scenes/*.yaml"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml")),
        ("share/" + package_name + "/config/grafana", glob("config/grafana/*.json")),  # the verifier's dashboard
        # Shipped models: the command draft (train-draft, ~35 MB) and the target's exit heads (train-exits).
        *[("share/" + package_name + "/" + d, glob(d + "/*")) for d in sorted(glob("models/*"))],
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="speculative_vlm developers",
    maintainer_email="dev@speculative-vlm.invalid",
    description="Speculative edge-cloud decoding with early exits driving a Unitree Go2.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            # One scheme: every executable starts with the package prefix, so none shadows a system
            # command on PATH (`bridge` is iproute2's); `ros2 run speculative_vlm <name>` finds them.
            "speculative-vlm = speculative_vlm.cli:main",
            "speculative-vlm-camera = speculative_vlm.nodes.camera:main",
            "speculative-vlm-motion = speculative_vlm.nodes.motion:main",
            "speculative-vlm-bridge = speculative_vlm.nodes.bridge:main",
            "speculative-vlm-drafter = speculative_vlm.nodes.drafter:main",
            "speculative-vlm-monitor = speculative_vlm.nodes.monitor:main",
            "speculative-vlm-foxglove = speculative_vlm.nodes.foxglove_view:main",
            "speculative-vlm-sim-go2 = speculative_vlm.go2.sim:main",
            "speculative-vlm-cloud = speculative_vlm.cloud.server:main",
        ],
    },
)
