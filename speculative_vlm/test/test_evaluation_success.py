"""Each family's success rule, judged on hand-made trajectories (no simulation)."""

from __future__ import annotations

import math

from speculative_vlm.commands.scene_text import Pose
from speculative_vlm.commands.schema import Action, LocomotionCommand
from speculative_vlm.evaluation.episodes import Episode
from speculative_vlm.evaluation.families import Family, Intent
from speculative_vlm.evaluation.runner import EpisodeResult, StepRecord
from speculative_vlm.evaluation.success import judge
from speculative_vlm.go2.scene import Scene, SceneObject
from speculative_vlm.go2.sim_model import Mode

BALL = SceneObject("the red ball", "ball", (220, 30, 30), 3.0, 0.0, 0.2)


def outcome(intent: Intent, final=(0.0, 0.0, 0.0), ended="done", forward=0.0, left=0.0, turned_deg=0.0,
            max_offset=0.0, mode=Mode.BALANCE_STAND, start_mode=Mode.BALANCE_STAND, actions=("done",),
            objects=(BALL,)) -> tuple[bool, str]:
    """Judge a made-up episode that started at the origin facing +x and ended as told."""
    episode = Episode("t-0", "train", "scatter", intent, "an instruction", Scene(objects=tuple(objects)),
                      start_mode, 8)
    steps = [StepRecord(i + 1, Pose(), start_mode, "", "", "", LocomotionCommand(Action(a)), None, Pose(),
                        start_mode) for i, a in enumerate(actions)]
    result = EpisodeResult(episode, "hand", steps, ended, final=Pose(*final), final_mode=mode, forward=forward,
                           left=left, turned=math.radians(turned_deg), max_offset=max_offset)
    return judge(result)


GO = Intent(Family.GO_TO, target="red ball")


def test_go_to_succeeds_within_arrival_distance_when_done():
    assert outcome(GO, final=(2.45, 0.0, 0.0), max_offset=2.45)[0]


def test_go_to_fails_when_too_far():
    ok, why = outcome(GO, final=(2.3, 0.0, 0.0), max_offset=2.3)
    assert not ok and "0.70 m" in why


def test_go_to_fails_without_done_even_at_the_object():
    ok, why = outcome(GO, final=(2.8, 0.0, 0.0), ended="step_limit")
    assert not ok and "step_limit" in why


def test_face_needs_the_object_within_15_degrees_and_no_walking():
    face = Intent(Family.FACE, target="red ball")
    assert outcome(face, final=(0.0, 0.0, math.radians(10)))[0]
    assert not outcome(face, final=(0.0, 0.0, math.radians(20)))[0]
    assert not outcome(face, final=(0.0, 0.0, 0.0), max_offset=0.5)[0]


def test_back_away_needs_the_distance_to_grow_enough():
    back = Intent(Family.BACK_AWAY, target="red ball", amount=1.0)
    assert outcome(back, final=(-0.9, 0.0, 0.0), forward=-0.9, max_offset=0.9)[0]
    assert not outcome(back, final=(-0.5, 0.0, 0.0), forward=-0.5, max_offset=0.5)[0]
    assert not outcome(back, final=(1.0, 0.0, 0.0), forward=1.0, max_offset=1.0)[0]  # walked towards it


def test_walk_is_judged_along_the_start_heading_within_a_quarter_metre():
    walk = Intent(Family.WALK, direction=-1, amount=2.0)
    assert outcome(walk, forward=-1.8, max_offset=1.8)[0]
    assert not outcome(walk, forward=-1.7, max_offset=1.7)[0]
    assert not outcome(walk, forward=2.0, max_offset=2.0)[0]  # the wrong way
    assert not outcome(walk, forward=-2.0, left=0.3, max_offset=2.0)[0]  # drifted sideways


def test_turn_counts_unwrapped_degrees_the_asked_way():
    left = Intent(Family.TURN, direction=1, amount=90.0)
    assert outcome(left, turned_deg=80)[0]
    assert not outcome(left, turned_deg=-90)[0]
    assert not outcome(Intent(Family.TURN, direction=1, amount=180.0), turned_deg=-180)[0]
    assert outcome(Intent(Family.TURN, direction=-1, amount=180.0), turned_deg=-175)[0]
    assert not outcome(left, turned_deg=90, max_offset=0.4)[0]


def test_sidestep_is_sideways_only():
    step = Intent(Family.SIDESTEP, direction=1, amount=0.5)
    assert outcome(step, left=0.4, max_offset=0.4)[0]
    assert not outcome(step, left=-0.5, max_offset=0.5)[0]
    assert not outcome(step, left=0.5, forward=0.3, max_offset=0.6)[0]
    assert not outcome(step, left=0.5, turned_deg=30, max_offset=0.5)[0]


