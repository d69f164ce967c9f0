"""A daemon thread that calls one function at a fixed interval: heartbeats and lease sweeps.

Both must keep going when one call fails (a database blip must not stop a worker heartbeating
for good), and both must stop promptly when their owner is done, hence one small class instead
of a loop written out at each use. Daemon threads, so a process that exits without stopping them
(a crash, a hard kill) is not held open by them.

Never import FastAPI, Celery, SQLAlchemy or torch here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class Periodic:
    """Calls `action` every `interval` seconds, the first time one interval after `start`."""

    def __init__(self, name: str, interval: float, action: Callable[[], object]) -> None:
        self.name = name
        self.interval = interval
        self.action = action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Periodic:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.action()
            except Exception:
                log.exception("%s failed; trying again in %.1f s", self.name, self.interval)
