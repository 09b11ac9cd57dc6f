"""A per-thread flag for a kind of forward (a checkpoint's replay, a generation step) that routers read.

Thread-local: the autograd engine replays a checkpoint on the thread that runs that device's backward, and the
context that sets the flag is entered on that same thread. A depth counter, so that nested contexts leave it set
until the outermost one ends.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class ThreadFlag:
    def __init__(self) -> None:
        self._state = threading.local()

    def is_set(self) -> bool:
        return getattr(self._state, "depth", 0) > 0

    @contextlib.contextmanager
    def set(self) -> Iterator[None]:
        self._state.depth = getattr(self._state, "depth", 0) + 1
        try:
            yield
        finally:
            self._state.depth -= 1
