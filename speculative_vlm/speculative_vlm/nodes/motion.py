"""The motion node: LocomotionCommands (an action or a topic) and cmd_vel -> Go2 sport requests, safely.

A lifecycle node (configure connects to the robot, activate starts the Move stream) and a thin
shell around :class:`~speculative_vlm.go2.move_stream.MoveStream`, the plain class that holds the
safety rules and is unit-tested with a fake clock (``test_motion_stream.py``):
- every velocity is clamped to the ``max_*``/``min_vx`` parameters, every duration to
  ``max_duration_s``; each may only tighten the command schema's bound (``go2/motion_rules.py``);
- Move is re-sent at ``move_rate_hz`` (the Go2 stops 1-2 s after the last Move) from a
  dedicated thread on the steady clock, so executor load cannot starve it;
- StopMove is sent when a command's duration ends, when cmd_vel goes stale
  (``stale_timeout_s``), on e-stop, on cancel, on deactivate and on shutdown;
- with ``require_verified`` (default) only commands the target verified are executed;
- the e-stop latches: ``motion/estop`` (std_msgs/Bool, True engages) or the
  ``motion/engage_estop`` service engage it; only the ``motion/release_estop`` service
  releases it, and while it is engaged nothing reaches the robot but StopMove.

Interfaces (relative names, so a namespace applies):
  action      motion/execute (speculative_vlm_msgs/ExecuteCommand): a command as a goal; feedback
              is its progress and the velocity streamed, the result how it ended (COMPLETED,
              CANCELED, PREEMPTED, ESTOPPED, STOPPED, REJECTED, FAILED) with a reason. One command
              runs at a time: a newer goal, motion/command or cmd_vel preempts it.
  subscribes  motion/command (speculative_vlm_msgs/LocomotionCommand, for publishers that need no
              result), cmd_vel (geometry_msgs/Twist), motion/estop (std_msgs/Bool, any QoS: see ESTOP_QOS)
  publishes   odom (nav_msgs/Odometry, from rt/sportmodestate), /diagnostics,
              motion/idle (std_msgs/Bool, transient local): True when nothing is executing,
              motion/active_command (LocomotionCommand, transient local): the command being
              executed, clamped, with the header stamp of the command it came from,
              motion/estop_engaged (std_msgs/Bool, transient local)
  services    motion/engage_estop, motion/release_estop (std_srvs/Trigger)
TF: the odom -> base_link transform goes on ``tf`` (relative, so remappable and namespaced;
tf2_msgs/TFMessage) when tf2_msgs is installed, as on every ROS 2 install; it is not on PyPI, so
where the PyPI wheels stand in for ROS the pose is on ``odom`` only (``publish_tf`` turns it off
anywhere). Odometry carries the covariances of ``pose_covariance_diagonal`` and
``twist_covariance_diagonal``, so a fusion node (robot_localization) can weigh it.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Twist
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Bool
from std_srvs.srv import Trigger

from speculative_vlm.go2.dds import MAX_DOMAIN_ID, DdsDomainError
from speculative_vlm.go2.motion_rules import LIMIT_RANGES, MotionLimits
from speculative_vlm.go2.move_stream import Execution, MoveStream, Outcome, needs_verification
from speculative_vlm.go2.sdk_backend import RobotState, SportBackend, code_name
from speculative_vlm.nodes.command_messages import UnknownActionError, from_msg
from speculative_vlm.nodes.frames import TF_TOPIC, TFMessage, odom_transform
from speculative_vlm.nodes.parameters import (
    float_range,
    int_range,
    on_parameters_set,
    set_timer_period,
    start_only,
)
from speculative_vlm.nodes.spin import spin_node
from speculative_vlm_msgs.action import ExecuteCommand
from speculative_vlm_msgs.msg import LocomotionCommand

try:  # rclpy >= 7 (Iron)
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # pragma: no cover - Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
# The e-stop must hear every publisher, and a subscription only matches publishers whose QoS
# offers at least what it requests: transient local (an e-stop latched before this node
# started), volatile reliable (the default QoS: teleop, Foxglove's Publish panel, most user code)
# and best effort (sensor-style publishers). One subscription per profile; a publisher matching
# several delivers its message more than once, and engaging an engaged e-stop is harmless.
ESTOP_QOS = (
    LATCHED,
    QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE),
    QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE),
)


# Defaults of pose/twist_covariance_diagonal (x, y, z, roll, pitch, yaw): rough figures for leg
# odometry with an IMU, to be tuned for a robot; never zero, which a filter reads as certainty.
POSE_VARIANCES = (0.01, 0.01, 0.01, 0.001, 0.001, 0.01)
TWIST_VARIANCES = (0.01, 0.01, 0.01, 0.005, 0.005, 0.01)


def odometry_from_state(state: RobotState, stamp, odom_frame: str, base_frame: str,
                        pose_variances: Sequence[float], twist_variances: Sequence[float]) -> Odometry:
    """Odometry of one rt/sportmodestate: pose in ``odom_frame``, body-frame twist, diagonal covariances."""
    msg = Odometry(child_frame_id=base_frame)
    msg.header.stamp, msg.header.frame_id = stamp, odom_frame
    msg.pose.pose.position.x, msg.pose.pose.position.y, msg.pose.pose.position.z = state.x, state.y, state.z
    q = msg.pose.pose.orientation
    q.w, q.x, q.y, q.z = state.quaternion_wxyz
    msg.twist.twist.linear.x, msg.twist.twist.linear.y = state.vx_body, state.vy_body
    msg.twist.twist.angular.z = state.yaw_rate
    msg.pose.covariance = _diagonal(pose_variances)
    msg.twist.covariance = _diagonal(twist_variances)
    return msg


def _covariance_problem(name: str, values) -> str | None:
    if name not in ("pose_covariance_diagonal", "twist_covariance_diagonal"):
        return None
    values = list(values)
    if len(values) != 6 or not all(isinstance(v, float) and math.isfinite(v) and v >= 0.0 for v in values):
        return f"{name} needs 6 finite variances >= 0 (x, y, z, roll, pitch, yaw), got {values}"
    return None


def _diagonal(variances: Sequence[float]) -> list[float]:
    matrix = [0.0] * 36
    for i, v in enumerate(variances):
        matrix[7 * i] = float(v)
    return matrix


# What each limit parameter is, in words (its default and range come from motion_rules).
LIMIT_DESCRIPTIONS = {
    "max_vx": "Largest forward velocity sent to the robot, m/s",
    "min_vx": "Most negative (backward) velocity sent to the robot, m/s",
    "max_vy": "Largest lateral speed (either side) sent to the robot, m/s",
    "max_vyaw": "Largest yaw rate (either way) sent to the robot, rad/s",
    "max_duration_s": "Longest a single LocomotionCommand MOVE may run, s",
}
# How often a running motion/execute goal publishes feedback, and how often it looks for a cancel.
FEEDBACK_PERIOD_S = 0.1
CANCEL_POLL_S = 0.02


class MotionNode(LifecycleNode):
    """Lifecycle node driving a Go2 (real or simulated) through unitree_sdk2py's SportClient.

    A thin shell around :class:`~speculative_vlm.go2.move_stream.MoveStream`, which holds every
    safety rule: this node turns messages, services and goals into its inputs, runs its Move thread
    while active, and publishes what it does (odometry, idle, the active command, diagnostics).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("motion", **kwargs)
        d = self.declare_parameter
        d("network_interface", "lo", start_only(
            "Network interface for the Go2's DDS traffic: 'lo' for the simulated Go2, "
            "the NIC wired to the robot (e.g. eth0, enp3s0) for a real one"))
        d("dds_domain_id", 0, int_range(0, MAX_DOMAIN_ID, "DDS domain of the robot (the Go2 uses 0)", read_only=True))
        d("sdk_timeout_s", 0.5, float_range(0.05, 5.0, "Timeout of one SDK request (reply wait, send wait)",
                                            read_only=True))
        d("move_rate_hz", 25.0, float_range(5.0, 50.0, "Rate at which Move is re-sent while moving (Go2 needs 20-30 Hz)"))
        d("stale_timeout_s", 0.5, float_range(0.05, 5.0, "cmd_vel older than this (steady clock) stops the robot"))
        defaults = MotionLimits()
        for name, text in LIMIT_DESCRIPTIONS.items():
            lo, hi = LIMIT_RANGES[name]
            d(name, getattr(defaults, name), float_range(
                lo, hi, f"{text}; at most the command schema's bound, so a value may only tighten it"))
        d("state_timeout_s", 0.5, float_range(0.05, 10.0, "rt/sportmodestate older than this means the robot is lost"))
        d("diagnostics_period_s", 1.0, float_range(0.1, 10.0, "Period of /diagnostics messages, s"))
        d("odom_frame", "odom", start_only("frame_id of published odometry"))
        d("base_frame", "base_link", start_only("child_frame_id of published odometry"))
        d("require_verified", True, start_only(
            "Refuse LocomotionCommands that move the robot unless the target model verified "
            "their text (STOP is always accepted; cmd_vel, a teleoperation input, is not affected). "
            "A safety policy: fixed at start, never a parameter set away on a running robot"))
        d("publish_tf", True, start_only(
            "Also publish odom -> base_link on tf (needs tf2_msgs, part of every ROS 2 install)"))
        d("pose_covariance_diagonal", list(POSE_VARIANCES), ParameterDescriptor(
            description="Variances of the odometry pose (x, y, z m^2; roll, pitch, yaw rad^2): the Go2's "
            "leg odometry drifts in position and yaw, its IMU holds roll and pitch"))
        d("twist_covariance_diagonal", list(TWIST_VARIANCES), ParameterDescriptor(
            description="Variances of the odometry twist (vx, vy, vz (m/s)^2; roll, pitch, yaw rate (rad/s)^2)"))
        d("autostart", False, start_only(
            "Configure and activate right after start (for bringups without a lifecycle manager)"))

        self.stream: MoveStream | None = None  # the safety core; made by configure, kept across cleanup
        self._stop_loop = threading.Event()
        self._loop: threading.Thread | None = None
        self._backend: SportBackend | None = None
        self._idle: bool | None = None
        self._goal_executions: dict[bytes, Execution | None] = {}  # motion/execute goals by goal id
        # What configure creates and cleanup destroys. Not named _services/_timers: those are
        # rclpy.Node's own lists, and replacing them dropped the node's parameter services.
        self._subs: list = []
        self._estop_services: list = []
        self._action: ActionServer | None = None
        self._diag_timer = None
        self._odom_pub = self._idle_pub = self._active_pub = self._estop_pub = self._diag_pub = None
        self._tf_pub = None
        self._autostart_timer = None
        for name in ("pose_covariance_diagonal", "twist_covariance_diagonal"):
            problem = _covariance_problem(name, self.get_parameter(name).value)
            if problem:
                raise ValueError(problem)
        self.add_on_set_parameters_callback(self._check_parameters)
        on_parameters_set(self, self._on_parameters_set)
        if self.get_parameter("autostart").value:
            self._autostart_timer = self.create_timer(0.01, self._autostart)

    def _check_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for param in params:
            problem = _covariance_problem(param.name, param.value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        return SetParametersResult(successful=True)

    def _on_parameters_set(self, values: dict[str, object]) -> None:
        # Limits, rate and staleness apply from the stream's next command or tick.
        if "diagnostics_period_s" in values:
            set_timer_period(self._diag_timer, values["diagnostics_period_s"])
        stream = self.stream
        if stream is None:
            return  # configure builds the stream from the parameters
        if LIMIT_RANGES.keys() & values.keys():
            stream.limits = self._limits()
        if "move_rate_hz" in values:
            stream.move_rate_hz = values["move_rate_hz"]
        if "stale_timeout_s" in values:
            stream.stale_timeout_s = values["stale_timeout_s"]

    # ---- lifecycle ----------------------------------------------------------------
    @property
    def lifecycle_state(self) -> str:
        """Label of the current lifecycle state: unconfigured, inactive, active, finalized, or a transition."""
        return self._state_machine.current_state[1]

    def _autostart(self) -> None:
        self._autostart_timer.cancel()
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        p = self._params()
        try:
            self._backend = SportBackend(p["dds_domain_id"], p["network_interface"], p["sdk_timeout_s"], self._on_state)
        except DdsDomainError as exc:
            self.get_logger().error(f"cannot connect to the Go2: {exc}")
            return TransitionCallbackReturn.FAILURE
        previous = self.stream
        self.stream = MoveStream(
            self._backend, time.monotonic, limits=self._limits(), move_rate_hz=p["move_rate_hz"],
            stale_timeout_s=p["stale_timeout_s"], require_verified=self.get_parameter("require_verified").value,
            on_idle=self._set_idle, on_request_error=self._on_request_error, describe_code=code_name,
        )
        if previous is not None and previous.estop_engaged:  # the e-stop latches across a reconfigure
            self.stream.engage_estop("an e-stop engaged before the node was configured again")
        self._odom_pub = self.create_lifecycle_publisher(Odometry, "odom", 10)
        if TFMessage is not None and self.get_parameter("publish_tf").value:
            self._tf_pub = self.create_lifecycle_publisher(TFMessage, TF_TOPIC, 10)
        self._idle_pub = self.create_publisher(Bool, "motion/idle", LATCHED)
        self._active_pub = self.create_publisher(LocomotionCommand, "motion/active_command", LATCHED)
        self._estop_pub = self.create_publisher(Bool, "motion/estop_engaged", LATCHED)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._subs = [
            self.create_subscription(LocomotionCommand, "motion/command", self._on_command, 10),
            self.create_subscription(Twist, "cmd_vel", self._on_cmd_vel, 10),
        ]
        # A publisher the stricter profiles cannot match is heard by a looser one: no warning for it.
        quiet = SubscriptionEventCallbacks(incompatible_qos=lambda _event: None)
        self._subs += [
            self.create_subscription(Bool, "motion/estop", self._on_estop_topic, qos, event_callbacks=quiet)
            for qos in ESTOP_QOS
        ]
        self._estop_services = [
            self.create_service(Trigger, "motion/engage_estop", self._on_engage_srv),
            self.create_service(Trigger, "motion/release_estop", self._on_release_srv),
        ]
        # A goal holds no executor thread while its command runs (in a one-process graph the pool is
        # a few threads, which the drafter's goal and the verdicts need): a thread of its own follows
        # it, and the execute callback only reports the end (see _follow_goal).
        self._action = ActionServer(
            self, ExecuteCommand, "motion/execute", execute_callback=self._end_goal,
            handle_accepted_callback=self._on_goal_accepted, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            callback_group=ReentrantCallbackGroup(),
        )
        self._diag_timer = self.create_timer(p["diagnostics_period_s"], self._publish_diagnostics)
        self._estop_pub.publish(Bool(data=self.stream.estop_engaged))
        self._set_idle(True)
        self.get_logger().info(
            f"connected to Go2 SDK on DDS domain {p['dds_domain_id']} via {p['network_interface']!r}"
        )
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_loop.clear()
        self.stream.activate()
        self._loop = threading.Thread(target=self.stream.run, args=(self._stop_loop,), name="motion_move_stream",
                                      daemon=True)
        self._loop.start()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.halt()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.halt()
        self._release_interfaces()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.halt()
        self._release_interfaces()
        return super().on_shutdown(state)

    def halt(self) -> None:
        """Stop streaming and send StopMove (synchronously); safe to call any time, repeatedly."""
        self._stop_loop.set()
        stream = self.stream
        if stream is not None:
            stream.wake()
        if self._loop is not None and self._loop is not threading.current_thread():
            self._loop.join(timeout=5.0)
        self._loop = None
        if stream is not None and self._backend is not None:
            stream.halt("the motion node stopped (deactivated or shut down)")
        self._set_idle(True)

    def _release_interfaces(self) -> None:
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
        if self._action is not None:
            self._action.destroy()
        for sub in self._subs:
            self.destroy_subscription(sub)
        for srv in self._estop_services:
            self.destroy_service(srv)
        pubs = (self._odom_pub, self._idle_pub, self._active_pub, self._estop_pub, self._diag_pub, self._tf_pub)
        self._odom_pub = self._idle_pub = self._active_pub = self._estop_pub = self._diag_pub = self._tf_pub = None
        for pub in pubs:
            if pub is not None:
                self.destroy_publisher(pub)
        self._subs, self._estop_services, self._diag_timer, self._action = [], [], None, None
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _params(self) -> dict:
        names = (
            "network_interface", "dds_domain_id", "sdk_timeout_s", "move_rate_hz", "stale_timeout_s",
            *LIMIT_RANGES, "state_timeout_s", "diagnostics_period_s", "odom_frame", "base_frame",
        )
        return {n: self.get_parameter(n).value for n in names}

    def _limits(self) -> MotionLimits:
        return MotionLimits.from_params(self._params())

    # ---- inputs -------------------------------------------------------------------
    def _submit(self, msg: LocomotionCommand, source: str) -> Execution:
        """Hand a command to the stream; echo it (clamped) on motion/active_command when it is accepted."""
        stream = self.stream
        try:
            command = from_msg(msg)
        except UnknownActionError as exc:
            self.get_logger().error(f"LocomotionCommand refused: {exc}")
            return stream.refuse(str(exc))
        execution = stream.execute(command, msg.verified, source)
        if execution.outcome == Outcome.REJECTED:
            self.get_logger().warning(f"LocomotionCommand refused ({execution.reason}): {msg.text!r}",
                                      throttle_duration_sec=1.0)
            return execution
        if not msg.verified and needs_verification(command):
            self.get_logger().warning(f"executing an UNVERIFIED command: {msg.text!r}")
        self._active_pub.publish(self._echo(msg, execution))
        return execution

    @staticmethod
    def _echo(msg: LocomotionCommand, execution: Execution) -> LocomotionCommand:
        """The command as executed (clamped), with the header, verified flag and text of ``msg``."""
        executed = execution.command
        return LocomotionCommand(header=msg.header, action=msg.action, verified=msg.verified, text=msg.text,
                                 vx=executed.vx, vy=executed.vy, vyaw=executed.vyaw, duration=executed.duration)

    def _on_command(self, msg: LocomotionCommand) -> None:
        self._submit(msg, "a motion/command message")

    def _on_cmd_vel(self, msg: Twist) -> None:
        refusal = self.stream.cmd_vel(msg.linear.x, msg.linear.y, msg.angular.z)
        if refusal:
            self.get_logger().warning(f"cmd_vel refused: {refusal}", throttle_duration_sec=1.0)

    def _on_goal_accepted(self, handle: ServerGoalHandle) -> None:
        self._goal_executions[bytes(handle.goal_id.uuid)] = None
        threading.Thread(target=self._follow_goal, args=(handle,), name="motion_goal", daemon=True).start()

    def _follow_goal(self, handle: ServerGoalHandle) -> None:
        """One motion/execute goal, on a thread of its own: hand the command to the stream, publish
        feedback every FEEDBACK_PERIOD_S, cancel it when the client asks; once it has ended, have the
        executor run the execute callback, which reports the end."""
        key = bytes(handle.goal_id.uuid)
        execution = None
        if not handle.is_cancel_requested:
            execution = self._submit(handle.request.command, "a newer motion/execute goal")
            feedback = ExecuteCommand.Feedback()
            next_feedback = 0.0
            while not execution.done.wait(CANCEL_POLL_S):
                if handle.is_cancel_requested:
                    self.stream.cancel(execution)
                elif time.monotonic() >= next_feedback:
                    next_feedback = time.monotonic() + FEEDBACK_PERIOD_S
                    progress = self.stream.progress(execution)
                    feedback.elapsed_s, feedback.remaining_s = progress.elapsed_s, progress.remaining_s
                    feedback.vx, feedback.vy, feedback.vyaw = progress.vx, progress.vy, progress.vyaw
                    handle.publish_feedback(feedback)
        self._goal_executions[key] = execution
        try:
            handle.execute()
        except Exception:  # the action server was destroyed meanwhile (cleanup, shutdown): nobody to answer
            self._goal_executions.pop(key, None)

    def _end_goal(self, handle: ServerGoalHandle) -> ExecuteCommand.Result:
        """The execute callback, run once the goal's command has ended: its terminal state and result."""
        execution = self._goal_executions.pop(bytes(handle.goal_id.uuid), None)
        result = ExecuteCommand.Result()
        if execution is None:
            handle.canceled()
            result.outcome, result.reason = ExecuteCommand.Result.CANCELED, "cancelled before it started"
            return result
        result.outcome, result.reason, result.elapsed_s = int(execution.outcome), execution.reason, execution.elapsed_s
        if execution.command is not None:
            result.executed = self._echo(handle.request.command, execution)
        if execution.outcome == Outcome.COMPLETED:
            handle.succeed()
        elif execution.outcome == Outcome.CANCELED:
            handle.canceled()  # only ever after the client's cancel request (_follow_goal)
        else:
            handle.abort()
        return result

    def _on_estop_topic(self, msg: Bool) -> None:
        if msg.data:
            self.engage_estop("motion/estop topic")
        elif self.stream.estop_engaged:
            self.get_logger().warning("motion/estop False ignored: release is explicit, call motion/release_estop")

    def _on_engage_srv(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self.engage_estop("motion/engage_estop service")
        response.success, response.message = True, "e-stop engaged; StopMove sent"
        return response

    def _on_release_srv(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        was = self.stream.release_estop()
        if self._estop_pub is not None:
            self._estop_pub.publish(Bool(data=False))
        if was:
            self.get_logger().warning("e-stop released: commands are accepted again")
        response.success, response.message = True, "e-stop released" if was else "e-stop was not engaged"
        return response

    def engage_estop(self, source: str) -> None:
        """Latch the e-stop: drop everything queued, StopMove at once, refuse commands until released."""
        if not self.stream.engage_estop(source):
            return  # the same e-stop again (one message heard by several subscriptions, or repeated)
        if self._estop_pub is not None:
            self._estop_pub.publish(Bool(data=True))
        self.get_logger().error(f"E-STOP engaged by {source}")

    # ---- outputs ------------------------------------------------------------------
    def _on_request_error(self, name: str, code: int, error: Exception | None) -> None:
        if error is not None:
            self.get_logger().error(f"{name} raised {error!r}", throttle_duration_sec=1.0)
        else:
            self.get_logger().warning(f"{name} -> {code} ({code_name(code)})", throttle_duration_sec=1.0)

    def _set_idle(self, idle: bool) -> None:
        if idle != self._idle and self._idle_pub is not None:
            self._idle = idle
            if self.context.ok():  # halt() also runs after Ctrl-C has shut the context down
                self._idle_pub.publish(Bool(data=idle))

    def _on_state(self, s: RobotState) -> None:
        pub = self._odom_pub
        if self.stream is None or not self.stream.active or pub is None:
            return
        p = self.get_parameter
        msg = odometry_from_state(
            s, self.get_clock().now().to_msg(), p("odom_frame").value, p("base_frame").value,
            p("pose_covariance_diagonal").value, p("twist_covariance_diagonal").value,
        )
        try:
            pub.publish(msg)
            if self._tf_pub is not None:
                self._tf_pub.publish(TFMessage(transforms=[odom_transform(msg)]))
        except Exception:  # publisher destroyed between the check and the call during cleanup
            pass

    def _publish_diagnostics(self) -> None:
        p = self._params()
        now = time.monotonic()
        hw = f"go2:{p['network_interface']}/domain{p['dds_domain_id']}"
        backend = self._backend
        state = backend.latest_state() if backend is not None else None
        me = self.get_fully_qualified_name()  # two namespaced robots' statuses never collide

        conn = DiagnosticStatus(name=f"{me}: Go2 connection", hardware_id=hw)
        if state is None:
            conn.level, conn.message = DiagnosticStatus.ERROR, "no rt/sportmodestate received yet: robot off, wrong interface or domain"
            age = math.inf
        else:
            age = now - state.received
            if age > p["state_timeout_s"]:
                conn.level = DiagnosticStatus.ERROR
                conn.message = f"robot connection lost: no rt/sportmodestate for {age:.1f} s"
            else:
                conn.level, conn.message = DiagnosticStatus.OK, f"connected, sport mode {state.mode}"
        conn.values = [
            KeyValue(key="state_age_s", value=f"{age:.3f}"),
            KeyValue(key="states_received", value=str(backend.states_received if backend else 0)),
        ]

        status = self.stream.status()
        cmd = DiagnosticStatus(name=f"{me}: commands", hardware_id=hw)
        last_age = now - status.last_input if status.last_input is not None else math.inf
        cmd.level = DiagnosticStatus.WARN if status.estop_engaged else DiagnosticStatus.OK
        cmd.message = "E-STOP ENGAGED" if status.estop_engaged else ("moving" if status.moving else "idle")
        cmd.values = [
            KeyValue(key="last_command_age_s", value=f"{last_age:.3f}"),
            KeyValue(key="move_rate_hz_last_1s", value=str(status.moves_last_second)),
            KeyValue(key="estop_engaged", value=str(status.estop_engaged)),
            KeyValue(key="refused_while_estop", value=str(status.refused_while_estop)),
            KeyValue(key="unverified_refused", value=str(status.unverified_refused)),
        ]

        sdk = DiagnosticStatus(name=f"{me}: SDK return codes", hardware_id=hw)
        failing = {k: c for k, c in status.last_codes.items() if c != 0}
        sdk.level = DiagnosticStatus.ERROR if failing else DiagnosticStatus.OK
        sdk.message = (
            "; ".join(f"{k} -> {c} ({code_name(c)})" for k, c in sorted(failing.items())) if failing else "all OK"
        )
        sdk.values = [KeyValue(key=f"{k}_last_code", value=str(c)) for k, c in sorted(status.last_codes.items())]
        sdk.values += [KeyValue(key=f"{k}_errors", value=str(c)) for k, c in sorted(status.error_counts.items())]

        array = DiagnosticArray(status=[conn, cmd, sdk])
        array.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(array)


def main(args: list[str] | None = None) -> int:
    # StopMove (halt) before anything else goes away.
    return spin_node(MotionNode, args, before_destroy=lambda n: n.halt())


if __name__ == "__main__":
    sys.exit(main())
