"""Schema commands <-> ``speculative_vlm_msgs/LocomotionCommand`` messages.

:func:`text_to_msg` is the one way verified model text becomes a robot command: it parses
with :func:`~speculative_vlm.commands.schema.parse_command` (which refuses anything out of
schema or limits with a reason, never guessing) and only then builds the message.
"""

from __future__ import annotations

from builtin_interfaces.msg import Time

from speculative_vlm.commands.schema import DEFAULT_LIMITS, Action, Limits, LocomotionCommand, parse_command
from speculative_vlm_msgs.msg import LocomotionCommand as LocomotionCommandMsg

_TO_MSG = {
    Action.MOVE: LocomotionCommandMsg.MOVE,
    Action.STOP: LocomotionCommandMsg.STOP,
    Action.STAND_UP: LocomotionCommandMsg.STAND_UP,
    Action.STAND_DOWN: LocomotionCommandMsg.STAND_DOWN,
    Action.SIT: LocomotionCommandMsg.SIT,
    Action.DONE: LocomotionCommandMsg.DONE,
}
_FROM_MSG = {v: k for k, v in _TO_MSG.items()}


class UnknownActionError(ValueError):
    """A LocomotionCommand message whose ``action`` is none of its constants."""


def to_msg(
    command: LocomotionCommand, verified: bool, text: str = "", stamp: Time | None = None
) -> LocomotionCommandMsg:
    """The message for ``command``; ``text`` defaults to the command's canonical JSON."""
    msg = LocomotionCommandMsg()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.action = _TO_MSG[command.action]
    msg.vx, msg.vy, msg.vyaw, msg.duration = command.vx, command.vy, command.vyaw, command.duration
    msg.verified = verified
    msg.text = text or command.to_text()
    return msg


def from_msg(msg: LocomotionCommandMsg) -> LocomotionCommand:
    """The schema command carried by ``msg`` (float32 fields widened to float)."""
    try:
        action = _FROM_MSG[msg.action]
    except KeyError:
        raise UnknownActionError(
            f"LocomotionCommand.action={msg.action} is not one of {sorted(_FROM_MSG)}; "
            "use the message's constants (MOVE, STOP, ...)"
        ) from None
    return LocomotionCommand(action, float(msg.vx), float(msg.vy), float(msg.vyaw), float(msg.duration))


def text_to_msg(
    text: str, verified: bool, limits: Limits = DEFAULT_LIMITS, stamp: Time | None = None
) -> LocomotionCommandMsg:
    """Parse model text into a message; raises ``CommandError`` (with the reason) if it is not a command."""
    return to_msg(parse_command(text, limits), verified, text, stamp)
