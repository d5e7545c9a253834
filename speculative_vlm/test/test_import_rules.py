"""The dependency rules of DESIGN.md, read from the source: the engine runs without ROS or gRPC,
the cloud server runs on a GPU box with no ROS, and the command package is plain Python.

Every import statement counts, at module level or inside a function, so a lazy import cannot
slip a dependency past the rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "speculative_vlm"

# folder -> top-level modules it must never import (prefix match on the dotted name)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "decoding": ("rclpy", "grpc", "google.protobuf", "speculative_vlm_msgs", "speculative_vlm.protocol",
                 "speculative_vlm.nodes", "speculative_vlm.cloud"),
    "cloud": ("rclpy", "speculative_vlm_msgs", "speculative_vlm.nodes"),
    "commands": ("rclpy", "speculative_vlm_msgs", "std_msgs", "geometry_msgs", "sensor_msgs",
                 "speculative_vlm.nodes"),
}


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append((node.lineno, node.module))
    return names


def violations(folder: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for line, name in imported_names(path):
            for banned in FORBIDDEN[folder]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_package_never_imports_against_the_layering(folder):
    assert list((PACKAGE / folder).rglob("*.py")), f"{folder}/ has no modules: the rule would pass vacuously"
    assert violations(folder) == []


def test_the_rule_sees_a_lazy_import_inside_a_function(tmp_path):
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    import rclpy.node\n    from grpc import aio\n")
    assert imported_names(module) == [(2, "rclpy.node"), (3, "grpc")]
