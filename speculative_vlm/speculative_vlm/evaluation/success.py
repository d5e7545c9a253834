"""The success rule of each family (:data:`~speculative_vlm.evaluation.families.RULES` in words).

:func:`judge` decides from what the episode left behind: how it ended, the commands, the final
pose and posture, the odometry in the start frame, and the farthest the robot ever got from its
start. The reason it gives names the first rule that failed.
"""

from __future__ import annotations

import math

from speculative_vlm.evaluation import families as f
from speculative_vlm.evaluation.families import Family
from speculative_vlm.go2.sim_model import STANDING, Mode

_POSTURE_MODES = {"sit": (Mode.SIT,), "stand_down": (Mode.LIE_DOWN,), "stand_up": STANDING}


def _distance(result, target: str, x: float, y: float) -> float | None:
    for obj in result.episode.scene.objects:
        if obj.name.removeprefix("the ") == target:
            return math.hypot(obj.x - x, obj.y - y)
    return None


def _still(result) -> str:
    """'' when the robot never moved, else what moved."""
    if result.max_offset > f.STILL_M:
        return f"the robot moved {result.max_offset:.2f} m"
    if abs(math.degrees(result.turned)) > f.STILL_DEG:
        return f"the robot turned {math.degrees(result.turned):.0f} degrees"
    if result.final_mode != result.episode.start_mode:
        return f"the posture changed from {result.episode.start_mode.name} to {result.final_mode.name}"
    return ""


def judge(result) -> tuple[bool, str]:
    """(success, why) of an :class:`~speculative_vlm.evaluation.runner.EpisodeResult` by its family's rule."""
    from speculative_vlm.evaluation.runner import bearing_deg

    intent = result.episode.intent
    family = intent.family
    if family == Family.REFUSE:
        moved = _still(result)
        return (False, moved) if moved else (True, f"no motion ({result.ended})")
    if family == Family.ABSENT:
        if result.max_offset > f.IN_PLACE_M:
            return False, f"wandered {result.max_offset:.2f} m looking for an object that is not there"
        if result.ended != "done":
            return False, f"ended by {result.ended}, not done"
        return True, f"stayed within {result.max_offset:.2f} m and said done"
    if result.ended != "done":
        return False, f"ended by {result.ended}, not done"
    if family == Family.GO_TO:
        d = _distance(result, intent.target, result.final.x, result.final.y)
        return (d <= f.ARRIVE_M, f"{d:.2f} m from the {intent.target}")
    if family in (Family.FACE, Family.FIND):
        limit = f.FACE_DEG if family == Family.FACE else f.IN_VIEW_DEG
        b = bearing_deg(result, intent.target)
        if result.max_offset > f.IN_PLACE_M:
            return False, f"moved {result.max_offset:.2f} m instead of turning in place"
        return (abs(b) <= limit, f"the {intent.target} is {b:.0f} degrees off straight ahead")
    if family == Family.BACK_AWAY:
        start = result.episode.scene
        d0 = _distance(result, intent.target, start.start_x, start.start_y)
        d1 = _distance(result, intent.target, result.final.x, result.final.y)
        grew = d1 - d0
        return (f.BACK_AWAY_MIN_M <= grew <= 2 * f.BACK_AWAY_M, f"the distance to the {intent.target} grew {grew:.2f} m")
    if family == Family.WALK:
        want = intent.direction * intent.amount
        if abs(result.left) > f.DISTANCE_TOL_M:
            return False, f"drifted {result.left:.2f} m sideways"
        return (abs(result.forward - want) <= f.DISTANCE_TOL_M, f"moved {result.forward:+.2f} m of {want:+.2f} m")
    if family == Family.SIDESTEP:
        want = intent.direction * intent.amount
        if abs(result.forward) > f.DISTANCE_TOL_M:
            return False, f"moved {result.forward:+.2f} m forward/back while stepping sideways"
        if abs(math.degrees(result.turned)) > f.TURN_TOL_DEG:
            return False, f"turned {math.degrees(result.turned):.0f} degrees while stepping sideways"
        return (abs(result.left - want) <= f.DISTANCE_TOL_M, f"moved {result.left:+.2f} m of {want:+.2f} m sideways")
    if family == Family.TURN:
        want, got = intent.direction * intent.amount, math.degrees(result.turned)
        if result.max_offset > f.IN_PLACE_M:
            return False, f"moved {result.max_offset:.2f} m instead of turning in place"
        return (abs(got - want) <= f.TURN_TOL_DEG, f"turned {got:+.0f} of {want:+.0f} degrees")
    if family == Family.POSTURE:
        if result.max_offset > f.IN_PLACE_M:
            return False, f"moved {result.max_offset:.2f} m"
        ok = result.final_mode in _POSTURE_MODES[intent.kind]
        return ok, f"ended in {result.final_mode.name} (asked: {intent.kind})"
    if family == Family.STOP:
        moved = _still(result)
        if moved:
            return False, moved
        others = [a for a in result.actions[:-1] if a != "stop"]
        return (not others, f"commands before done: {result.actions[:-1]}")
    raise ValueError(f"no success rule for family {family!r}")
