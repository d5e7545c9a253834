"""Drafter node: hosts the draft model and serves the ``Instruct`` action.

For a goal it runs a closed loop, one verified command per step: take the latest camera frame,
turn it into a prompt (scene text for a text-only target, the JPEG itself for a VLM target),
decode speculatively against the verifier behind the bridge (``spec/*``), parse the verified text
into a command (the grammar guarantees it parses; the parser still refuses anything else), send it
to the motion node as a goal of its ``motion/execute`` action and wait for the result. It repeats
until the model says ``done``, the step limit is reached, or the goal is cancelled (cancel stops the
robot: the running motion goal is cancelled and STOP goes out on ``motion/command``).

One goal runs at a time. As in nav2, a new goal preempts the running one: the running goal stops
the robot and ends aborted with outcome PREEMPTED, then the new goal starts. A cancel, like a
preemption, is seen by the decoding loop on the next verdict (``should_stop``), so a goal ends
within one decoding round, not only between steps.

Only the model saying ``done`` is success: the result's ``outcome`` says how any other goal ended
(STEP_LIMIT, REFUSED, LINK_LOST, CANCELED, PREEMPTED, FAILED), and the goal is aborted (or
cancelled) with a reason in words.

When the verifier drains for a restart (code ``draining``), or the cloud link is lost, mid-step,
the robot is stopped and the step is decoded again from its start in a new session (on the same
verifier once it is back, or the bridge's next address), up to ``step_retries`` times with
jittered exponential back-off (``retry_backoff_s`` doubling up to ``retry_backoff_max_s``). A
step's command is executed only once the whole step is verified, so nothing of the step has run
when it is retried, and under greedy decoding the new session verifies the very same command.
When the retries are spent the goal ends LINK_LOST; with ``on_link_lost: draft_only`` the
step is finished on the draft alone, marked unverified, and executed only if
``execute_unverified`` allows it. Decoding runs in the action's execute callback, on a thread of
the multi-threaded executor, so the node keeps serving topics and cancel requests meanwhile.

Interfaces: action ``instruct`` (speculative_vlm_msgs/Instruct); action client of ``motion/execute``
(speculative_vlm_msgs/ExecuteCommand); subscribes the camera image, ``bridge/link`` and ``odom`` (the
prompt's progress line); publishes ``motion/command`` (STOP),
``drafter/text`` (verified text), ``drafter/prompt`` (the user message of each step),
``drafter/stats`` (DecodingStats) and ``/diagnostics``.
"""

from __future__ import annotations

import math
import sys
import threading
import time

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from speculative_vlm.commands.prompts import SYSTEM_PROMPT, Progress, user_message
from speculative_vlm.commands.scene_text import Pose, describe_image
from speculative_vlm.commands.schema import CommandError, parse_command
from speculative_vlm.decoding import placement
from speculative_vlm.decoding.loop import Cancelled, GenerationResult, SpeculativeDecoder
from speculative_vlm.decoding.models import load_model
from speculative_vlm.decoding.policy import AUTO, METHODS, AdaptiveLength, FixedLength
from speculative_vlm.decoding.retry import Backoff, retryable
from speculative_vlm.decoding.verifier import (
    EARLY_THRESHOLD,
    GenerationSettings,
    LinkLost,
    Refused,
    SessionRequest,
    VerifierError,
)
from speculative_vlm.nodes.command_messages import from_msg, to_msg
from speculative_vlm.nodes.image_conversion import image_to_numpy
from speculative_vlm.nodes.parameters import on_parameters_set, start_only
from speculative_vlm.nodes.ros_verifier import RosVerifier
from speculative_vlm.nodes.spin import spin_node
from speculative_vlm_msgs.action import ExecuteCommand, Instruct
from speculative_vlm_msgs.msg import DecodingStats, LocomotionCommand

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
PERCEPTIONS = ("scene_text", "image")
DRAFT_PERCEPTIONS = ("scene_text", "none")
LINK_POLICIES = ("stop", "draft_only")


Outcome = Instruct.Result
# How the bringup and the logs name each Instruct outcome.
OUTCOME_NAMES = {
    Outcome.SUCCEEDED: "succeeded", Outcome.STEP_LIMIT: "step limit", Outcome.REFUSED: "refused",
    Outcome.LINK_LOST: "link lost", Outcome.CANCELED: "cancelled", Outcome.PREEMPTED: "preempted",
    Outcome.FAILED: "failed",
}


