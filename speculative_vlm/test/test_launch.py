"""Launch files, checked without ROS 2 `launch` (not installable here): they compile, declare the
arguments nav2-style bringups take, start every process as an executable of this package (never a
bare command on PATH), write no temporary files, and every launch file, parameter file and launch
argument they name exists. The files are read from their syntax trees, never by importing `launch`;
what they start is decided in speculative_vlm.launch_graph, tested here against the real parsers of
each executable and against rclpy's reading of the `-p` rules."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import yaml
from go2_harness import ros_node
from speculative_vlm.launch_graph import (
    GRAPH_NODES,
    NODE_EXECUTABLES,
    PACKAGE,
    LaunchConfigError,
    launched_executables,
    node_launches,
    peer_launches,
    replay_launch,
)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
LAUNCH_DIR = PACKAGE_DIR / "launch"
CONFIG_DIR = PACKAGE_DIR / "config"
LAUNCH_FILES = ("robot.launch.py", "sim.launch.py", "replay.launch.py")
NAV2_ARGUMENTS = {"namespace", "use_sim_time", "params_file", "log_level", "autostart", "use_respawn"}
REQUIRED_ARGUMENTS = {
    "robot.launch.py": NAV2_ARGUMENTS | {"cloud_address"},
    "sim.launch.py": NAV2_ARGUMENTS | {"cloud_address"},
    "replay.launch.py": NAV2_ARGUMENTS | {"bag"},
}
STARTS_PROCESSES = {"Node", "LifecycleNode", "ExecuteProcess"}


class LaunchFile:
    """What a launch file names, read from its syntax tree."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = path.read_text(encoding="utf-8")
        self.tree = ast.parse(self.source, filename=str(path))
        self.declared: list[str] = []
        self.used: set[str] = set()
        self.strings: set[str] = set()
        self.imports: set[str] = set()
        self.process_calls: list[ast.Call] = []
        self.includes: list[tuple[str, set[str]]] = []  # (launch file, argument names passed)
        self.tuples = {t.id: [e.value for e in a.value.elts if isinstance(e, ast.Constant)]
                       for a in self.tree.body if isinstance(a, ast.Assign) and isinstance(a.value, ast.Tuple)
                       for t in a.targets if isinstance(t, ast.Name)}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                self.strings.add(node.value)
            elif isinstance(node, ast.Call):
                self._call(node)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                self.imports |= {a.name for a in node.names} | ({node.module} if isinstance(node, ast.ImportFrom) else set())

    @staticmethod
    def name(call: ast.Call) -> str:
        f = call.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""

    def _call(self, call: ast.Call) -> None:
        name = self.name(call)
        first = call.args[0] if call.args else None
        literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
        if name == "DeclareLaunchArgument" and literal:
            self.declared.append(literal)
        elif name in ("LaunchConfiguration", "arg") and literal:  # arg(): a file's LaunchConfiguration shorthand
            self.used.add(literal)
        elif name in STARTS_PROCESSES or {kw.arg for kw in call.keywords} & {"executable", "cmd"}:
            self.process_calls.append(call)  # Node, LifecycleNode or ExecuteProcess, under any alias
        elif name == "IncludeLaunchDescription":
            target = next((s.value for s in ast.walk(call) if isinstance(s, ast.Constant)
                           and isinstance(s.value, str) and s.value.endswith(".launch.py")), None)
            passed: set[str] = set()
            for kw in call.keywords:
                if kw.arg != "launch_arguments":
                    continue
                for d in ast.walk(kw.value):
                    if isinstance(d, ast.Dict):
                        passed |= {k.value for k in d.keys if isinstance(k, ast.Constant)}
                    elif isinstance(d, ast.DictComp) and isinstance(d.generators[0].iter, ast.Name):
                        passed |= set(self.tuples[d.generators[0].iter.id])
            self.used |= passed
            self.includes.append((target, passed))

    def keyword(self, call: ast.Call, name: str) -> ast.AST | None:
        return next((kw.value for kw in call.keywords if kw.arg == name), None)


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


