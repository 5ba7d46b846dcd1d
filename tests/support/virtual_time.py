"""An asyncio event loop that runs on virtual time: whenever nothing is ready to run, its clock
jumps to the next timer instead of waiting for it. `asyncio.sleep(5)` returns at once while
`loop.time()` says five seconds passed, so timing logic (the batcher's gather window, deadlines,
turns) is tested exactly and without the wall clock. Real sockets and pipes still work: the loop
polls them without blocking before it jumps."""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import TypeVar

T = TypeVar("T")


class JumpingSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop):
        super().__init__()
        self.loop = loop

    def select(self, timeout: float | None = None):
        ready = super().select(0)
        if not ready and timeout:  # the loop would wait `timeout` for its next timer: jump instead
            self.loop.now += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(JumpingSelector(self))

    def time(self) -> float:
        return self.now


def run(coroutine: Coroutine[object, object, T]) -> T:
    """asyncio.run on virtual time."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coroutine)