def outcome_name(outcome: int) -> str:
    """``Instruct.Result.outcome`` in words ("step limit", "link lost", ...)."""
    return OUTCOME_NAMES.get(outcome, f"unknown outcome {outcome}")


class StepFailed(RuntimeError):
    """A step cannot go on; the goal ends with ``outcome`` and this reason, and the robot is stopped."""

    def __init__(self, reason: str, outcome: int = Outcome.FAILED):
        super().__init__(reason)
        self.outcome = outcome


class _GoalRun:
    """One accepted goal: its handle and, once a newer goal replaces it, why it must stop."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.preempted = threading.Event()
        self.preempt_reason = ""

    def preempt(self, reason: str) -> None:
        self.preempt_reason = reason
        self.preempted.set()

    def should_stop(self) -> bool:
        return self.handle.is_cancel_requested or self.preempted.is_set()


def _goal_key(handle) -> bytes:
    return bytes(handle.goal_id.uuid)


def _float(lo: float, hi: float, text: str) -> ParameterDescriptor:
    return ParameterDescriptor(description=text, floating_point_range=[FloatingPointRange(from_value=lo, to_value=hi)])


def _int(lo: int, hi: int, text: str, read_only: bool = False) -> ParameterDescriptor:
    return ParameterDescriptor(description=text, read_only=read_only,
                               integer_range=[IntegerRange(from_value=lo, to_value=hi, step=1)])


def stats_msg(result: GenerationResult, session_id: str = "", stamp: Time | None = None) -> DecodingStats:
    """The DecodingStats of one step; ``stamp`` (the drafter's clock) places it on a bag's timeline."""
    s = result.summary()
    return DecodingStats(
        header=Header(stamp=stamp or Time()),
        session_id=session_id, rounds=s["rounds"], drafted=s["drafted"], accepted=s["accepted"],
        generated=s["tokens"], forced=sum(r.forced for r in result.rounds) + result.prompt_forced,
        target_passes=result.target_passes, early_hits=s["early_hits"], early_misses=s["early_misses"],
        draft_length=result.rounds[-1].drafted if result.rounds else 0,
        acceptance_rate=float(s["acceptance"]), tokens_per_pass=float(s["tokens_per_target_pass"]),
        draft_time_s=float(s["draft_s"]), wait_time_s=float(s["wait_s"]), verify_time_s=float(s["verify_s"]),
        elapsed_s=float(s["wall_s"]), tokens_per_second=float(s["tokens_per_s"]),
    )


def total_stats(results: list[GenerationResult]) -> DecodingStats:
    """Totals over a goal's steps (rates recomputed from the sums)."""
    total = DecodingStats()
    for r in results:
        m = stats_msg(r)
        for f in ("rounds", "drafted", "accepted", "generated", "forced", "target_passes", "early_hits",
                  "early_misses"):
            setattr(total, f, getattr(total, f) + getattr(m, f))
        for f in ("draft_time_s", "wait_time_s", "verify_time_s", "elapsed_s"):
            setattr(total, f, getattr(total, f) + getattr(m, f))
    total.acceptance_rate = total.accepted / total.drafted if total.drafted else 0.0
    total.tokens_per_pass = total.generated / total.target_passes if total.target_passes else 0.0
    total.tokens_per_second = total.generated / total.elapsed_s if total.elapsed_s else 0.0
    return total


class DrafterNode(Node):
    def __init__(self, **kwargs) -> None:
        super().__init__("drafter", **kwargs)
        d = self.declare_parameter
        d("draft_model", "command-draft", ParameterDescriptor(read_only=True,
            description="draft model: a folder or a model-store name (the shipped draft is 'command-draft')"))
        d("draft_device", "cpu", start_only("where the draft model runs: cpu, cuda or cuda:N (a Jetson's GPU is cuda)"))
        d("draft_dtype", "float32", start_only("the draft model's dtype: float32, bfloat16 or float16"))
        d("perception", "scene_text", ParameterDescriptor(read_only=True,
            description=f"how a frame reaches the models, one of {PERCEPTIONS}: scene_text describes coloured "
            "objects in words (text-only target), image sends the JPEG (VLM target)"))
        d("draft_perception", "scene_text", ParameterDescriptor(read_only=True,
            description=f"what a text draft reads of the frame when perception is image, one of "
            f"{DRAFT_PERCEPTIONS}: scene_text describes it on the robot (the target still sees only the JPEG), "
            "none drafts from the instruction and progress alone"))
        d("system_prompt", "", ParameterDescriptor(description="system message; '' = the built-in command prompt"))
        d("grammar", "command", ParameterDescriptor(read_only=True, description="output grammar: 'command' or '' (none)"))
        d("draft_length", 4, _int(0, 16, "tokens per draft block (the start value when adaptive; under method "
          "auto, the first session's)"))
        d("adaptive_draft_length", True, ParameterDescriptor(
            description="adapt the draft length per round from acceptance, draft, verify and round-trip time"))
        d("preemptive", True, ParameterDescriptor(description="draft the next block on a confident early verdict"))
        d("pipelining", True, ParameterDescriptor(description="send preemptive blocks before the final verdict"))
        d("method", "speculative", ParameterDescriptor(
            description=f"how a step is decoded, one of {METHODS}: speculative (draft_length/adaptive_draft_length), "
            "cloud_ar (the verifier streams the target's own tokens) or auto (per step, speculation with the draft "
            "length the measured round trip, acceptance and timings call for, or cloud_ar when it is predicted "
            "faster); all lossless. Through the ROS bridge cloud_ar opens an AUTOREGRESSIVE session (spec/open mode) "
            "whose tokens come back as TOKEN verdicts on spec/verdict. Read at each step",
            additional_constraints=f"one of {', '.join(METHODS)}"))
        d("early_confidence", EARLY_THRESHOLD, _float(0.0, 1.0, "early-verdict confidence needed to draft preemptively"))
        d("max_new_tokens", 64, _int(1, 512, "token limit of one step's answer"))
        d("temperature", 0.0, _float(0.0, 2.0, "sampling temperature; 0 = greedy"))
        d("seed", 0, _int(0, 2**31 - 1, "sampling seed"))
        d("max_steps", 6, _int(1, 1000, "default step limit of a goal (the goal's max_steps wins when > 0)"))
        d("on_link_lost", "stop", ParameterDescriptor(read_only=True,
            description=f"when the cloud link is lost mid-step, one of {LINK_POLICIES}: stop the robot and end "
            "the goal, or finish the step on the draft alone (unverified)"))
        d("execute_unverified", False, ParameterDescriptor(read_only=True,
            description="execute a command the target never verified (draft_only fallback); off by default"))
        d("torch_threads", 0, _int(0, 256, "CPU threads for the draft model; 0 = torch's default (all cores). "
          "On a machine shared with the verifier, 1 avoids the two oversubscribing the cores", read_only=True))
        d("image_topic", "camera/image_raw", ParameterDescriptor(read_only=True, description="camera image topic"))
        d("frame_timeout_s", 5.0, _float(0.1, 60.0, "how long a step waits for a camera frame, s"))
        d("verdict_timeout_s", 10.0, _float(0.1, 600.0, "how long to wait for a verdict before the link counts as lost"))
        d("open_timeout_s", 30.0, _float(0.5, 600.0, "how long opening a session (prompt prefill on the target) may take, s"))
        d("motion_timeout_s", 3.0, _float(0.5, 60.0, "slack beyond a command's duration for the motion node's "
          "result, s"))
        d("step_retries", 5, _int(0, 100, "times a step is decoded again in a new session when the verifier drains "
          "(a restart) or the link is lost before the step's command ran; 0 = the goal ends LINK_LOST at once"))
        d("retry_backoff_s", 0.5, _float(0.0, 60.0, "wait before the first retry of a step, s; doubles each retry, "
          "jittered down by up to half so robots of one fleet spread out"))
        d("retry_backoff_max_s", 8.0, _float(0.0, 600.0, "longest wait between retries of a step, s"))
        d("progress_line", True, ParameterDescriptor(
            description="tell the model on every step how far the robot has moved and turned since the instruction "
            "(odometry from 'odom') and what its last command was, as the closed-loop evaluation does"))
        try:
            placement.parse(self.get_parameter("draft_device").value, self.get_parameter("draft_dtype").value)
        except placement.PlacementError as exc:
            raise ValueError(f"parameters draft_device/draft_dtype: {exc}") from None
        for name, allowed in (("perception", PERCEPTIONS), ("draft_perception", DRAFT_PERCEPTIONS),
                              ("on_link_lost", LINK_POLICIES)):
            if self.get_parameter(name).value not in allowed:
                raise ValueError(f"parameter {name}={self.get_parameter(name).value!r} is not one of {allowed}")

        self._group = ReentrantCallbackGroup()
        self._frame_lock = threading.Lock()
        self._frame: Image | None = None
        self._frame_event = threading.Event()
        self._link = "UNKNOWN"
        self._last_choice = ""  # the last step's method and why (diagnostics)
        self._goal_lock = threading.Lock()
        self._busy = False  # a goal is running
        self._active: _GoalRun | None = None  # the goal executing now
        self._next: _GoalRun | None = None  # accepted while another ran; starts when that one has ended
        self._runs: dict[bytes, _GoalRun] = {}  # accepted goals whose execute callback has not started
        self._steps_done = 0
        self._step_retries = 0  # steps decoded again after the verifier drained or the link dropped
        self._last_error = ""
        self._odom_lock = threading.Lock()
        self._pose: Pose | None = None  # latest odometry
        self._progress: Progress | None = None  # odometry since the running goal's instruction
        self._last_action = ""  # the running goal's last executed action

        self._cmd_pub = self.create_publisher(LocomotionCommand, "motion/command", 10)
        self._motion = ActionClient(self, ExecuteCommand, "motion/execute", callback_group=self._group)
        self._text_pub = self.create_publisher(String, "drafter/text", 10)
        self._prompt_pub = self.create_publisher(String, "drafter/prompt", 10)
        self._stats_pub = self.create_publisher(DecodingStats, "drafter/stats", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(Image, self.get_parameter("image_topic").value, self._on_image,
                                 qos_profile_sensor_data, callback_group=self._group)
        self.create_subscription(String, "bridge/link", self._on_link, LATCHED, callback_group=self._group)
        self.create_subscription(Odometry, "odom", self._on_odom, 10, callback_group=self._group)
        self.create_timer(1.0, self._publish_diagnostics)

        self._verifier = RosVerifier(self, service_timeout_s=self.get_parameter("open_timeout_s").value)
        self._decoder: SpeculativeDecoder | None = None
        self._decoder_lock = threading.Lock()
        problem = self._method_problem(self.get_parameter("method").value)
        if problem:
            raise ValueError(problem)
        self.add_on_set_parameters_callback(self._check_parameters)
        on_parameters_set(self, self._on_parameters_set)
        self._load_error: str = ""
        self._loaded = threading.Event()
        # Loading the draft takes a moment: off the constructor, goals wait for it.
        threading.Thread(target=self._load, name="drafter-load", daemon=True).start()
        self._action = ActionServer(
            self, Instruct, "instruct", execute_callback=self._execute, goal_callback=self._on_goal,
            handle_accepted_callback=self._on_accepted, cancel_callback=lambda _g: CancelResponse.ACCEPT,
            callback_group=self._group,
        )

    # -- set-up -----------------------------------------------------------------------------------
    def _load(self) -> None:
        p = self.get_parameter
        try:
            if p("torch_threads").value:
                import torch

                torch.set_num_threads(p("torch_threads").value)
            draft = load_model(p("draft_model").value, dtype=p("draft_dtype").value, device=p("draft_device").value)
            with self._decoder_lock:  # a parameter set meanwhile waits, then applies to this decoder
                self._decoder = SpeculativeDecoder(
                    draft, self._verifier, policy=self._draft_policy(), preempt=p("preemptive").value,
                    pipeline=p("pipelining").value, early_threshold=p("early_confidence").value,
                    verdict_timeout_s=p("verdict_timeout_s").value, method=p("method").value,
                )
            self.get_logger().info(f"draft model {p('draft_model').value!r} loaded ({draft.device}, "
                                   f"{p('draft_dtype').value})")
        except Exception as exc:  # reported on every goal and in diagnostics
            self._load_error = f"cannot load draft model {p('draft_model').value!r}: {exc}"
            self.get_logger().error(self._load_error)
        finally:
            self._loaded.set()

    def _draft_policy(self) -> AdaptiveLength | FixedLength:
        length = self.get_parameter("draft_length").value
        return AdaptiveLength(initial=max(1, length)) if self.get_parameter("adaptive_draft_length").value \
            else FixedLength(length)

    def _method_problem(self, method: object) -> str:
        """Why ``method`` cannot be used here ('' when it can)."""
        if method not in METHODS:
            return f"parameter method={method!r} is not one of {METHODS}"
        return ""

    def _check_parameters(self, params) -> SetParametersResult:
        for param in params:
            problem = self._method_problem(param.value) if param.name == "method" else ""
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _on_parameters_set(self, values: dict[str, object]) -> None:
        """Decoding settings set at run time apply from the decoder's next round (it reads them per round);
        the sampling settings, step limit and timeouts of a step are read when a step starts."""
        if "open_timeout_s" in values:
            self._verifier.service_timeout_s = values["open_timeout_s"]
        p = self.get_parameter
        with self._decoder_lock:
            decoder = self._decoder
            if decoder is None:
                return  # _load reads every parameter when it builds the decoder
            if "method" in values:
                decoder.method = values["method"]
            if "early_confidence" in values:
                decoder.early_threshold = values["early_confidence"]
            if "verdict_timeout_s" in values:
                decoder.verdict_timeout_s = values["verdict_timeout_s"]
            if "preemptive" in values or "pipelining" in values:
                decoder.preempt = p("preemptive").value
                decoder.pipeline = p("pipelining").value and decoder.preempt
            if "draft_length" in values or "adaptive_draft_length" in values:
                decoder.policy = self._draft_policy()

    # -- inputs -----------------------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        with self._frame_lock:
            self._frame = msg
        self._frame_event.set()

    def _on_link(self, msg: String) -> None:
        self._link = msg.data

    # -- the action -------------------------------------------------------------------------------
    def _on_odom(self, msg: Odometry) -> None:
        q = msg.pose.pose.orientation
        pose = Pose(msg.pose.pose.position.x, msg.pose.pose.position.y,
                    math.atan2(2 * (q.w * q.z + q.x * q.y), 1 - 2 * (q.y * q.y + q.z * q.z)))
        with self._odom_lock:
            self._pose = pose
            if self._progress is not None:
                self._progress.update(pose)  # every message, so turns are unwrapped

    def _start_progress(self) -> None:
        with self._odom_lock:
            self._progress = Progress(self._pose) if self._pose is not None else None
            self._last_action = ""
        if self._progress is None and self.get_parameter("progress_line").value:
            self.get_logger().warning("no odometry on 'odom' yet: the prompts of this goal carry no progress line")

    def _progress_text(self) -> str:
        if not self.get_parameter("progress_line").value:
            return ""
        with self._odom_lock:
            return self._progress.text(self._last_action) if self._progress is not None else ""

    def _on_goal(self, goal: Instruct.Goal) -> GoalResponse:
        if not goal.instruction.strip():
            self.get_logger().warning("refused a goal with an empty instruction")
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _on_accepted(self, handle) -> None:
        """Start the goal now, or preempt the running one and start this one once it has ended.

        The new goal does not wait inside its execute callback: that would hold a second executor
        thread while the old goal still needs the executor for its verdicts.
        """
        run = _GoalRun(handle)
        start: list[_GoalRun] = []
        with self._goal_lock:
            self._runs[_goal_key(handle)] = run
            if self._active is None:
                self._active, self._busy = run, True
                start.append(run)
            else:
                self.get_logger().info(f"a new goal ({handle.request.instruction!r}) preempts the running one")
                self._active.preempt(f"preempted by a newer goal ({handle.request.instruction!r}); "
                                     "the robot was stopped")
                if self._next is not None:  # never started: it runs only to end as PREEMPTED
                    self._next.preempt(f"preempted before it started by a newer goal ({handle.request.instruction!r})")
                    start.append(self._next)
                self._next = run
        for r in start:
            r.handle.execute()

    def _execute(self, handle) -> Instruct.Result:
        with self._goal_lock:
            run = self._runs.pop(_goal_key(handle))
        try:
            return self._run_goal(run)
        finally:
            with self._goal_lock:
                following = None
                if self._active is run:
                    self._active, self._next = self._next, None
                    following, self._busy = self._active, self._active is not None
            if following is not None:
                following.handle.execute()

    def _run_goal(self, run: _GoalRun) -> Instruct.Result:
        handle = run.handle
        goal: Instruct.Goal = handle.request
        result = Instruct.Result()
        max_steps = goal.max_steps or self.get_parameter("max_steps").value
        results: list[GenerationResult] = []

        def finish(outcome: int, reason: str) -> Instruct.Result:
            result.outcome, result.success = outcome, outcome == Outcome.SUCCEEDED
            result.reason, result.steps = reason, len(result.commands)
            result.stats = total_stats(results)
            if outcome == Outcome.SUCCEEDED:
                handle.succeed()
            elif outcome == Outcome.CANCELED:
                handle.canceled()
            else:
                handle.abort()
            self.get_logger().info(f"goal ended ({outcome_name(outcome)}): {reason}")
            return result

        def interrupted() -> Instruct.Result:
            self.stop_robot()
            if handle.is_cancel_requested:  # the client asked: CANCELED even if also preempted
                return finish(Outcome.CANCELED, "cancelled")
            return finish(Outcome.PREEMPTED, run.preempt_reason)

        while not self._loaded.wait(0.1):
            if run.should_stop():
                return interrupted()
        if self._decoder is None:
            return finish(Outcome.FAILED, self._load_error)
        self._start_progress()
        for step in range(1, max_steps + 1):
            if run.should_stop():
                return interrupted()
            try:
                command, gen = self._step(run, goal.instruction, step)
            except Cancelled as exc:
                results.append(exc.partial)  # the rounds it did count in the totals
                return interrupted()
            except StepFailed as exc:
                self.stop_robot()
                self._last_error = str(exc)
                return finish(exc.outcome, str(exc))
            results.append(gen)
            if command.action == LocomotionCommand.DONE:
                return finish(Outcome.SUCCEEDED, f"the model said done after {step - 1} commands")
            if not command.verified and not self.get_parameter("execute_unverified").value:
                self.stop_robot()
                return finish(Outcome.LINK_LOST, "cloud link lost: the step was finished on the draft alone and "
                              "its unverified command was not executed (execute_unverified is off)")
            result.commands.append(command)
            try:
                if not self._execute_command(run, command):
                    return interrupted()
            except StepFailed as exc:  # the motion node ended the command otherwise, or never answered
                self.stop_robot()
                self._last_error = str(exc)
                return finish(exc.outcome, str(exc))
            with self._odom_lock:
                self._last_action = from_msg(command).action.value
            self._steps_done += 1
        return finish(Outcome.STEP_LIMIT, f"step limit of {max_steps} commands reached before the model said done")

    def _latest_frame(self, run: _GoalRun) -> Image:
        with self._frame_lock:
            frame = self._frame
        if frame is None:
            timeout = self.get_parameter("frame_timeout_s").value
            deadline = time.monotonic() + timeout
            while not self._frame_event.wait(0.1):
                if run.should_stop():
                    raise Cancelled(GenerationResult(text="", token_ids=[], stop_reason="cancelled"))
                if time.monotonic() > deadline:
                    raise StepFailed(f"no camera frame on {self.get_parameter('image_topic').value} within "
                                     f"{timeout} s; is the camera node running?")
            with self._frame_lock:
                frame = self._frame
        return frame

    def request_for(self, instruction: str, frame: Image, progress: str = "") -> SessionRequest:
        """The session request of one step: the prompt from the frame (and the progress line), settings
        from parameters."""
        p = self.get_parameter
        bgr = _bgr(frame)
        image, draft_prompt = None, ""
        if p("perception").value == "image":
            import cv2

            ok, jpeg = cv2.imencode(".jpg", bgr)
            image = jpeg.tobytes() if ok else None
            scene = ""
            if p("draft_perception").value == "scene_text":
                draft_prompt = user_message(instruction, describe_image(bgr), progress)
        else:
            scene = describe_image(bgr)
        settings = GenerationSettings(
            temperature=p("temperature").value, max_new_tokens=p("max_new_tokens").value,
            grammar=p("grammar").value, seed=p("seed").value,
        )
        return SessionRequest(prompt=user_message(instruction, scene, progress),
                              system=p("system_prompt").value or SYSTEM_PROMPT,
                              image=image, settings=settings, draft_prompt=draft_prompt)

    def _step(self, run: _GoalRun, instruction: str, step: int) -> tuple[LocomotionCommand, GenerationResult]:
        """One step: decode a command for the latest frame. Raises Cancelled when the goal must stop."""
        handle = run.handle
        request = self.request_for(instruction, self._latest_frame(run), self._progress_text())
        self._prompt_pub.publish(String(data=request.prompt))
        feedback = Instruct.Feedback(step=step)

        def on_text(text: str) -> None:
            feedback.text = text
            self._text_pub.publish(String(data=text))
            handle.publish_feedback(feedback)

        p = self.get_parameter
        retries = p("step_retries").value
        ceiling = p("retry_backoff_max_s").value
        backoff = Backoff(min(p("retry_backoff_s").value, ceiling), ceiling)
        attempt = 0
        while True:
            try:
                gen = self._decoder.generate(request, on_text=on_text, should_stop=run.should_stop)
                break
            except Refused as exc:  # the prompt or a block was refused: drafting on alone would not help
                raise StepFailed(f"step {step}: the verifier refused ({exc}); the robot was stopped",
                                 Outcome.REFUSED) from exc
            except (LinkLost, VerifierError) as exc:
                self.stop_robot()  # first: nothing moves on unverified output
                # Nothing of this step has been executed (its command runs only once it is verified):
                # decode it again from its start, with the same prompt, in a new session.
                if retryable(exc) and attempt < retries:
                    attempt += 1
                    self._step_retries += 1
                    delay = backoff.delay(attempt)
                    self.get_logger().warning(f"step {step}: {exc}; the robot is stopped, decoding the step again in "
                                              f"a new session in {delay:.2f} s (retry {attempt} of {retries})")
                    self._wait_stopped(run, delay)
                    continue
                spent = f" ({attempt} of {retries} retries spent)" if attempt else ""
                if p("on_link_lost").value != "draft_only":
                    raise StepFailed(f"cloud link lost during step {step}{spent}: {exc}; the robot was stopped",
                                     Outcome.LINK_LOST) from exc
                self.get_logger().warning(f"link lost{spent} ({exc}); finishing step {step} on the draft alone")
                gen = self._decoder.generate_unverified(request, on_text=on_text, should_stop=run.should_stop)
                break
        try:
            command = parse_command(gen.text)
        except CommandError as exc:
            raise StepFailed(f"step {step}: model text {gen.text!r} is not a command ({exc}); not executed",
                             Outcome.REFUSED) from exc
        msg = to_msg(command, verified=gen.verified, text=gen.text, stamp=self.get_clock().now().to_msg())
        self._text_pub.publish(String(data=gen.text))
        stats = stats_msg(gen, stamp=self.get_clock().now().to_msg())
        self._last_choice = f"{gen.method}: {gen.choice}" if gen.choice else gen.method
        if self._decoder.method == AUTO:
            self.get_logger().info(f"step {step} decoded by {gen.choice}; {gen.wall_s:.2f} s")
        self._stats_pub.publish(stats)
        feedback.text, feedback.command, feedback.stats = gen.text, msg, stats
        handle.publish_feedback(feedback)
        return msg, gen

    def _wait_stopped(self, run: _GoalRun, seconds: float) -> None:
        """Wait ``seconds`` before a retry (the robot stands still); raises Cancelled if the goal must stop."""
        deadline = time.monotonic() + seconds
        while not run.should_stop():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(0.05, remaining))
        raise Cancelled(GenerationResult(text="", token_ids=[], stop_reason="cancelled"))

    def _execute_command(self, run: _GoalRun, command: LocomotionCommand) -> bool:
        """Run the command as a ``motion/execute`` goal and wait for its result; False when the goal was
        cancelled or preempted meanwhile (the motion goal is then cancelled)."""
        deadline = time.monotonic() + command.duration + self.get_parameter("motion_timeout_s").value
        late = (f"the motion node did not finish the command within {command.duration:.1f} s "
                "+ motion_timeout_s; is it running and active?")
        while not self._motion.server_is_ready():
            if run.should_stop():
                return False
            if time.monotonic() > deadline:
                raise StepFailed(late)
            time.sleep(0.05)
        handle = _wait_future(self._motion.send_goal_async(ExecuteCommand.Goal(command=command)), run, deadline)
        if handle is None:
            return False
        if handle is _LATE or not handle.accepted:
            raise StepFailed(late if handle is _LATE else "the motion node refused the command's goal")
        response = _wait_future(handle.get_result_async(), run, deadline)
        if response is None or response is _LATE:
            handle.cancel_goal_async()  # stop it: the goal is over, or the motion node is not answering
            if response is None:
                return False
            raise StepFailed(late)
        result: ExecuteCommand.Result = response.result
        if result.outcome == ExecuteCommand.Result.COMPLETED:
            return True
        if result.outcome == ExecuteCommand.Result.FAILED:
            # Sent, but the robot refused it (a posture it cannot take from where it is): the next
            # step sees where the robot is and decides again.
            self.get_logger().warning(f"the robot did not execute {command.text!r}: {result.reason}")
            return True
        raise StepFailed(f"the motion node ended the command {MOTION_OUTCOMES.get(result.outcome, result.outcome)}: "
                         f"{result.reason}; the robot was stopped")

    def stop_robot(self) -> None:
        self._cmd_pub.publish(LocomotionCommand(action=LocomotionCommand.STOP, verified=True,
                                                header=_stamped(self)))

    def _publish_diagnostics(self) -> None:
        if self._load_error:
            level, message = DiagnosticStatus.ERROR, self._load_error
        elif not self._loaded.is_set():
            level, message = DiagnosticStatus.WARN, "loading the draft model"
        else:
            level, message = DiagnosticStatus.OK, "busy" if self._busy else "ready"
        status = DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: drafting", message=message,
                                  hardware_id=self.get_parameter("draft_model").value,
                                  values=[KeyValue(key="link", value=self._link),
                                          KeyValue(key="method", value=self._last_choice),
                                          KeyValue(key="steps_done", value=str(self._steps_done)),
                                          KeyValue(key="step_retries", value=str(self._step_retries)),
                                          KeyValue(key="last_error", value=self._last_error)])
        self._diag_pub.publish(DiagnosticArray(header=_stamped(self), status=[status]))

    def destroy_node(self) -> None:
        # A constructor that refused its parameters leaves no action server, but the node is
        # registered with the context, which destroys it at shutdown.
        if hasattr(self, "_action"):
            self._action.destroy()
        if hasattr(self, "_motion"):
            self._motion.destroy()
        super().destroy_node()