def sim_yaml() -> dict:
    return yaml.safe_load((CONFIG_DIR / "sim.yaml").read_text())


# ---- the launch files themselves -------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_file_compiles_and_generates_a_description(name):
    lf = launch_file(name)
    compile(lf.source, str(lf.path), "exec")
    functions = {n.name for n in lf.tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_file_declares_the_arguments_nav2_bringups_take(name):
    declared = launch_file(name).declared
    assert REQUIRED_ARGUMENTS[name] <= set(declared), f"missing {sorted(REQUIRED_ARGUMENTS[name] - set(declared))}"
    assert len(declared) == len(set(declared)), f"{name} declares an argument twice"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_every_declared_argument_is_used_and_every_used_one_declared(name):
    lf = launch_file(name)
    assert lf.used <= set(lf.declared), f"{name} uses undeclared {sorted(lf.used - set(lf.declared))}"
    assert set(lf.declared) <= lf.used, f"{name} declares unused {sorted(set(lf.declared) - lf.used)}"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_every_process_is_started_as_an_executable_of_the_package(name):
    lf = launch_file(name)
    assert lf.process_calls, f"{name} starts nothing"
    for call in lf.process_calls:
        where = f"{name} line {call.lineno}"
        if lf.keyword(call, "cmd") is None:  # a launch_ros Node or LifecycleNode
            package = lf.keyword(call, "package")
            assert isinstance(package, ast.Name) and package.id == "PACKAGE", f"{where}: Node without package=PACKAGE"
            assert lf.keyword(call, "executable") is not None, f"{where}: Node without executable="
        else:  # ExecuteProcess: the command must start with ExecutableInPackage(package=PACKAGE, ...)
            cmd = lf.keyword(call, "cmd")
            assert isinstance(cmd, ast.List) and cmd.elts, f"{where}: cmd is not a list"
            head = cmd.elts[0]
            assert isinstance(head, ast.Call) and LaunchFile.name(head) == "ExecutableInPackage", \
                f"{where}: starts {ast.unparse(head)}, a command looked up on PATH, not an executable of the package"
            package = lf.keyword(head, "package")
            assert isinstance(package, ast.Name) and package.id == "PACKAGE"
    assert PACKAGE == "speculative_vlm"


def test_every_executable_a_launch_file_can_start_is_a_console_script_installed_into_lib(console_scripts):
    executables = launched_executables()
    plans = ([p.executable for p in node_launches(CONFIG_DIR / "sim.yaml", nodes=list(GRAPH_NODES))]
             + [p.executable for p in peer_launches(CONFIG_DIR / "sim.yaml")]
             + [replay_launch("/tmp/bag").executable])
    assert set(plans) <= executables
    missing = sorted(executables - console_scripts)
    assert not missing, f"launch files start {missing}, which setup.py does not install as console scripts"
    cfg = (PACKAGE_DIR / "setup.cfg").read_text()
    assert "install_scripts=$base/lib/speculative_vlm" in cfg.replace(" ", "")  # where ros2 run looks


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_launch_files_write_no_temporary_files(name):
    from speculative_vlm import launch_graph, launch_params

    lf = launch_file(name)
    assert not lf.imports & {"tempfile", "NamedTemporaryFile", "mkstemp"}, f"{name} writes a temporary file"
    for module in (launch_graph, launch_params):
        assert "tempfile" not in Path(module.__file__).read_text(), f"{module.__name__} writes a temporary file"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_included_launch_files_exist_and_declare_what_they_are_passed(name):
    for target, passed in launch_file(name).includes:
        assert target is not None and (LAUNCH_DIR / target).is_file(), f"{name} includes missing {target}"
        assert passed <= set(launch_file(target).declared), f"{name} passes {target} undeclared arguments"
        assert NAV2_ARGUMENTS <= passed, f"{name} does not forward {sorted(NAV2_ARGUMENTS - passed)} to {target}"


@pytest.mark.parametrize("name", LAUNCH_FILES)
def test_parameter_files_named_exist_with_a_section_per_node(name):
    yaml_files = {s for s in launch_file(name).strings if s.endswith(".yaml") and not s.startswith(".")}
    assert yaml_files, f"{name} names no default parameter file"
    for file in yaml_files:
        path = CONFIG_DIR / file
        assert path.is_file(), f"{name} names {file}, missing from config/"
        sections = yaml.safe_load(path.read_text())
        for node in GRAPH_NODES:
            assert "ros__parameters" in (sections.get(node) or {}), f"{file} has no {node}: ros__parameters:"
        listed = sections["bringup"]["ros__parameters"]["nodes"]
        assert set(listed) <= set(GRAPH_NODES), f"{file} bringup lists unknown nodes"


def test_replay_does_not_start_the_camera_it_replaces():
    lf = launch_file("replay.launch.py")
    call = next(c for c in ast.walk(lf.tree) if isinstance(c, ast.Call)
                and LaunchFile.name(c) == "DeclareLaunchArgument" and c.args[0].value == "nodes")
    value = lf.keyword(call, "default_value").value
    assert "camera" not in value.split(",")
    assert {"drafter", "bridge"} <= set(value.split(","))


# ---- what they start (speculative_vlm.launch_graph) -------------------------------------------

def test_the_nodes_started_are_the_files_bringup_list_each_its_own_executable():
    plans = node_launches(CONFIG_DIR / "sim.yaml", foxglove=False)
    assert [p.name for p in plans] == sim_yaml()["bringup"]["ros__parameters"]["nodes"]
    assert all(p.executable == NODE_EXECUTABLES[p.name] for p in plans)
    assert [p.name for p in plans if p.lifecycle] == ["motion"]


def test_a_namespaced_node_receives_its_section_of_the_file_through_its_ros_arguments():
    document = sim_yaml()
    plans = node_launches(CONFIG_DIR / "sim.yaml", namespace="go2_a", log_level="debug")
    for plan in plans:
        assert plan.namespace == "/go2_a"
        assert plan.ros_arguments[:2] == ["--log-level", "debug"]
        section = {k: v for k, v in document[plan.name]["ros__parameters"].items() if k != "enabled"}
        assert section.items() <= plan.parameters.items(), plan.name
        with ros_node(plan.name, plan.namespace, plan.ros_arguments) as node:
            for key, value in plan.parameters.items():
                got = node.get_parameter(key).value
                assert (list(got) if isinstance(value, list) else got) == value, f"{plan.name}.{key}"
            assert node.get_parameter("use_sim_time").value is False
    assert {p.name for p in plans} == set(document["bringup"]["ros__parameters"]["nodes"]) | {"foxglove"}


def test_wildcard_sections_of_the_params_file_reach_every_launched_node(tmp_path):
    document = sim_yaml()
    document["/**"] = {"ros__parameters": {"use_sim_time": True, "site": "lab"}}
    path = tmp_path / "with_wildcard.yaml"
    path.write_text(yaml.safe_dump(document))
    for plan in node_launches(path, namespace="/fleet/go2_b", use_sim_time=True):
        assert plan.parameters["site"] == "lab" and plan.parameters["use_sim_time"] is True


def test_launch_arguments_override_the_file_only_when_given():
    default = {p.name: p.parameters for p in node_launches(CONFIG_DIR / "robot.yaml")}
    assert default["motion"]["autostart"] is False  # robot.yaml: activation is deliberate
    assert default["bridge"]["cloud_address"] == "verifier.example.org:50561"
    given = {p.name: p.parameters for p in node_launches(
        CONFIG_DIR / "robot.yaml", autostart=True, cloud_address="10.0.0.5:50561", use_sim_time=True)}
    assert given["motion"]["autostart"] is True and given["bridge"]["cloud_address"] == "10.0.0.5:50561"
    assert all(params["use_sim_time"] is True for params in given.values())


def test_the_foxglove_view_starts_where_the_file_enables_it_with_the_sim_scene():
    sim = {p.name: p for p in node_launches(CONFIG_DIR / "sim.yaml")}
    view = sim["foxglove"]
    assert view.executable == "speculative-vlm-foxglove" and not view.lifecycle
    assert view.parameters["port"] == 8765 and view.parameters["host"] == "127.0.0.1"
    assert view.parameters["scene"] == "default" and "enabled" not in view.parameters  # the launch's switch
    assert "foxglove" not in {p.name for p in node_launches(CONFIG_DIR / "robot.yaml")}
    on_robot = {p.name: p for p in node_launches(CONFIG_DIR / "robot.yaml", foxglove=True)}
    assert on_robot["foxglove"].parameters["scene"] == ""  # no simulated Go2, no scene to draw
    assert "foxglove" not in {p.name for p in node_launches(CONFIG_DIR / "sim.yaml", foxglove=False)}


def test_nodes_argument_picks_a_subset_and_unknown_names_are_refused():
    picked = node_launches(CONFIG_DIR / "sim.yaml", nodes=["drafter", "bridge"], foxglove=False)
    assert [p.name for p in picked] == ["drafter", "bridge"]
    with pytest.raises(LaunchConfigError, match="rviz"):
        node_launches(CONFIG_DIR / "sim.yaml", nodes=["rviz"])


def test_an_unknown_log_level_is_refused_before_anything_starts():
    with pytest.raises(LaunchConfigError, match="log_level"):
        node_launches(CONFIG_DIR / "sim.yaml", log_level="loud")


def test_sim_peers_are_started_with_arguments_their_own_parsers_accept():
    from speculative_vlm.cloud.server import _parser as cloud_parser
    from speculative_vlm.cloud.server import config_from_args
    from speculative_vlm.go2.sim import build_parser as sim_parser

    peers = {p.name: p for p in peer_launches(CONFIG_DIR / "sim.yaml")}
    assert set(peers) == {"sim_go2", "cloud"}
    sim = sim_parser().parse_args(peers["sim_go2"].arguments)
    motion = sim_yaml()["motion"]["ros__parameters"]
    assert (sim.interface, sim.domain_id) == (motion["network_interface"], motion["dds_domain_id"])
    # The verifier reads the cloud_server section of the very same file: no copy is written.
    config = config_from_args(cloud_parser().parse_args(peers["cloud"].arguments))
    assert config.bind == sim_yaml()["bridge"]["ros__parameters"]["cloud_address"]
    assert config.model == sim_yaml()["cloud_server"]["ros__parameters"]["model"]


def test_the_verifier_refuses_a_config_section_that_is_not_there():
    from speculative_vlm.cloud.config import ConfigError
    from speculative_vlm.cloud.server import _parser as cloud_parser
    from speculative_vlm.cloud.server import config_from_args

    with pytest.raises(ConfigError, match="no section 'cloud'"):
        config_from_args(cloud_parser().parse_args(["--config", str(CONFIG_DIR / "sim.yaml"), "--config-section", "cloud"]))
    with pytest.raises(ConfigError, match="--config too"):
        config_from_args(cloud_parser().parse_args(["--config-section", "cloud_server"]))


def test_the_robot_file_starts_no_peers():
    assert peer_launches(CONFIG_DIR / "robot.yaml") == []


def test_replay_command_line_is_accepted_by_the_replay_subcommand():
    from speculative_vlm.cli import SUBCOMMANDS, replay

    plan = replay_launch("/tmp/bag", namespace="go2_a", loop=True, log_level="warn")
    assert plan.executable == "speculative-vlm" and plan.arguments[0] == "replay"
    assert SUBCOMMANDS["replay"][0] == replay.__name__
    parser = argparse.ArgumentParser()
    replay.add_arguments(parser)
    args = parser.parse_args(plan.arguments[1:])
    assert args.bag == "/tmp/bag" and args.rate == 1.0 and args.topics == ["/camera/image_raw"] and args.loop
    assert args.namespace == "/go2_a" and args.wait_for_subscribers == 10
    assert args.ros_args == ["--log-level", "warn"]
