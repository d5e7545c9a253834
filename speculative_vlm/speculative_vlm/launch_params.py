"""A ROS 2 parameter file rewritten for a namespace, and one node's parameters from it.

The launch files read one YAML (config/sim.yaml, config/robot.yaml) in ``ros__parameters`` form,
as `speculative-vlm up` does. Its node sections are named relative to the root (``camera:``),
which rcl reads as ``/camera``: under ``namespace:=/robot1`` the node ``/robot1/camera`` would
not match and would silently start with its defaults. nav2 rewrites the file for the namespace
(``RewrittenYaml(root_key=namespace)``); ``launch_ros`` is not installable here, so this module
does the same in plain Python, tested against rclpy's own matching:

- :func:`rewrite_for_namespace`: relative section names get the namespace (``camera`` ->
  ``/robot1/camera``, nested ``ns: {camera: ...}`` -> ``/robot1/ns/camera``); sections whose
  name starts with ``/`` (``/**``, ``/**/camera``, ``/other/camera``) are kept as written, so
  wildcards still reach every node.
- :func:`parameters_for`: the parameters a node with a fully qualified name receives from a
  rewritten file, merged in file order like rcl does (a later matching section wins).
- :func:`parameter_arguments`: those parameters as ``-p name:=value`` command-line rules, so a
  launch file hands them to the node without writing any file (launch_ros turns a dict into a
  temporary file it never removes).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

PARAMETERS_KEY = "ros__parameters"


class ParameterFileError(ValueError):
    """A parameter file, or a value in it, that rcl would not accept; the message says where."""


def normalize_namespace(namespace: str) -> str:
    """``""``, ``"/"``, ``"robot1"`` and ``"/robot1/"`` -> ``""``, ``""``, ``"/robot1"``, ``"/robot1"``."""
    namespace = namespace.strip().strip("/")
    return f"/{namespace}" if namespace else ""


def rewrite_for_namespace(document: Mapping[str, Any], namespace: str) -> dict[str, dict[str, Any]]:
    """The node sections of ``document`` keyed by absolute name patterns under ``namespace``.

    The result maps each section's absolute name (or wildcard pattern) to its
    ``ros__parameters`` mapping, in file order; it is itself a valid parameter file once each
    value is wrapped in ``{ros__parameters: ...}`` (see :func:`as_parameter_file`).
    """
    if not isinstance(document, Mapping):
        raise ParameterFileError("a parameter file is a mapping of node names to sections")
    prefix = normalize_namespace(namespace)
    sections: dict[str, dict[str, Any]] = {}

    def walk(mapping: Mapping[str, Any], base: str) -> None:
        for key, value in mapping.items():
            key = str(key)
            if not isinstance(value, Mapping):
                raise ParameterFileError(f"{base or '/'}: {key!r} is not a node section (a mapping)")
            # An absolute key stands as written; a relative one is placed under its parents.
            name = key.rstrip("/") if key.startswith("/") else f"{base}/{key.strip('/')}"
            if PARAMETERS_KEY in value:
                params = value[PARAMETERS_KEY] or {}
                if not isinstance(params, Mapping):
                    raise ParameterFileError(f"{name}: {PARAMETERS_KEY} must be a mapping")
                sections.setdefault(name, {}).update(params)
                nested = {k: v for k, v in value.items() if k != PARAMETERS_KEY}
                if nested:
                    walk(nested, name)
            else:
                walk(value, name)

    walk(document, prefix)
    return sections


def as_parameter_file(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Sections from :func:`rewrite_for_namespace` in ``ros__parameters`` form, for ``--params-file``."""
    return {name: {PARAMETERS_KEY: dict(params)} for name, params in sections.items()}


def _pattern(name: str) -> re.Pattern[str]:
    """rcl's node-name wildcards: ``*`` is one name token, ``**`` zero or more tokens."""
    tokens = name.strip("/").split("/") if name.strip("/") else []
    regex = ""
    for token in tokens:
        if token == "**":
            regex += "(/[^/]+)*"
        elif token == "*":
            regex += "/[^/]+"
        else:
            regex += "/" + re.escape(token)
    return re.compile(regex or "/")


def matches(pattern: str, node_fqn: str) -> bool:
    """Whether a section name (``/ns/node``, ``/**``, ``/**/node``, ``/ns/*``) applies to a node."""
    return _pattern(pattern).fullmatch(node_fqn) is not None


def node_fqn(name: str, namespace: str) -> str:
    return f"{normalize_namespace(namespace)}/{name}"


def parameters_for(sections: Mapping[str, Mapping[str, Any]], fqn: str) -> dict[str, Any]:
    """The parameters node ``fqn`` receives: every matching section merged, later ones winning."""
    merged: dict[str, Any] = {}
    for pattern, params in sections.items():
        if matches(pattern, fqn):
            merged.update(params)
    return merged


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become dotted names, as rcl reads nested parameters from a file."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _value_text(name: str, value: Any) -> str:
    """A parameter value as YAML that rcl reads back with the same type (JSON is YAML)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterFileError(f"{name}: {value} cannot be passed on the command line")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ParameterFileError(f"{name}: an empty list has no type rcl can infer; leave the parameter out")
        kinds = {bool if isinstance(v, bool) else int if isinstance(v, int) else type(v) for v in value}
        if kinds == {int, float}:
            value = [float(v) for v in value]  # rcl needs one type per array; YAML gives mixed
        elif len(kinds) != 1 or not kinds <= {bool, int, float, str}:
            raise ParameterFileError(f"{name}: a list parameter holds one type of bool, int, float or str, "
                                     f"got {value!r}")
    elif not isinstance(value, (bool, int, float, str)):
        raise ParameterFileError(f"{name}: {type(value).__name__} is not a ROS parameter type ({value!r})")
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def parameter_arguments(params: Mapping[str, Any]) -> list[str]:
    """``-p name:=value`` rules (after a ``--ros-args``) that give a node exactly ``params``."""
    arguments: list[str] = []
    for name, value in flatten(params).items():
        arguments += ["-p", f"{name}:={_value_text(name, value)}"]
    return arguments
