"""The host's clock: real time, or a manual clock that moves only when told to.

Host time is an integer number of nanoseconds since the host started. Under
``realtime`` it follows the monotonic clock; under ``manual`` it moves only
with :meth:`HostClock.advance`, so the same commands give the same files.
Emulation threads wait on the clock with a bound (:meth:`HostClock.wait`).
"""

from __future__ import annotations

import re
import threading
import time

CLOCK_MODES = ("realtime", "manual")
_DURATION = re.compile(r"^([0-9]+)(ns|us|ms|s|m|h)$")
_UNIT_NS = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
MAX_ADVANCE_NS = 24 * _UNIT_NS["h"]


def parse_duration(text: str) -> int:
    """'500ms', '10s', '2m' (ASCII digits and a unit) as nanoseconds; ValueError with one line otherwise."""
    match = _DURATION.match(text) if isinstance(text, str) and text.isascii() else None
    if match is None:
        raise ValueError(f"bad duration {text!r} (examples: 500ms, 10s, 2m)")
    ns = int(match.group(1)) * _UNIT_NS[match.group(2)]
    if not 0 < ns <= MAX_ADVANCE_NS:
        raise ValueError(f"duration {text!r} must be more than 0 and at most 24h")
    return ns


class HostClock:
    """Host time in ns; ``mode`` is ``realtime`` or ``manual``."""

    def __init__(self, mode: str = "realtime") -> None:
        if mode not in CLOCK_MODES:
            raise ValueError(f"unknown clock {mode!r} (known: {', '.join(CLOCK_MODES)})")
        self.mode = mode
        self._start = time.monotonic_ns()
        self._manual_ns = 0
        self._changed = threading.Condition()

    @property
    def manual(self) -> bool:
        return self.mode == "manual"

    def now_ns(self) -> int:
        if self.manual:
            return self._manual_ns
        return time.monotonic_ns() - self._start

    def advance(self, ns: int) -> int:
        """Move a manual clock forward by ``ns``; returns the new time. A realtime clock refuses."""
        if not self.manual:
            raise ValueError("the clock is realtime: only a manual clock (--clock manual) can be advanced")
        with self._changed:
            self._manual_ns += ns
            self._changed.notify_all()
            return self._manual_ns

    def start_at(self, ns: int) -> None:
        """The host has already been up for ``ns`` (a scenario's VMs booted before the tree is served)."""
        with self._changed:
            if self.manual:
                self._manual_ns = max(self._manual_ns, ns)
            else:
                self._start = min(self._start, time.monotonic_ns() - ns)
            self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        """Sleep until the manual clock moves, someone calls :meth:`wake`, or ``timeout`` seconds pass."""
        with self._changed:
            self._changed.wait(timeout)

    def wake(self) -> None:
        """Wake every waiter (new work arrived, or the host is stopping)."""
        with self._changed:
            self._changed.notify_all()
