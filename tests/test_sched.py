"""kvmdbgfs.sched: readers are announced, and the emulation yields to them (in-process)."""

from __future__ import annotations

import threading
import time

from kvmdbgfs import sched
from kvmdbgfs.control import listener
from kvmdbgfs.control.client import request


def test_an_arriving_reader_holds_the_emulation_back_for_a_bounded_time() -> None:
    """reader_arriving() makes readers_waiting() true at once and false again after its window; an emulation
    thread's cond_resched() meanwhile waits, at most MAX_WAIT_S."""
    sched.reader_arriving(0.03)
    assert sched.readers_waiting()
    waited: list[float] = []

    def emulate() -> None:
        sched.emulation_thread()
        start = time.monotonic()
        sched.cond_resched()
        waited.append(time.monotonic() - start)

    thread = threading.Thread(target=emulate)
    thread.start()
    thread.join(5)
    assert not sched.readers_waiting()
    assert 0.01 <= waited[0] <= sched.MAX_WAIT_S + 0.5


def test_a_new_control_connection_is_announced_before_its_thread_starts(tmp_path, monkeypatch) -> None:
    """The accept loop announces each connection (a thread start under busy emulation threads took 30-110 ms
    for the interpreter lock before the request could even be read)."""
    arrivals: list[float] = []
    monkeypatch.setattr(listener, "reader_arriving", arrivals.append)

    class Handlers:
        def dispatch(self, request, progress=None):
            return ["ok"]

    server = listener.ControlServer(tmp_path / "c.sock", None)
    server.start(Handlers())  # type: ignore[arg-type]
    try:
        request(tmp_path / "c.sock", "status", timeout=10)
    finally:
        server.close()
    assert arrivals == [listener.ARRIVAL_S]


def test_a_request_ending_keeps_an_arrivals_window() -> None:
    """A request that ends while a new connection's window is open leaves the window as long as it was."""
    sched.reader_arriving(0.3)
    with sched.serving():
        pass
    time.sleep(0.05)  # past GRACE_S, well inside the arrival's window
    assert sched.readers_waiting()
