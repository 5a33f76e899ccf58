"""The worker side of the same-host shared-memory data plane (transport/shm.py says how it works).

`attach` (the AttachSharedMemory RPC, so only an authenticated gRPC caller reaches it) creates a segment and a
one-time token. The router connects to this worker's abstract Unix socket, presents the token and receives
the segment's file descriptor; then, in a thread of its own, each doorbell names a slot whose request the
servicer answers into the same slot's answer region. When the router's socket closes (the router stopped or
died) the segment goes with it; a token that nobody claims expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from grokserve.transport import wire
from grokserve.transport.shm import DOORBELL, MAX_SLOTS, TOKEN_BYTES, Segment, SlotLayout, host_id
from grokserve.v1 import expert_pb2 as pb

log = logging.getLogger(__name__)
CLAIM_WITHIN_S = 10.0  # an attachment not claimed by then is dropped


class AttachRefused(ValueError):
    """An AttachSharedMemory request this worker cannot grant (→ FAILED_PRECONDITION naming why)."""


@dataclass
class _Pending:
    segment: Segment
    expires: float


class SharedMemoryServer:
    def __init__(self, servicer, request_bytes: int, response_bytes: int):
        self.servicer = servicer  # ExpertServicer: `answer(data, write, refuse)`
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes
        self.host_id = host_id()
        self.name = f"grokserve-{secrets.token_hex(16)}"  # abstract socket: no file, gone with the process
        self.pending: dict[bytes, _Pending] = {}
        self.connections: set[asyncio.Task] = set()
        self.threads: set[threading.Thread] = set()
        self.stopping = False
        self.listener: socket.socket | None = None
        self.accepting: asyncio.Task | None = None

    @property
    def available(self) -> bool:
        return self.listener is not None and bool(self.host_id)

    async def start(self) -> None:
        if not self.host_id:
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("\0" + self.name)
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        self.accepting = asyncio.get_running_loop().create_task(self._accept())

    def attach(self, request: pb.AttachRequest) -> pb.AttachResponse:
        if not self.available:
            raise AttachRefused("shared memory is not available on this worker")
        if request.host_id != self.host_id:
            raise AttachRefused("host_id: the router runs on another host (or network namespace)")
        if not 1 <= request.slots <= MAX_SLOTS:
            raise AttachRefused(f"slots: must be in [1, {MAX_SLOTS}], got {request.slots}")
        now = time.monotonic()
        for token in [t for t, p in self.pending.items() if p.expires < now]:
            self.pending.pop(token).segment.close()
        layout = SlotLayout(request.slots, self.request_bytes, self.response_bytes)
        token = secrets.token_bytes(TOKEN_BYTES)
        self.pending[token] = _Pending(Segment.create(layout), now + CLAIM_WITHIN_S)
        return pb.AttachResponse(socket=self.name, token=token, slots=layout.slots,
                                 request_bytes=layout.request_bytes, response_bytes=layout.response_bytes)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.listener is not None
        while True:
            conn, _ = await loop.sock_accept(self.listener)
            task = loop.create_task(self._hand_over(conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    async def _hand_over(self, conn: socket.socket) -> None:
        """Check the token, send the segment, then serve the attachment in a thread of its own: a doorbell's
        round trip then costs two blocking socket calls, not event-loop wake-ups."""
        loop = asyncio.get_running_loop()
        try:
            token = await asyncio.wait_for(_recv_exactly(loop, conn, TOKEN_BYTES), CLAIM_WITHIN_S)
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.warning("shared memory: a peer did not present a token (%s); connection closed", exc)
            conn.close()
            return
        pending = self.pending.pop(token, None)
        if pending is None:
            log.warning("shared memory: a peer presented an unknown token; connection closed")
            conn.close()
            return
        try:
            socket.send_fds(conn, [b"ok"], [pending.segment.fd])  # one small message: the socket buffer takes it
        except OSError as exc:
            log.warning("shared memory: could not hand the segment over (%s)", exc)
            conn.close()
            pending.segment.close()
            return
        thread = threading.Thread(target=self._serve, args=(conn, pending.segment), daemon=True,
                                  name="shm-attachment")
        self.threads.add(thread)
        thread.start()

    def _serve(self, conn: socket.socket, segment: Segment) -> None:
        """One router's doorbells, in order, until its socket closes (it stopped or died)."""
        log.info("shared memory: router attached (%d slots)", segment.layout.slots)
        conn.setblocking(True)
        frame = bytearray(DOORBELL.size)
        try:
            while not self.stopping:
                if conn.recv_into(frame, DOORBELL.size, socket.MSG_WAITALL) < DOORBELL.size:
                    return  # closed
                slot, nbytes, seq = DOORBELL.unpack(frame)
                if slot >= segment.layout.slots or nbytes > segment.layout.request_bytes:
                    log.warning("shared memory: malformed doorbell (slot %d, %d bytes); detached", slot, nbytes)
                    return
                answer = segment.response(slot)
                length = self.servicer.answer_now(
                    segment.request(slot)[:nbytes], lambda message, answer=answer: segment.write(answer, message.parts),
                    lambda call_id, code, text, answer=answer: segment.write(
                        answer, [wire.encode_stream_error_bytes(call_id, code, text)]))
                conn.sendall(DOORBELL.pack(slot, length, seq))
        except OSError as exc:
            log.info("shared memory: connection ended: %s", exc)
        finally:
            conn.close()
            segment.close()
            self.threads.discard(threading.current_thread())
            log.info("shared memory: router detached")

    async def stop(self) -> None:
        self.stopping = True
        if self.accepting is not None:
            self.accepting.cancel()
        for task in list(self.connections):
            task.cancel()
        for task in list(self.connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.listener is not None:
            self.listener.close()
        for pending in self.pending.values():
            pending.segment.close()
        self.pending.clear()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(conn, n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data

