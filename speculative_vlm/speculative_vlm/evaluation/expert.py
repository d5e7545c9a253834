"""The scripted expert: a geometric planner that gives the next command from the ground truth.

It knows the scene and the robot's pose exactly, and plans short moves (at most ``step_s``
seconds) that are re-planned every step, with one-decimal numbers inside the motion node's limits
as the command grammar writes them. It is the teacher for training, so it decides only on what a
model could also tell from its prompt: an object counts as seen only inside the camera's view
(``in_view_deg`` either side, within ``view_range_m``); an unseen object is looked for by turning
left in steps smaller than that view, so nothing is skipped; after a nearly full turn without
finding it the expert stops, then says done; progress (distance walked, angle turned) comes from
odometry since the instruction, as the prompt's progress line tells it; a posture or a stop is
reported done on the step after it was commanded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from speculative_vlm.commands.scene_text import NamedPoint, Pose, relative
from speculative_vlm.commands.schema import Action, LocomotionCommand
from speculative_vlm.evaluation.families import Family, Intent
from speculative_vlm.go2.motion_rules import MotionLimits
from speculative_vlm.go2.scene import Scene


@dataclass(frozen=True)
class ExpertSettings:
    """How the expert plans; the defaults pass the families' success rules with margin."""

    step_s: float = 1.5  # longest command; the next step re-plans
    min_step_s: float = 0.5  # shortest move, so the robot reaches the commanded speed
    in_view_deg: float = 40.0  # an object counts as seen within this bearing (the camera sees 45)
    view_range_m: float = 7.0  # ... and this distance
    search_s: float = 1.0  # one look-around turn at full yaw rate (57 degrees at 1 rad/s, inside the view)
    give_up_deg: float = 280.0  # after turning this far left without seeing it: stop, then done
    arrive_m: float = 0.5  # go to: done this close to the object's centre (the rule allows 0.6)
    approach_m: float = 0.4  # go to: walk until this close
    turn_first_deg: float = 20.0  # go to: turn in place first when the object is further off than this
    aim_deg: float = 6.0  # face / turn: done within this
    distance_tol_m: float = 0.08  # walk / sidestep / back away: done within this


@dataclass(frozen=True)
class Situation:
    """What the expert knows at a step: the task, the ground truth, and odometry since the instruction."""

    intent: Intent
    scene: Scene
    pose: Pose
    forward: float = 0.0  # m along the start heading
    left: float = 0.0  # m to the left of it
    turned: float = 0.0  # rad, unwrapped, + left
    last_action: str = ""  # the previous command's action ("" before the first)


def _ceil_tenth(x: float) -> float:
    return math.ceil(round(x * 10, 6)) / 10


