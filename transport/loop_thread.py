"""An asyncio event loop in a daemon thread: where the dispatcher's gRPC I/O and the engine's steps run."""

from __future__ import annotations

import asyncio
import threading


class LoopThread:
    def __init__(self, name: str = "grokserve-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.thread.start()

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on this loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
