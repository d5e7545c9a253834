"""Launch files, checked without ROS 2 `launch` (not installable here): they compile, declare
the arguments robots expect, and every executable, launch file, parameter file and launch
argument they name exists. Read from each file's syntax tree, never by importing `launch`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

PACKAGE_DIR = Path(__file__).resolve().parents[1]
LAUNCH_DIR = PACKAGE_DIR / "launch"
CONFIG_DIR = PACKAGE_DIR / "config"
LAUNCH_FILES = ("robot.launch.py", "sim.launch.py", "replay.launch.py")
REQUIRED_ARGUMENTS = {
    "robot.launch.py": {"namespace", "params_file", "use_sim_time", "cloud_address"},
    "sim.launch.py": {"namespace", "params_file", "use_sim_time", "cloud_address"},
    "replay.launch.py": {"namespace", "params_file", "use_sim_time", "bag"},
}
NODE_SECTIONS = ("camera", "drafter", "bridge", "motion", "monitor")


class LaunchFile:
    """What a launch file names, read from its syntax tree."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = path.read_text(encoding="utf-8")
        self.tree = ast.parse(self.source, filename=str(path))
        self.declared: list[str] = []
        self.used: set[str] = set()
        self.executables: set[str] = set()
        self.dynamic_executable = False
        self.strings: set[str] = set()
        self.includes: list[tuple[str, set[str]]] = []  # (launch file, argument names passed)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                self.strings.add(node.value)
            elif isinstance(node, ast.Call):
                self._call(node)
            elif isinstance(node, ast.Assign):
                self._assign(node)

    @staticmethod
    def _name(call: ast.Call) -> str:
        f = call.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""

    @staticmethod
    def _first_str(node: ast.AST) -> str | None:
        if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant):
            return node.elts[0].value if isinstance(node.elts[0].value, str) else None
        return None

    def _call(self, call: ast.Call) -> None:
        name = self._name(call)
        first = call.args[0] if call.args else None
        literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
        if name == "DeclareLaunchArgument" and literal:
            self.declared.append(literal)
        elif name == "LaunchConfiguration" and literal:
            self.used.add(literal)
        elif name == "IncludeLaunchDescription":
            target = next((s.value for s in ast.walk(call) if isinstance(s, ast.Constant)
                           and isinstance(s.value, str) and s.value.endswith(".launch.py")), None)
            passed = set()
            for kw in call.keywords:
                if kw.arg == "launch_arguments":
                    dicts = [d for d in ast.walk(kw.value) if isinstance(d, ast.Dict)]
                    passed = {k.value for d in dicts for k in d.keys if isinstance(k, ast.Constant)}
            self.includes.append((target, passed))
        for kw in call.keywords:
            if kw.arg == "executable":
                if isinstance(kw.value, ast.Constant):
                    self.executables.add(kw.value.value)
                else:
                    self.dynamic_executable = True
            elif kw.arg == "cmd" and (head := self._first_str(kw.value)):
                self.executables.add(head)

    def _assign(self, assign: ast.Assign) -> None:
        for target in assign.targets:
            if not isinstance(target, ast.Name):
                continue
            if target.id == "cmd" and (head := self._first_str(assign.value)):
                self.executables.add(head)
            elif target.id.endswith("EXECUTABLES") and isinstance(assign.value, (ast.Tuple, ast.List)):
                self.executables |= {e.value for e in assign.value.elts if isinstance(e, ast.Constant)}


@pytest.fixture(scope="module")
def console_scripts() -> set[str]:
    import os
    from distutils.core import run_setup

    import setuptools  # noqa: F401  (first, so `distutils` is setuptools' own)

    cwd = os.getcwd()
    os.chdir(PACKAGE_DIR)  # setup.py globs launch/ and config/ relative to its folder, as colcon runs it
    try:
        dist = run_setup("setup.py", stop_after="init")
    finally:
        os.chdir(cwd)
    return {line.split("=")[0].strip() for line in dist.entry_points["console_scripts"]}


