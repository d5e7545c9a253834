"""The parameter file rewritten for a namespace (launch_params), held against rclpy's own reading of
parameter files and `-p` rules: what a launched node receives is what the file says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from go2_harness import ros_node
from rclpy.node import Node
from speculative_vlm.launch_params import (
    ParameterFileError,
    as_parameter_file,
    matches,
    parameter_arguments,
    parameters_for,
    rewrite_for_namespace,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def received(node: Node) -> dict:
    """The parameters a node holds beyond those every rclpy node declares itself."""
    built_in = {"use_sim_time", "start_type_description_service"}
    return {name: p.value for name, p in node.get_parameters_by_prefix("").items() if name not in built_in}


def as_ros(value):
    """rclpy returns arrays as array.array / lists; compare as plain lists."""
    return list(value) if not isinstance(value, (str, bytes, bool, int, float)) else value


DOCUMENT = {
    "/**": {"ros__parameters": {"shared": 1, "rate": 5.0}},
    "camera": {"ros__parameters": {"rate": 10.0, "source": "go2_video", "size": [320, 240]}},
    "/**/monitor": {"ros__parameters": {"label": "any monitor"}},
    "/elsewhere/camera": {"ros__parameters": {"source": "file"}},
    "arm": {"gripper": {"ros__parameters": {"force": 2.5}}},
}


def test_relative_sections_get_the_namespace_and_absolute_ones_stay_as_written():
    sections = rewrite_for_namespace(DOCUMENT, "robot1")
    assert list(sections) == ["/**", "/robot1/camera", "/**/monitor", "/elsewhere/camera", "/robot1/arm/gripper"]
    assert sections["/robot1/camera"]["source"] == "go2_video"


def test_without_a_namespace_sections_are_rooted():
    assert list(rewrite_for_namespace(DOCUMENT, "/")) == [
        "/**", "/camera", "/**/monitor", "/elsewhere/camera", "/arm/gripper"]


def test_wildcard_sections_reach_every_node_and_a_later_section_wins():
    sections = rewrite_for_namespace(DOCUMENT, "/robot1")
    assert parameters_for(sections, "/robot1/camera") == {
        "shared": 1, "rate": 10.0, "source": "go2_video", "size": [320, 240]}
    assert parameters_for(sections, "/robot1/monitor") == {"shared": 1, "rate": 5.0, "label": "any monitor"}
    assert parameters_for(sections, "/robot1/drafter") == {"shared": 1, "rate": 5.0}


@pytest.mark.parametrize("pattern, fqn, expected", [
    ("/**", "/a/b/c", True), ("/**/c", "/c", True), ("/**/c", "/a/b/c", True), ("/a/*", "/a/c", True),
    ("/a/*", "/a/b/c", False), ("/c", "/a/c", False), ("/a/c", "/a/c", True), ("/a/**", "/a/b/c", True),
])
def test_wildcard_matching_agrees_with_rclpy(tmp_path, pattern, fqn, expected):
    assert matches(pattern, fqn) == expected
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({pattern: {"ros__parameters": {"probe": 7}}}))
    namespace, _, name = fqn.rpartition("/")
    with ros_node(name, namespace or "/", ["--params-file", str(path)]) as node:
        assert node.has_parameter("probe") == expected


@pytest.mark.parametrize("config", ["sim.yaml", "robot.yaml"])
def test_a_namespaced_node_reads_its_section_from_the_rewritten_file_as_rclpy_does(tmp_path, config):
    document = yaml.safe_load((CONFIG_DIR / config).read_text())
    sections = rewrite_for_namespace(document, "/go2_a")
    path = tmp_path / "rewritten.yaml"
    path.write_text(yaml.safe_dump(as_parameter_file(sections)))
    for name in ("camera", "motion", "bridge", "drafter", "monitor"):
        expected = document[name]["ros__parameters"]
        assert parameters_for(sections, f"/go2_a/{name}") == expected
        with ros_node(name, "/go2_a", ["--params-file", str(path)]) as node:
            assert {k: as_ros(v) for k, v in received(node).items()} == expected


def test_the_unrewritten_file_misses_a_namespaced_node(tmp_path):
    # Why the rewriting exists: rcl reads `camera:` as /camera only.
    path = tmp_path / "plain.yaml"
    path.write_text((CONFIG_DIR / "sim.yaml").read_text())
    with ros_node("camera", "/go2_a", ["--params-file", str(path)]) as node:
        assert not node.has_parameter("source")


def test_parameter_rules_give_a_node_exactly_the_values_and_types_of_the_file():
    params = {"rate_hz": 5.0, "width": 320, "source": "go2_video", "enabled": False, "empty": "",
              "address": "127.0.0.1:50561", "instruction": "walk to the red ball", "layers": [12, 22],
              "gains": [0.5, 1.0], "names": ["a", "b c"], "number_text": "42", "limits": {"max_vx": 0.3}}
    with ros_node("probe", "/ns", parameter_arguments(params)) as node:
        got = received(node)
    assert {k: as_ros(v) for k, v in got.items()} == {**{k: v for k, v in params.items() if k != "limits"},
                                                      "limits.max_vx": 0.3}
    assert type(got["rate_hz"]) is float and type(got["width"]) is int and got["number_text"] == "42"


def test_a_list_of_ints_and_floats_becomes_a_float_array():
    with ros_node("probe", "/", parameter_arguments({"mixed": [1, 2.5]})) as node:
        assert list(node.get_parameter("mixed").value) == [1.0, 2.5]


@pytest.mark.parametrize("value", [[], [1, "a"], None, float("nan"), [[1]]])
def test_values_rcl_cannot_take_are_refused_by_name(value):
    with pytest.raises(ParameterFileError, match="bad"):
        parameter_arguments({"bad": value})


def test_a_section_that_is_not_a_mapping_is_refused():
    with pytest.raises(ParameterFileError, match="camera"):
        rewrite_for_namespace({"camera": 3}, "")