class Expert:
    """Next command for any family, from a :class:`Situation`."""

    def __init__(self, limits: MotionLimits | None = None, settings: ExpertSettings | None = None) -> None:
        self.limits = limits or MotionLimits()
        self.settings = settings or ExpertSettings()

    # ---- planning primitives --------------------------------------------------------------
    def _plan(self, amount: float, top: float) -> tuple[float, float]:
        """(speed, duration) covering ``amount`` at most ``top`` per second, one decimal each."""
        s = self.settings
        duration = min(max(_ceil_tenth(abs(amount) / top), s.min_step_s), s.step_s)
        speed = max(-top, min(top, round(amount / duration, 1)))
        if speed == 0.0:  # too little for one decimal at this duration: the slowest speed, shorter
            speed = math.copysign(0.1, amount)
            duration = max(0.1, round(abs(amount) / 0.1, 1))
        return speed, duration

    def _move(self, vx: float = 0.0, vy: float = 0.0, vyaw: float = 0.0, duration: float = 0.0) -> LocomotionCommand:
        return LocomotionCommand(Action.MOVE, vx + 0.0, vy + 0.0, vyaw + 0.0, duration)

    def _turn(self, angle: float) -> LocomotionCommand:
        vyaw, duration = self._plan(angle, self.limits.max_vyaw)
        return self._move(vyaw=vyaw, duration=duration)

    def _forward(self, distance: float) -> LocomotionCommand:
        top = self.limits.max_vx if distance > 0 else -self.limits.min_vx
        vx, duration = self._plan(distance, top)
        return self._move(vx=vx, duration=duration)

    def _sideways(self, distance: float) -> LocomotionCommand:
        vy, duration = self._plan(distance, self.limits.max_vy)
        return self._move(vy=vy, duration=duration)

    def _stop_then_done(self, sit: Situation) -> LocomotionCommand:
        return LocomotionCommand(Action.DONE if sit.last_action == Action.STOP.value else Action.STOP)

    def _search(self, sit: Situation) -> LocomotionCommand:
        if sit.turned >= math.radians(self.settings.give_up_deg):
            return self._stop_then_done(sit)
        return self._move(vyaw=self.limits.max_vyaw, duration=self.settings.search_s)

    def sees(self, obj: NamedPoint | None, pose: Pose) -> bool:
        """Whether ``obj`` is inside the view the expert trusts (the camera shows a little more)."""
        if obj is None:
            return False
        seen = relative(obj, pose)
        return abs(seen.bearing) <= self.settings.in_view_deg and seen.distance <= self.settings.view_range_m

    # ---- the policy -------------------------------------------------------------------------
    def command(self, sit: Situation) -> LocomotionCommand:
        """The next command for the situation."""
        s, intent, family = self.settings, sit.intent, sit.intent.family
        obj = _find(sit.scene, intent.target) if intent.target else None
        if family in (Family.GO_TO, Family.FACE, Family.FIND, Family.ABSENT):
            if family == Family.GO_TO and obj is not None and relative(obj, sit.pose).distance <= s.arrive_m:
                return LocomotionCommand(Action.DONE)
            if not self.sees(obj, sit.pose):
                return self._search(sit)
            seen = relative(obj, sit.pose)
            if family == Family.FIND or (family == Family.FACE and abs(seen.bearing) <= s.aim_deg):
                return LocomotionCommand(Action.DONE)
            bearing = math.radians(seen.bearing)
            if family == Family.FACE or abs(seen.bearing) > s.turn_first_deg:
                return self._turn(bearing)
            walk = self._forward(max(seen.distance - s.approach_m, 0.1))
            vyaw = max(-self.limits.max_vyaw, min(self.limits.max_vyaw, round(bearing / walk.duration, 1)))
            return self._move(vx=walk.vx, vyaw=vyaw, duration=walk.duration)
        if family == Family.BACK_AWAY:
            remaining = intent.amount + sit.forward  # forward is negative while backing away
            return LocomotionCommand(Action.DONE) if remaining <= s.distance_tol_m else self._forward(-remaining)
        if family == Family.WALK:
            remaining = intent.direction * intent.amount - sit.forward
            return LocomotionCommand(Action.DONE) if abs(remaining) <= s.distance_tol_m else self._forward(remaining)
        if family == Family.SIDESTEP:
            remaining = intent.direction * intent.amount - sit.left
            return LocomotionCommand(Action.DONE) if abs(remaining) <= s.distance_tol_m else self._sideways(remaining)
        if family == Family.TURN:
            remaining = math.radians(intent.direction * intent.amount) - sit.turned
            return LocomotionCommand(Action.DONE) if abs(math.degrees(remaining)) <= s.aim_deg else self._turn(remaining)
        if family == Family.POSTURE:
            return LocomotionCommand(Action.DONE if sit.last_action == intent.kind else Action(intent.kind))
        return self._stop_then_done(sit)  # STOP, REFUSE


def _find(scene: Scene, target: str) -> NamedPoint | None:
    """The scene object an intent names (``red ball``), as the describer's kind of object, or None."""
    for obj in scene.objects:
        if obj.name.removeprefix("the ") == target:
            return NamedPoint(target, obj.x, obj.y)
    return None
