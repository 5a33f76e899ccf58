"""Shared memory between a router and a worker on one host: the segment, its slots, and the doorbell frames.

A segment is an anonymous memory file (memfd): it has no name in /dev/shm, so nothing can find it, guess it
or outlive the processes that hold it (a crash leaves nothing behind). The worker creates one per attached
router and hands its file descriptor over a Unix socket to the peer that presents the one-time token of the
AttachSharedMemory answer — which only an authenticated gRPC caller receives, so dispatch mTLS still decides
who may connect. The segment holds `slots` pairs of regions: a request region (a serialized ForwardRequest,
exactly the bytes gRPC would carry) and an answer region (a serialized ForwardResponse). Doorbells are 12-byte
frames on the socket (slot, byte count, sequence number); a closed socket is a dead peer, noticed at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

DOORBELL = struct.Struct("<IIi")  # slot, bytes in the slot's region, sequence number (echoed)
TOKEN_BYTES = 32
MAX_SLOTS = 8


def host_id() -> str:
    """Processes with equal host ids share a kernel and a network namespace: they can reach each other's
    abstract Unix sockets and pass file descriptors (pods on one node, with their own namespaces, cannot)."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip() if Path("/proc/sys/kernel/random/boot_id"
                                                                             ).exists() else ""
    try:
        netns = str(os.stat("/proc/self/ns/net").st_ino)
    except OSError:
        netns = ""
    if not boot:
        return ""  # not Linux: no shared memory transport
    return hashlib.sha256(f"{boot}:{netns}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class SlotLayout:
    """Where slot i's request and answer regions lie in the segment."""

    slots: int
    request_bytes: int
    response_bytes: int

    @property
    def slot_bytes(self) -> int:
        return self.request_bytes + self.response_bytes

    @property
    def total_bytes(self) -> int:
        return self.slots * self.slot_bytes

    def request_region(self, slot: int) -> tuple[int, int]:
        start = slot * self.slot_bytes
        return start, start + self.request_bytes

    def response_region(self, slot: int) -> tuple[int, int]:
        start = slot * self.slot_bytes + self.request_bytes
        return start, start + self.response_bytes


class Segment:
    """A memfd of `layout.total_bytes`, mapped read-write. Pages are allocated only when touched."""

    def __init__(self, fd: int, layout: SlotLayout):
        self.fd = fd
        self.layout = layout
        if os.fstat(fd).st_size != layout.total_bytes:
            raise ValueError(f"segment has {os.fstat(fd).st_size} bytes, the layout needs {layout.total_bytes}")
        self.map = mmap.mmap(fd, layout.total_bytes)
        self.view = memoryview(self.map)

    @classmethod
    def create(cls, layout: SlotLayout, name: str = "grokserve-dispatch") -> Segment:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, layout.total_bytes)
        return cls(fd, layout)

    def request(self, slot: int) -> memoryview:
        start, stop = self.layout.request_region(slot)
        return self.view[start:stop]

    def response(self, slot: int) -> memoryview:
        start, stop = self.layout.response_region(slot)
        return self.view[start:stop]

    def write(self, region: memoryview, parts: list[bytes | memoryview]) -> int:
        """Copy the parts of a message into a region, back to back; returns the message's length."""
        pos = 0
        for part in parts:
            n = len(part) if isinstance(part, bytes) else part.nbytes
            if pos + n > len(region):
                raise ValueError(f"message of more than {len(region)} bytes does not fit its slot")
            region[pos:pos + n] = part if isinstance(part, bytes) else part.cast("B")
            pos += n
        return pos

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):  # a view of it is still alive somewhere: it goes when that does
            self.map.close()
        os.close(self.fd)
