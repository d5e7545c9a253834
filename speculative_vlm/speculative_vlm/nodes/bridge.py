"""Bridge node: owns the robot's link to the cloud verifier.

The drafter opens sessions through ``spec/open`` and streams DraftBlocks on ``spec/draft``; the
bridge forwards them over the gRPC client (auth, TLS and deadlines from parameters) and publishes
every verdict, early and final, on ``spec/verdict``. Refusals and link loss become ERROR verdicts
with the error's code and reason (a refused open, the ``OpenSession`` response's code and reason),
from the one table of ``protocol.errors``, so the drafter raises the very exception the verifier
raised (``PromptTooLong``, ``Draining``, ...) and can stop the robot. The link state is published on
``bridge/link`` (latched) and ``/diagnostics``.

A session opened with mode AUTOREGRESSIVE (cloud autoregressive: the drafter's method ``cloud_ar``,
or ``auto`` when it finds speculation does not pay) is opened with the client's
``open_autoregressive``; the bridge publishes each token the target generates as a TOKEN verdict
(round = the token's index, eos on the last) and stops the stream when the drafter closes the session.

Restarts: a verifier that drains (SIGTERM) ends its sessions with the retryable code
``draining``, which reaches the drafter as such; the drafter stops the robot and reopens the
session through ``spec/open``, which the client retries until ``open_timeout_s``, moving on to
the next of ``fallback_addresses`` (if any) whenever an address is lost or draining.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from std_msgs.msg import Header, String

from speculative_vlm.decoding.verifier import (
    Draining,
    InvalidArgument,
    LinkLost,
    SessionNotFound,
    StreamingUnavailable,
    Verifier,
    VerifierError,
    VerifierSession,
    VerifierTimeout,
)
from speculative_vlm.nodes.parameters import float_range, on_parameters_set, start_only
from speculative_vlm.nodes.ros_verifier import SPEC_QOS
from speculative_vlm.nodes.spec_messages import (
    error_msg,
    msg_to_block,
    msg_to_request,
    refuse_open,
    token_msg,
    verdict_to_msg,
)
from speculative_vlm.nodes.spin import spin_node
from speculative_vlm_msgs.msg import DraftBlock as DraftBlockMsg
from speculative_vlm_msgs.msg import Verdict as VerdictMsg
from speculative_vlm_msgs.srv import CloseSession, OpenSession

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def verifier_addresses(node: Node) -> list[str]:
    """``cloud_address``, then each of ``fallback_addresses`` (comma-separated), without repeats."""
    p = node.get_parameter
    addresses = [p("cloud_address").value, *(a.strip() for a in p("fallback_addresses").value.split(","))]
    return list(dict.fromkeys(a for a in addresses if a))


def grpc_verifier_from_parameters(node: Node) -> Verifier:
    """The gRPC client configured from the node's parameters (token from env or file, never YAML)."""
    from speculative_vlm.protocol.client import GrpcVerifier, read_token

    p = node.get_parameter
    env_name, token_file = p("auth_token_env").value, p("auth_token_file").value
    token = read_token(None, token_file or None, env=env_name) if (env_name or token_file) else None
    if env_name and not token:
        raise ValueError(f"auth_token_env={env_name!r} but that environment variable is empty")
    tls_ca, tls_cert, tls_key = p("tls_ca").value, p("tls_cert").value, p("tls_key").value
    root_cert = None
    if tls_ca:
        with open(tls_ca, "rb") as f:
            root_cert = f.read()
    if bool(tls_cert) != bool(tls_key) or (tls_cert and not tls_ca):
        raise ValueError("tls_cert and tls_key (mutual TLS) go together, and with tls_ca")
    client_cert = Path(tls_cert).read_bytes() if tls_cert else None
    client_key = Path(tls_key).read_bytes() if tls_key else None
    return GrpcVerifier(verifier_addresses(node), token, tls=bool(tls_ca), root_cert=root_cert,
                        client_cert=client_cert, client_key=client_key,
                        verdict_timeout_s=p("deadline_s").value, open_timeout_s=p("open_timeout_s").value)


