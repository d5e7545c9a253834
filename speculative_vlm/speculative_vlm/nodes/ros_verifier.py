"""The Verifier contract over ROS 2: the drafter's side of the drafter <-> bridge exchange.

Blocks go out on ``spec/draft``, verdicts come back on ``spec/verdict``, sessions are opened and
closed through the bridge's ``spec/open`` / ``spec/close`` services. Because the whole exchange
crosses the ROS graph it can be watched (``ros2 topic echo spec/verdict``) and recorded in a bag.
``open_autoregressive`` opens a session in the AUTOREGRESSIVE mode (cloud autoregressive): the bridge
streams the target's own tokens as TOKEN verdicts on ``spec/verdict``, read with ``next_token``.
Errors arrive as a code and a reason (an ERROR verdict, a refused ``spec/open``) and are raised as
the type the verifier raised, through the one table of ``protocol.errors``: the loop and the
drafter see a ``PromptTooLong`` or a ``Draining`` over this adapter exactly as in process.
The node that owns this adapter must be spun by a multi-threaded executor: the decoding thread
blocks here while the executor delivers verdicts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

from speculative_vlm.decoding.sessions import Opened, StreamedToken
from speculative_vlm.decoding.verifier import (
    DraftBlock,
    LinkLost,
    Refused,
    SessionNotFound,
    SessionRequest,
    Verdict,
    Verifier,
    VerifierSession,
    VerifierTimeout,
)
from speculative_vlm.nodes.spec_messages import (
    block_to_msg,
    msg_to_error,
    msg_to_token,
    msg_to_verdict,
    open_error,
    request_to_msg,
)
from speculative_vlm_msgs.msg import DraftBlock as DraftBlockMsg
from speculative_vlm_msgs.msg import Verdict as VerdictMsg
from speculative_vlm_msgs.srv import CloseSession, OpenSession

# Verdicts must not be lost or reordered: reliable, and deep enough for a burst of rounds.
SPEC_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)

# Messages for a session the drafter has not registered yet are kept for this many sessions: the
# open's response and the session's first messages travel separately, and a stream starts at once.
_UNCLAIMED_SESSIONS = 16


class _RosSession:
    """A session's messages from spec/verdict, in order, and spec/close."""

    def __init__(self, owner: RosVerifier, session_id: str, opened: Opened):
        self.session_id = session_id
        self.opened = opened
        self._owner = owner
        self._verdicts: queue.Queue[VerdictMsg] = queue.Queue()
        self._closed = False

    def _next(self, timeout: float | None, what: str) -> VerdictMsg:
        if self._closed:
            raise SessionNotFound(f"session {self.session_id} is closed; open a new one")
        try:
            msg = self._verdicts.get(timeout=timeout)
        except queue.Empty:
            raise VerifierTimeout(f"no {what} for session {self.session_id} within {timeout} s") from None
        if msg.kind == VerdictMsg.ERROR:
            raise msg_to_error(msg)
        return msg

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner._forget(self.session_id)
        self._owner._call(self._owner._close_client, CloseSession.Request(session_id=self.session_id), 2.0,
                          raise_on_timeout=False)


class RosVerifierSession(_RosSession, VerifierSession):
    """A SPECULATIVE session: blocks out on spec/draft, verdicts back on spec/verdict."""

    def submit(self, block: DraftBlock) -> None:
        if self._closed:
            raise SessionNotFound(f"session {self.session_id} is closed; open a new one")
        self._owner._draft_pub.publish(block_to_msg(self.session_id, block, stamp=self._owner.now()))

    def next_verdict(self, timeout: float | None = None) -> Verdict:
        msg = self._next(timeout, "verdict")
        if msg.kind == VerdictMsg.TOKEN:
            raise Refused("protocol_error", f"session {self.session_id}: a streamed token in a speculative session")
        return msg_to_verdict(msg)


class RosStreamSession(_RosSession):
    """An AUTOREGRESSIVE session: the target's tokens, one TOKEN verdict each; closing it stops the stream."""

    def next_token(self, timeout: float | None = None) -> StreamedToken:
        msg = self._next(timeout, "token")
        if msg.kind != VerdictMsg.TOKEN:
            raise Refused("protocol_error", f"session {self.session_id}: expected a TOKEN verdict, got kind {msg.kind}")
        return msg_to_token(msg)


class RosVerifier(Verifier):
    """Verifier whose verifier is the bridge node, reached over topics and services."""

    def __init__(self, node: Node, service_timeout_s: float = 10.0):
        self._node = node
        self.service_timeout_s = service_timeout_s  # for opening a session; may be changed at run time
        group = ReentrantCallbackGroup()
        self._draft_pub = node.create_publisher(DraftBlockMsg, "spec/draft", SPEC_QOS)
        self._sub = node.create_subscription(VerdictMsg, "spec/verdict", self._on_verdict, SPEC_QOS,
                                             callback_group=group)
        self._open_client = node.create_client(OpenSession, "spec/open", callback_group=group)
        self._close_client = node.create_client(CloseSession, "spec/close", callback_group=group)
        self._sessions: dict[str, _RosSession] = {}
        self._unclaimed: OrderedDict[str, list[VerdictMsg]] = OrderedDict()  # see _UNCLAIMED_SESSIONS
        self._lock = threading.Lock()

    def now(self):
        """The owning node's clock, which stamps every DraftBlock."""
        return self._node.get_clock().now().to_msg()

    def _on_verdict(self, msg: VerdictMsg) -> None:
        with self._lock:  # held while queueing, so _register cannot slip in between: order is kept
            session = self._sessions.get(msg.session_id)
            if session is not None:
                session._verdicts.put(msg)
                return
            # Perhaps a session whose open has not returned yet (a stream's first tokens race the
            # service response), or one closed already; the oldest are forgotten.
            self._unclaimed.setdefault(msg.session_id, []).append(msg)
            self._unclaimed.move_to_end(msg.session_id)
            while len(self._unclaimed) > _UNCLAIMED_SESSIONS:
                self._unclaimed.popitem(last=False)

    def _register(self, session: _RosSession) -> None:
        with self._lock:
            self._sessions[session.session_id] = session
            for msg in self._unclaimed.pop(session.session_id, ()):
                session._verdicts.put(msg)

    def _forget(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def _call(self, client, request, timeout: float, raise_on_timeout: bool = True):
        deadline = time.monotonic() + timeout
        while not client.wait_for_service(timeout_sec=0.2):
            if time.monotonic() > deadline:
                if raise_on_timeout:
                    raise LinkLost(f"service {client.srv_name} is not available; is the bridge node running?")
                return None
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(max(0.0, deadline - time.monotonic())):
            client.remove_pending_request(future)
            if raise_on_timeout:
                raise VerifierTimeout(f"{client.srv_name} did not answer within {timeout} s")
            return None
        return future.result()

    def open(self, request: SessionRequest) -> RosVerifierSession:
        return self._open(request, OpenSession.Request.SPECULATIVE, RosVerifierSession)

    def open_autoregressive(self, request: SessionRequest) -> RosStreamSession:
        """A session in which the cloud target generates alone; read its tokens with ``next_token``."""
        return self._open(request, OpenSession.Request.AUTOREGRESSIVE, RosStreamSession)

    def _open(self, request: SessionRequest, mode: int, kind: type[_RosSession]):
        response = self._call(self._open_client, request_to_msg(request, mode), self.service_timeout_s)
        if not response.success:
            raise open_error(response)
        session = kind(self, response.session_id, Opened(response.session_id, float(response.prefill_time_s)))
        self._register(session)
        return session