# How a motion/execute goal that did not complete ended, for the reason a goal ends with.
MOTION_OUTCOMES = {
    ExecuteCommand.Result.CANCELED: "cancelled", ExecuteCommand.Result.PREEMPTED: "preempted",
    ExecuteCommand.Result.ESTOPPED: "e-stopped", ExecuteCommand.Result.STOPPED: "stopped",
    ExecuteCommand.Result.REJECTED: "rejected", ExecuteCommand.Result.FAILED: "failed",
}
_LATE = object()  # what _wait_future returns when the deadline passed


def _wait_future(future, run: _GoalRun, deadline: float):
    """The future's result once it is done (the executor completes it on another thread); None when the
    goal must stop first, ``_LATE`` when ``deadline`` (monotonic) passes first."""
    done = threading.Event()
    future.add_done_callback(lambda _f: done.set())
    while not done.wait(0.05):
        if run.should_stop():
            return None
        if time.monotonic() > deadline:
            return _LATE
    return future.result()


def _bgr(frame: Image):
    import cv2

    array = image_to_numpy(frame)
    if frame.encoding == "rgb8":
        return cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if frame.encoding == "mono8":
        return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    return array


def _stamped(node: Node):
    from std_msgs.msg import Header

    return Header(stamp=node.get_clock().now().to_msg())


def main(args: list[str] | None = None) -> int:
    return spin_node(DrafterNode, args, before_destroy=lambda n: n.stop_robot())


if __name__ == "__main__":
    sys.exit(main())