class BridgeNode(Node):
    def __init__(self, verifier: Verifier | None = None, **kwargs):
        super().__init__("bridge", **kwargs)
        d = self.declare_parameter
        d("cloud_address", "127.0.0.1:50561", start_only("host:port of the cloud verifier"))
        d("fallback_addresses", "", start_only(
            "more verifiers, comma-separated host:port, tried in order after cloud_address when the one in use "
            "is lost or draining (a restart, a rollout); '' = cloud_address only"))
        d("auth_token_env", "", start_only("name of the environment variable holding the bearer token ('' = none)"))
        d("auth_token_file", "", start_only("file holding the bearer token, used when auth_token_env is ''"))
        d("tls_ca", "", start_only("CA certificate (PEM) to verify the verifier's TLS certificate; '' = plaintext"))
        d("tls_cert", "", start_only("client certificate (PEM) for mutual TLS, signed by the CA the verifier's "
                                     "tls_client_ca names; '' = none"))
        d("tls_key", "", start_only("private key (PEM) of tls_cert; '' = none"))
        d("deadline_s", 5.0, float_range(0.1, 120.0, "deadline for a verdict before the link counts as lost, s"))
        d("open_timeout_s", 30.0, float_range(
            0.5, 600.0, "how long opening a session (prompt prefill on the target) may take, s"))
        self._verifier = verifier if verifier is not None else grpc_verifier_from_parameters(self)
        # Every open session by id, and whether it streams (AUTOREGRESSIVE: no submit/next_verdict).
        self._sessions: dict[str, tuple[VerifierSession, bool]] = {}
        self._lock = threading.Lock()
        self._link, self._link_reason = "CONNECTED", ""
        group = ReentrantCallbackGroup()
        self._verdict_pub = self.create_publisher(VerdictMsg, "spec/verdict", SPEC_QOS)
        self._link_pub = self.create_publisher(String, "bridge/link", LATCHED)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_subscription(DraftBlockMsg, "spec/draft", self._on_draft, SPEC_QOS, callback_group=group)
        self.create_service(OpenSession, "spec/open", self._on_open, callback_group=group)
        self.create_service(CloseSession, "spec/close", self._on_close, callback_group=group)
        self.create_timer(1.0, self._publish_diagnostics)
        add_listener = getattr(self._verifier, "add_link_listener", None)
        if add_listener is not None:
            add_listener(lambda state, reason="": self._set_link(getattr(state, "name", str(state)), reason))
        self._set_link(self._link, "")
        on_parameters_set(self, self._on_parameters_set)

    def _on_parameters_set(self, values: dict[str, object]) -> None:
        # The gRPC client reads its timeouts on every call: hand it the new ones.
        for name, attribute in (("deadline_s", "verdict_timeout_s"), ("open_timeout_s", "open_timeout_s")):
            if name in values and hasattr(self._verifier, attribute):
                setattr(self._verifier, attribute, values[name])

    def _now(self) -> Time:
        """This node's clock: every verdict is stamped with it when the bridge publishes it."""
        return self.get_clock().now().to_msg()

    # -- link state ---------------------------------------------------------------------------
    def _set_link(self, state: str, reason: str) -> None:
        previous, self._link, self._link_reason = self._link, state, reason
        self._link_pub.publish(String(data=state))
        # The reason goes to /rosout (and the diagnostics), where an operator looks for it.
        if state == "LOST":
            self.get_logger().error(f"cloud verifier link LOST ({self._address()}): "
                                    f"{reason or 'no reason given'}; the drafter stops the robot")
        elif state == "DEGRADED":
            self.get_logger().warning(f"cloud verifier link DEGRADED: {reason or 'no reason given'}")
        elif state != previous or reason:
            self.get_logger().info(f"cloud verifier link {state}" + (f": {reason}" if reason else ""))
        if state == "LOST":
            # Every open session is gone with the link: tell each drafter at once.
            with self._lock:
                sessions = list(self._sessions)
            for sid in sessions:
                self._verdict_pub.publish(error_msg(sid, LinkLost(f"the cloud verifier link is lost ({reason})"),
                                                   stamp=self._now()))

    def _address(self) -> str:
        """The verifier address in use (the client moves on to a fallback when one drains or is lost)."""
        return getattr(self._verifier, "address", None) or self.get_parameter("cloud_address").value

    def _publish_diagnostics(self) -> None:
        level = {"CONNECTED": DiagnosticStatus.OK, "DEGRADED": DiagnosticStatus.WARN}.get(
            self._link, DiagnosticStatus.ERROR)
        with self._lock:
            n = len(self._sessions)
        status = DiagnosticStatus(
            level=level, name=f"{self.get_fully_qualified_name()}: cloud link",
            hardware_id=self._address(),
            message=f"{self._link}: {self._link_reason}" if self._link_reason else self._link,
            values=[KeyValue(key="sessions", value=str(n))],
        )
        self._diag_pub.publish(DiagnosticArray(header=Header(stamp=self._now()), status=[status]))

    # -- sessions -------------------------------------------------------------------------------
    def _on_open(self, req: OpenSession.Request, res: OpenSession.Response) -> OpenSession.Response:
        request = msg_to_request(req)
        streamed = req.mode == OpenSession.Request.AUTOREGRESSIVE
        try:
            if req.mode not in (OpenSession.Request.SPECULATIVE, OpenSession.Request.AUTOREGRESSIVE):
                raise InvalidArgument("invalid_argument",
                                      f"mode {req.mode} is neither SPECULATIVE (0) nor AUTOREGRESSIVE (1)")
            open_stream = getattr(self._verifier, "open_autoregressive", None)
            if streamed and not callable(open_stream):
                raise StreamingUnavailable("streaming_unavailable", f"this bridge's verifier "
                                           f"({type(self._verifier).__name__}) cannot stream the target's tokens; "
                                           "open a SPECULATIVE session")
            session = open_stream(request) if streamed else self._verifier.open(request)
        except VerifierError as exc:
            self.get_logger().warning(f"open refused ({exc.code}): {exc.reason}")
            return refuse_open(res, exc)
        with self._lock:
            self._sessions[session.session_id] = (session, streamed)
        threading.Thread(target=self._pump, args=(session, streamed), name=f"verdicts-{session.session_id}",
                         daemon=True).start()
        res.success, res.session_id = True, session.session_id
        res.prefill_time_s = float(getattr(getattr(session, "opened", None), "prefill_time_s", 0.0) or 0.0)
        return res

    def _on_close(self, req: CloseSession.Request, res: CloseSession.Response) -> CloseSession.Response:
        with self._lock:
            entry = self._sessions.pop(req.session_id, None)
        if entry is None:
            res.success, res.reason = False, f"unknown session {req.session_id!r}"
            return res
        entry[0].close()
        res.success = True
        return res

    def _on_draft(self, msg: DraftBlockMsg) -> None:
        with self._lock:
            entry = self._sessions.get(msg.session_id)
        if entry is None:
            self._verdict_pub.publish(error_msg(msg.session_id, SessionNotFound(
                f"no open session {msg.session_id!r}; open one first"), stamp=self._now()))
            return
        session, streamed = entry
        if streamed:
            self._verdict_pub.publish(error_msg(msg.session_id, InvalidArgument(
                "invalid_argument", f"session {msg.session_id!r} is AUTOREGRESSIVE: the target generates alone "
                "and takes no draft blocks"), stamp=self._now()))
            return
        try:
            session.submit(msg_to_block(msg))
        except VerifierError as exc:
            self._verdict_pub.publish(error_msg(msg.session_id, exc, stamp=self._now()))

    def _pump(self, session: VerifierSession, streamed: bool = False) -> None:
        """Forward the session's verdicts (a streamed session's tokens) to spec/verdict until it is closed or fails."""
        sid = session.session_id
        while True:
            with self._lock:
                if sid not in self._sessions:
                    return  # closed: a stream stops here too, the close has told the verifier
            try:
                if streamed:
                    item = session.next_token(timeout=0.5)
                    with self._lock:  # a token read as the drafter closed the session goes nowhere
                        if sid not in self._sessions:
                            return
                        self._verdict_pub.publish(token_msg(sid, item, stamp=self._now()))
                    if item.eos:
                        return  # the stream is complete; the session stays open until the drafter closes it
                    continue
                verdict = session.next_verdict(timeout=0.5)
            except VerifierTimeout:
                continue  # idle between rounds; the client enforces its own deadline per block
            except VerifierError as exc:
                if isinstance(exc, Draining):  # a restart: the drafter reopens the session
                    self.get_logger().warning(f"session {sid} ended: the verifier is draining ({exc})")
                else:
                    self.get_logger().error(f"session {sid} ended by the verifier ({exc.code}): {exc.reason}")
                self._verdict_pub.publish(error_msg(sid, exc, stamp=self._now()))
                with self._lock:
                    self._sessions.pop(sid, None)
                return
            self._verdict_pub.publish(verdict_to_msg(sid, verdict, stamp=self._now()))

    def destroy_node(self) -> None:
        with self._lock:
            sessions, self._sessions = [session for session, _ in self._sessions.values()], {}
        for session in sessions:
            try:
                session.close()
            except VerifierError:
                pass
        close = getattr(self._verifier, "close", None)
        if close is not None:
            close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    return spin_node(BridgeNode, args)


if __name__ == "__main__":
    sys.exit(main())
