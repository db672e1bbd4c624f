"""kvmdbgfs.sched: readers are announced, and the emulation yields to them (in-process)."""

from __future__ import annotations

import socket
import threading
import time

from kvmdbgfs import sched
from kvmdbgfs.control import listener
from kvmdbgfs.control.client import request


def test_an_arriving_reader_holds_the_emulation_back_for_a_bounded_time() -> None:
    """An Arrival makes readers_waiting() true at once and false again after its window; an emulation
    thread's cond_resched() meanwhile waits, at most MAX_WAIT_S."""
    arrival = sched.Arrival(0.03)
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
    arrival.known()


def test_a_control_connection_holds_the_emulation_back_only_until_its_request_is_read(tmp_path, monkeypatch) -> None:
    """The accept loop announces each connection (a thread start under busy emulation threads took 30-110 ms
    for the interpreter lock before the request could even be read), and the announcement ends once the request
    line is read: a client polling `status` must not hold the guests back for the whole window each time."""
    monkeypatch.setattr(listener, "ARRIVAL_S", 30.0)

    class Handlers:
        def dispatch(self, request, progress=None):
            return ["ok"]

    server = listener.ControlServer(tmp_path / "c.sock", None)
    server.start(Handlers())  # type: ignore[arg-type]
    try:
        with socket.socket(socket.AF_UNIX) as idle_client:
            idle_client.connect(str(tmp_path / "c.sock"))
            assert wait_until(sched.readers_waiting), "an accepted connection was not announced"
        assert wait_until(lambda: not sched.readers_waiting()), "a connection gone without a request still holds"
        request(tmp_path / "c.sock", "status", timeout=10)
        time.sleep(5 * sched.GRACE_S)
        assert not sched.readers_waiting(), "the arrival outlived its request"
    finally:
        server.close()


def wait_until(condition, timeout: float = 5.0) -> bool:
    """Poll ``condition`` every millisecond for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_a_request_ending_keeps_an_arrivals_window_until_its_own_request_is_known() -> None:
    """A request that ends while another connection's request is still awaited leaves that arrival in place;
    the arrival ends when its own request is known."""
    arrival = sched.Arrival(0.3)
    with sched.serving():
        pass
    time.sleep(0.05)  # past GRACE_S, well inside the arrival's window
    assert sched.readers_waiting()
    arrival.known()
    assert not sched.readers_waiting()