def test_posture_needs_the_asked_mode():
    assert outcome(Intent(Family.POSTURE, kind="sit"), mode=Mode.SIT, actions=("sit", "done"))[0]
    assert not outcome(Intent(Family.POSTURE, kind="sit"), mode=Mode.LIE_DOWN, actions=("stand_down", "done"))[0]
    stand = Intent(Family.POSTURE, kind="stand_up")
    assert outcome(stand, mode=Mode.BALANCE_STAND, start_mode=Mode.LIE_DOWN, actions=("stand_up", "done"))[0]
    assert not outcome(stand, mode=Mode.LIE_DOWN, start_mode=Mode.LIE_DOWN)[0]


def test_stop_allows_only_stop_before_done_and_no_motion():
    stop = Intent(Family.STOP)
    assert outcome(stop, actions=("stop", "done"))[0]
    assert outcome(stop, actions=("done",))[0]
    assert not outcome(stop, actions=("move", "done"), turned_deg=0.0)[0]
    assert not outcome(stop, actions=("stop", "done"), max_offset=0.2)[0]


def test_find_needs_the_object_in_view_and_no_walking():
    find = Intent(Family.FIND, target="red ball")
    assert outcome(find, final=(0.0, 0.0, math.radians(30)), turned_deg=30)[0]
    assert not outcome(find, final=(0.0, 0.0, math.radians(60)), turned_deg=60)[0]
    assert not outcome(find, final=(1.0, 0.0, 0.0), max_offset=1.0)[0]


def test_absent_object_allows_looking_around_but_not_wandering():
    absent = Intent(Family.ABSENT, target="blue cone")
    assert outcome(absent, turned_deg=300, actions=("move", "stop", "done"))[0]
    assert not outcome(absent, max_offset=1.0)[0]
    assert not outcome(absent, ended="step_limit", turned_deg=400)[0]


def test_must_not_act_means_no_motion_whatever_the_ending():
    refuse = Intent(Family.REFUSE, kind="unsafe")
    assert outcome(refuse, ended="step_limit", actions=("stop", "stop"))[0]
    assert outcome(refuse, ended="refused", actions=())[0]
    assert not outcome(refuse, max_offset=0.1)[0]
    assert not outcome(refuse, turned_deg=10)[0]
    assert not outcome(refuse, mode=Mode.SIT)[0]


def move(vx=0.0, vy=0.0, vyaw=0.0) -> LocomotionCommand:
    return LocomotionCommand(Action.MOVE, vx, vy, vyaw, 1.0)


def test_direction_correctness_needs_the_same_action_and_signs():
    from speculative_vlm.evaluation.single_step import direction_correct

    assert direction_correct(move(vyaw=0.8), move(vyaw=0.3), Family.TURN)
    assert not direction_correct(move(vyaw=0.8), move(vyaw=-0.8), Family.TURN)
    assert not direction_correct(move(vyaw=0.8), move(vx=0.5, vyaw=0.8), Family.TURN)  # walked while turning
    assert not direction_correct(move(vx=-0.3), move(vx=0.5), Family.WALK)
    assert not direction_correct(LocomotionCommand(Action.SIT), LocomotionCommand(Action.STAND_DOWN), Family.POSTURE)
    assert direction_correct(LocomotionCommand(Action.DONE), LocomotionCommand(Action.DONE), Family.GO_TO)
    assert not direction_correct(move(vx=0.5), None, Family.GO_TO)


def test_turning_while_walking_towards_the_object_counts_as_right_for_go_to_only():
    from speculative_vlm.evaluation.single_step import direction_correct

    assert direction_correct(move(vyaw=0.7), move(vx=0.4, vyaw=0.7), Family.GO_TO)
    assert not direction_correct(move(vyaw=0.7), move(vx=0.4, vyaw=0.7), Family.FACE)
    assert not direction_correct(move(vyaw=0.7), move(vx=-0.3, vyaw=0.7), Family.GO_TO)


def test_main_axis_correctness_asks_only_for_the_sign_of_the_experts_main_axis():
    from speculative_vlm.evaluation.single_step import main_axis_correct

    assert main_axis_correct(move(vyaw=0.8), move(vx=0.5, vy=0.5, vyaw=0.5))
    assert not main_axis_correct(move(vyaw=0.8), move(vx=0.5, vyaw=-0.5))
    assert main_axis_correct(move(vx=0.8, vyaw=0.1), move(vx=0.2, vyaw=-1.0))
    assert not main_axis_correct(move(vx=0.8), LocomotionCommand(Action.STOP))
