"""The router side of the same-host shared-memory data plane: a ReplicaChannel through a segment of slots.

`open` asks the worker over its (authenticated) gRPC channel to attach, connects to the worker's abstract Unix
socket, presents the one-time token and receives the segment. A call takes a free slot, copies the request's
buffers into the slot's request region (one copy of the tensor bytes), rings the doorbell and awaits the
worker's doorbell; the answer is parsed in place, and the slot stays the caller's until `release`. A closed
socket fails every call in flight at once (the worker is gone); a call past its deadline closes the channel
(the slot may still be written), and the dispatcher opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket

from grokserve.transport import wire
from grokserve.transport.errors import CallFailed
from grokserve.transport.grpc_channel import GrpcChannel, status_code
from grokserve.transport.shm import DOORBELL, Segment, SlotLayout, host_id
from grokserve.v1 import expert_pb2 as pb

RETRYABLE_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN",
                   "ABORTED"}


class ShmUnavailable(Exception):
    """Shared memory cannot be set up with this replica (the reason says why); use gRPC."""


class ShmChannel:
    kind = "shm"

    def __init__(self, control: GrpcChannel, segment: Segment, conn: socket.socket):
        self.address = control.address
        self.control = control
        self.segment = segment
        self.conn = conn
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(segment.layout.slots):
            self.free.put_nowait(slot)
        self.waiting: dict[int, tuple[int, asyncio.Future]] = {}  # slot → (sequence, answer length)
        self.sequence = itertools.count(1)
        self.broken = ""
        self.received = bytearray()
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(conn.fileno(), self._on_readable)  # doorbells resolve their calls in one hop

    @classmethod
    async def open(cls, control: GrpcChannel, slots: int, timeout: float) -> ShmChannel:
        """Attach to the replica behind `control`; raises ShmUnavailable naming why not."""
        local = host_id()
        if not local:
            raise ShmUnavailable("this host has no shared-memory support")
        try:
            attach = await control.attach(pb.AttachRequest(host_id=local, slots=slots), timeout)
        except CallFailed as exc:
            raise ShmUnavailable(f"the worker refused: {exc}") from None
        layout = SlotLayout(attach.slots, attach.request_bytes, attach.response_bytes)
        loop = asyncio.get_running_loop()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(conn, "\0" + attach.socket), timeout)
            await loop.sock_sendall(conn, attach.token)
            fd = await asyncio.wait_for(_receive_fd(loop, conn), timeout)
            segment = Segment(fd, layout)
        except (OSError, TimeoutError, ValueError) as exc:
            conn.close()
            raise ShmUnavailable(f"could not attach the segment: {exc}") from None
        return cls(control, segment, conn)

    def _on_readable(self) -> None:
        try:
            data = self.conn.recv(64 * DOORBELL.size)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"the shared-memory channel failed ({exc})")
            return
        if not data:
            self._fail("the worker closed the shared-memory channel")
            return
        self.received += data
        while len(self.received) >= DOORBELL.size:
            slot, nbytes, seq = DOORBELL.unpack_from(self.received)
            del self.received[:DOORBELL.size]
            expected, future = self.waiting.pop(slot, (None, None))
            if future is not None and expected == seq and not future.done():
                future.set_result(nbytes)

    def _fail(self, reason: str) -> None:
        """The peer is gone (or the channel is given up): every call in flight fails at once."""
        if not self.broken:
            self.broken = reason
        self.loop.remove_reader(self.conn.fileno())
        for _, future in self.waiting.values():
            if not future.done():
                future.set_exception(CallFailed(self.broken, retryable=True))
        self.waiting.clear()

    async def exchange(self, call_id: int, message: wire.WireMessage, timeout: float) -> wire.ResponseView:
        if self.broken:
            raise CallFailed(self.broken, retryable=True)
        try:
            slot = await asyncio.wait_for(self.free.get(), timeout)
        except TimeoutError:
            raise CallFailed(f"no free slot within {timeout:.2f}s", retryable=True,
                             code="DEADLINE_EXCEEDED") from None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.free.put_nowait(slot)

        try:
            try:
                nbytes = self.segment.write(self.segment.request(slot), message.parts)
            except ValueError as exc:
                raise CallFailed(str(exc), retryable=False, code="INVALID_ARGUMENT") from None
            seq = next(self.sequence) & 0x7FFFFFFF
            future = self.loop.create_future()
            self.waiting[slot] = (seq, future)
            try:
                self.conn.send(DOORBELL.pack(slot, nbytes, seq))  # 12 bytes: the socket buffer takes them
            except OSError as exc:
                self._fail(f"the worker closed the shared-memory channel ({exc})")
                raise CallFailed(self.broken, retryable=True) from None
            try:
                length = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                self._fail(f"no answer within {timeout:.2f}s")  # the slot may still be written: not used again
                raise CallFailed(self.broken, retryable=True, code="DEADLINE_EXCEEDED") from None
            if length > self.segment.layout.response_bytes:
                raise CallFailed(f"answer of {length} bytes overflows its slot", retryable=False, code="INTERNAL")
            response = wire.decode_response_bytes(self.segment.response(slot)[:length])
            if response.has_error:
                code = status_code(response.error_code).name
                raise CallFailed(response.error_message, retryable=code in RETRYABLE_CODES, code=code)
        except BaseException:
            if not self.broken:
                release()
            raise
        response.release = release
        return response

    async def info(self, timeout: float) -> pb.InfoResponse:
        return await self.control.info(timeout)

    async def close(self) -> None:
        self._fail("channel closed")
        self.conn.close()
        self.segment.close()


async def _receive_fd(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> int:
    """The one file descriptor the worker sends after accepting the token."""
    while True:
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(conn.fileno())
        try:
            data, fds, _, _ = socket.recv_fds(conn, 16, 1)
        except BlockingIOError:
            continue
        if not data or not fds:
            raise ConnectionError("the worker refused the token")
        for extra in fds[1:]:
            with contextlib.suppress(OSError):
                socket.close(extra)
        return fds[0]

