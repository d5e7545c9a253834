"""How the nodes declare their parameters and apply the ones that change at run time.

A parameter is either start-only (``read_only``: a model, an address, a topic, a network
interface; ``ros2 param set`` on it is refused with rclpy's "read-only parameter" reason instead
of being silently ignored) or takes effect at run time. Most run-time parameters are simply read
where they are used; the rest (a timer's period, a setting held by an object built at start)
are pushed where they live by a callback registered with :func:`on_parameters_set`.
"""

from __future__ import annotations

from collections.abc import Callable

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.timer import Timer


def float_range(lo: float, hi: float, text: str, read_only: bool = False) -> ParameterDescriptor:
    """A float parameter's descriptor: description and inclusive range."""
    return ParameterDescriptor(
        description=text, read_only=read_only,
        floating_point_range=[FloatingPointRange(from_value=lo, to_value=hi, step=0.0)],
    )


def int_range(lo: int, hi: int, text: str, read_only: bool = False) -> ParameterDescriptor:
    """An integer parameter's descriptor: description and inclusive range."""
    return ParameterDescriptor(
        description=text, read_only=read_only, integer_range=[IntegerRange(from_value=lo, to_value=hi, step=1)]
    )


def start_only(text: str) -> ParameterDescriptor:
    """A read_only parameter's descriptor: set at start (command line, YAML), refused afterwards."""
    return ParameterDescriptor(description=text, read_only=True)


def on_parameters_set(node: Node, callback: Callable[[dict[str, object]], None]) -> None:
    """Call ``callback({name: new value})`` after parameters of ``node`` have been set.

    rclpy >= 7 (Iron) has post-set callbacks; on Humble the callback runs from the on-set
    hook, after the descriptors (ranges, read_only) have already accepted the values.
    """
    if hasattr(node, "add_post_set_parameters_callback"):
        node.add_post_set_parameters_callback(lambda params: callback({p.name: p.value for p in params}))
    else:  # pragma: no cover - Humble

        def on_set(params: list[Parameter]) -> SetParametersResult:
            callback({p.name: p.value for p in params})
            return SetParametersResult(successful=True)

        node.add_on_set_parameters_callback(on_set)


def set_timer_period(timer: Timer | None, period_s: float) -> None:
    """Change a running timer's period (a ``*_period_s`` parameter set at run time)."""
    if timer is not None:
        timer.timer_period_ns = int(period_s * 1e9)