def launch_file(name: str) -> LaunchFile:
    return LaunchFile(LAUNCH_DIR / name)


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_file_compiles_and_generates_a_description(name):
    lf = launch_file(name)
    compile(lf.source, str(lf.path), "exec")
    functions = {n.name for n in lf.tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_file_declares_the_arguments_robots_expect(name):
    declared = launch_file(name).declared
    assert REQUIRED_ARGUMENTS[name] <= set(declared)
    assert len(declared) == len(set(declared)), f"{name} declares an argument twice"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_every_launch_configuration_used_is_declared(name):
    lf = launch_file(name)
    assert lf.used, f"{name} reads no launch argument"
    assert lf.used <= set(lf.declared), f"{name} uses undeclared {sorted(lf.used - set(lf.declared))}"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_every_executable_named_is_a_console_script(name, console_scripts):
    lf = launch_file(name)
    assert lf.executables, f"{name} starts nothing"
    if lf.dynamic_executable:
        assert set(NODE_SECTIONS) <= lf.executables, "nodes started by name must be listed in *_EXECUTABLES"
    missing = sorted(lf.executables - console_scripts)
    assert not missing, f"{name} starts {missing}, which setup.py does not install as console scripts"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_included_launch_files_exist_and_declare_what_they_are_passed(name):
    for target, passed in launch_file(name).includes:
        assert target is not None and (LAUNCH_DIR / target).is_file(), f"{name} includes missing {target}"
        assert passed <= set(launch_file(target).declared), f"{name} passes {target} undeclared arguments"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_parameter_files_named_exist_with_a_section_per_node(name):
    yaml_files = {s for s in launch_file(name).strings if s.endswith(".yaml") and not s.startswith(".")}
    assert yaml_files, f"{name} names no default parameter file"
    for file in yaml_files:
        path = CONFIG_DIR / file
        assert path.is_file(), f"{name} names {file}, missing from config/"
        sections = yaml.safe_load(path.read_text())
        for node in NODE_SECTIONS:
            assert "ros__parameters" in (sections.get(node) or {}), f"{file} has no {node}: ros__parameters:"
        listed = sections["bringup"]["ros__parameters"]["nodes"]
        assert set(listed) <= set(NODE_SECTIONS), f"{file} bringup lists unknown nodes"


def test_replay_does_not_start_the_camera_it_replaces():
    lf = launch_file("replay.launch.py")
    default_nodes = next(
        call.keywords for call in ast.walk(lf.tree) if isinstance(call, ast.Call)
        and LaunchFile._name(call) == "DeclareLaunchArgument" and call.args[0].value == "nodes"
    )
    value = next(kw.value.value for kw in default_nodes if kw.arg == "default_value")
    assert "camera" not in value.split(",")
    assert {"drafter", "bridge"} <= set(value.split(","))


def test_replay_launch_command_line_is_accepted_by_the_replay_subcommand():
    import argparse

    from speculative_vlm.bags import replay
    from speculative_vlm.cli import SUBCOMMANDS

    lf = launch_file("replay.launch.py")
    defaults = {}
    for call in ast.walk(lf.tree):
        if isinstance(call, ast.Call) and LaunchFile._name(call) == "DeclareLaunchArgument":
            default = next((kw.value.value for kw in call.keywords
                            if kw.arg == "default_value" and isinstance(kw.value, ast.Constant)), "/tmp/bag")
            defaults[call.args[0].value] = default
    cmd = next(a.value for a in ast.walk(lf.tree) if isinstance(a, ast.Assign)
               and isinstance(a.targets[0], ast.Name) and a.targets[0].id == "cmd")

    def token(e: ast.AST) -> str:
        if isinstance(e, ast.Constant):
            return e.value
        if isinstance(e, ast.List):  # launch concatenates the substitutions of a list element
            return "".join(token(part) for part in e.elts)
        return defaults[e.args[0].value]  # LaunchConfiguration("name") -> its default

    argv = [token(e) for e in cmd.elts]
    assert argv[:2] == ["speculative-vlm", "replay"] and SUBCOMMANDS["replay"][0] == replay.__name__
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    args = parser.parse_args(argv[2:] + ["--loop"])
    assert args.bag == "/tmp/bag" and args.rate == 1.0 and args.topics == ["/camera/image_raw"] and args.loop
    assert args.namespace == "" and args.wait_for_subscribers == 10


def test_sim_peers_accept_every_flag_sim_launch_passes():
    from speculative_vlm.cloud.server import _parser as cloud_parser
    from speculative_vlm.go2.sim import build_parser as sim_parser

    options = {o for p in (sim_parser(), cloud_parser()) for a in p._actions for o in a.option_strings}
    flags = {s for s in launch_file("sim.launch.py").strings if s.startswith("--")}
    assert flags and flags <= options, f"unknown peer flags {sorted(flags - options)}"


def test_sim_launch_hands_the_verifier_a_config_it_accepts():
    from speculative_vlm.cloud.config import from_mapping

    sections = yaml.safe_load((CONFIG_DIR / "sim.yaml").read_text())
    assert sections["bringup"]["ros__parameters"]["local_cloud"]
    # What sim.launch.py writes for `speculative-vlm-cloud --config`: the section alone.
    config = from_mapping({"ros__parameters": sections["cloud_server"]["ros__parameters"]})
    assert config.bind == sections["bridge"]["ros__parameters"]["cloud_address"]
