"""Package checks users expect before `colcon build`: valid package.xml (format 3) naming
every ROS dependency the code imports, interfaces all listed for rosidl, console scripts
that import, and every launch and config file that setup.py installs present."""

from __future__ import annotations

import ast
import importlib
import os
import re
from pathlib import Path

import pytest
from ament_index_python import get_resources
from catkin_pkg.package import parse_package

REPO = Path(__file__).resolve().parents[2]
PY_PACKAGE = REPO / "speculative_vlm"
MSGS_PACKAGE = REPO / "speculative_vlm_msgs"


@pytest.fixture(scope="module")
def distribution():
    """setup.py evaluated by setuptools itself, from its own folder as colcon runs it."""
    from distutils.core import run_setup

    import setuptools  # noqa: F401  (first, so `distutils` is setuptools' own)

    cwd = os.getcwd()
    os.chdir(PY_PACKAGE)
    try:
        return run_setup("setup.py", stop_after="init")
    finally:
        os.chdir(cwd)


def declared_dependencies(package) -> set[str]:
    return {d.name for d in package.build_depends + package.exec_depends + package.buildtool_depends
            + package.build_export_depends + package.test_depends}


def imported_top_level_modules(root: Path, pattern: str) -> dict[str, str]:
    """Top-level module -> one file importing it, for every absolute import under root."""
    found: dict[str, str] = {}
    for path in root.glob(pattern):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("folder", [PY_PACKAGE, MSGS_PACKAGE], ids=["speculative_vlm", "speculative_vlm_msgs"])
def test_package_xml_is_valid_format_3(folder):
    package = parse_package(str(folder))
    package.validate()  # raises InvalidPackage naming what is wrong
    assert package.package_format == 3
    assert package.name == folder.name
    assert package.licenses and package.maintainers and package.description.strip()
    assert declared_dependencies(package), "dependencies must be named"


def test_python_package_declares_its_build_type_and_version_like_setup_py(distribution):
    package = parse_package(str(PY_PACKAGE))
    assert package.get_build_type() == "ament_python"
    assert (distribution.get_name(), distribution.get_version()) == (package.name, package.version)
    assert (PY_PACKAGE / "resource" / package.name).is_file(), "ament index marker resource/<name> is missing"


def test_setup_cfg_installs_scripts_where_ros2_run_looks():
    cfg = (PY_PACKAGE / "setup.cfg").read_text()
    assert re.search(r"script_dir\s*=\s*\$base/lib/speculative_vlm", cfg)
    assert re.search(r"install_scripts\s*=\s*\$base/lib/speculative_vlm", cfg)


def test_every_ros_package_the_code_imports_is_a_declared_dependency():
    # A module is a ROS package when the ament index knows it (message packages, rclpy...).
    ros_packages = set(get_resources("packages"))
    imports = imported_top_level_modules(PY_PACKAGE, "speculative_vlm/**/*.py")
    imports.update(imported_top_level_modules(PY_PACKAGE, "launch/*.launch.py"))
    declared = declared_dependencies(parse_package(str(PY_PACKAGE)))
    undeclared = {m: f for m, f in imports.items() if m in ros_packages | {"launch", "launch_ros"}
                  and m not in declared and m != "speculative_vlm"}
    assert not undeclared, f"add to speculative_vlm/package.xml: {undeclared}"


def test_interface_package_is_a_rosidl_package_with_its_cmake_dependencies_declared():
    package = parse_package(str(MSGS_PACKAGE))
    assert package.get_build_type() == "ament_cmake"
    assert "rosidl_interface_packages" in {g.name for g in package.member_of_groups}
    assert {"ament_cmake", "rosidl_default_generators"} <= {d.name for d in package.buildtool_depends}
    assert "rosidl_default_runtime" in {d.name for d in package.exec_depends}
    cmake = (MSGS_PACKAGE / "CMakeLists.txt").read_text()
    cmake_deps = re.search(r"DEPENDENCIES([^)]*)\)", cmake).group(1).split()
    assert set(cmake_deps) <= declared_dependencies(package)


def test_every_interface_file_is_generated_and_every_generated_file_exists():
    cmake = (MSGS_PACKAGE / "CMakeLists.txt").read_text()
    listed = set(re.findall(r'"((?:msg|srv|action)/\w+\.(?:msg|srv|action))"', cmake))
    on_disk = {str(p.relative_to(MSGS_PACKAGE)) for kind in ("msg", "srv", "action")
               for p in (MSGS_PACKAGE / kind).glob(f"*.{kind}")}
    assert listed == on_disk


def test_every_console_script_carries_the_package_prefix(distribution):
    # Installed on PATH by pip (and into lib/speculative_vlm by colcon), a bare `bridge`, `motion`
    # or `monitor` would shadow, or be shadowed by, a system command (`bridge` is iproute2's).
    names = [line.partition("=")[0].strip() for line in distribution.entry_points["console_scripts"]]
    unprefixed = [n for n in names if n != "speculative-vlm" and not n.startswith("speculative-vlm-")]
    assert not unprefixed, f"console scripts without the speculative-vlm- prefix: {unprefixed}"
    assert len(names) == len(set(names))


def test_every_console_script_imports_and_its_function_exists(distribution):
    scripts = distribution.entry_points["console_scripts"]
    assert scripts
    problems = []
    for line in scripts:
        name, _, target = (part.strip() for part in line.partition("="))
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import failure is what this test reports
            problems.append(f"{name}: import {module_name} failed: {exc!r}")
            continue
        if not callable(getattr(module, attr, None)):
            problems.append(f"{name}: {module_name} has no function {attr}")
    assert not problems, "\n".join(problems)


def test_every_file_setup_py_installs_exists(distribution):
    installed = [(dest, src) for dest, files in distribution.data_files for src in files]
    missing = [src for _, src in installed if not (PY_PACKAGE / src).is_file()]
    assert not missing, f"setup.py data_files name missing files {missing}"
    destinations = {(dest, Path(src).name) for dest, src in installed}
    for launch_file in ("robot.launch.py", "sim.launch.py", "replay.launch.py"):
        assert ("share/speculative_vlm/launch", launch_file) in destinations
    for config in ("sim.yaml", "robot.yaml"):
        assert ("share/speculative_vlm/config", config) in destinations
    assert ("share/speculative_vlm", "package.xml") in destinations
    assert ("share/ament_index/resource_index/packages", "speculative_vlm") in destinations
