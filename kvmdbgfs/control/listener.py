"""The control server's socket side, bounded in every way a client could make it wait or grow.

- Clients of another user are refused (root excepted), with one line.
- A request line is at most MAX_REQUEST_BYTES and must have come REQUEST_TIMEOUT_S after the connection
  opened (or after the previous answer); past either, the connection is closed.
- At most MAX_WAITING connections may be waiting for their first request line; one more is answered
  ``busy`` and closed.
- accept() failures (out of file descriptors) back off instead of spinning.
- A request runs on a thread of its own and leaves what it has for the client (its progress, latest
  first, and its answer) in an outbox, which the connection's thread sends from: a heartbeat when nothing
  came for HEARTBEAT_S, every send bounded by SEND_TIMEOUT_S. A slow or gone client loses progress lines
  and stalls nothing else, and no lock is held while a socket is waited on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from kvmdbgfs.control.paths import write_pointer
from kvmdbgfs.control.server import ClientGone, ControlHandlers, answer, is_read_request
from kvmdbgfs.control.socketfile import FileId, bind_socket, file_id, remove_if_made
from kvmdbgfs.control.wire import LineReader, LineTooLong, peer_uid, send_message
from kvmdbgfs.sched import Arrival, serving

MAX_REQUEST_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 5.0
MAX_WAITING = 16
BACKLOG = 64
HEARTBEAT_S = 0.5
SEND_TIMEOUT_S = 10.0
ACCEPT_POLL_S = 0.2  # how soon the accept loop sees close()
ACCEPT_BACKOFF_S = (0.01, 1.0)
# How long a new connection holds the emulation back while its thread starts and reads the request line: one
# more thread start under CPU-bound emulation threads took 30-55 ms for the interpreter lock (bench, issue 10).
ARRIVAL_S = 0.02  # the first and the longest pause after a failed accept()
ACCEPT_WARNING_S = 60.0  # at most one line in the log this often about failing accept() calls
HEARTBEAT = {"heartbeat": True}
BUSY = "busy: too many connections are waiting to send a request; try again"
log = logging.getLogger(__name__)


class _Outbox:
    """What a request's thread has for its client: its latest progress (one not sent yet is replaced) and its
    answer."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._progress: tuple[int, int] | None = None
        self._answer: dict[str, Any] | None = None
        self.abandoned = False

    def progress(self, done: int, total: int, idle_ns: int = 0) -> None:
        """The request's progress callback; ClientGone once nobody will send it."""
        if self.abandoned:
            raise ClientGone
        with self._changed:
            self._progress = (done, total)
            self._changed.notify()

    def finish(self, reply: dict[str, Any]) -> None:
        with self._changed:
            self._answer = reply
            self._changed.notify()

    def next_message(self, timeout: float) -> tuple[dict[str, Any], bool]:
        """The next line for the client, and whether it is the answer: the answer once there is one, else the
        latest progress, else (after ``timeout`` seconds) a heartbeat."""
        with self._changed:
            self._changed.wait_for(lambda: self._answer is not None or self._progress is not None, timeout)
            if self._answer is not None:
                return self._answer, True
            progress, self._progress = self._progress, None
        return ({"progress": list(progress)} if progress else HEARTBEAT), False


def _run_request(handlers: ControlHandlers, line: bytes, outbox: _Outbox) -> None:
    try:
        outbox.finish(answer(handlers, line, outbox.progress))
    except ClientGone:
        pass


class ControlServer:
    """Listens on a Unix socket in a background thread. The socket is bound (and the pointer file written) at
    construction, so a bad path is refused before the host is built; requests are served from ``start``.
    ``close`` removes the socket and the pointer only if they are still the files this server made."""

    def __init__(self, path: Path, pointer: Path | None) -> None:
        self.path = path
        self.pointer = pointer
        self._handlers: ControlHandlers | None = None
        self._listener, self._socket_made = bind_socket(path, BACKLOG)
        self._pointer_made: FileId | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._waiting = 0
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        if pointer is not None:
            try:
                write_pointer(pointer, path)
            except OSError as exc:
                self.close()
                raise OSError(exc.errno, f"pointer file {pointer}: {exc.strerror}") from None
            self._pointer_made = file_id(pointer)

    def start(self, handlers: ControlHandlers) -> None:
        self._handlers = handlers
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(10 * ACCEPT_POLL_S)
        self._listener.close()
        for path, made in ((self.path, self._socket_made), (self.pointer, self._pointer_made)):
            if path is not None and made is not None:
                try:
                    remove_if_made(path, made)
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc.strerror)

    def _accept_loop(self) -> None:
        self._listener.settimeout(ACCEPT_POLL_S)
        pause = ACCEPT_BACKOFF_S[0]
        warn_after = 0.0
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: wait for resources, do not spin
                if self._closing.is_set():
                    return
                if time.monotonic() >= warn_after:
                    log.warning("control socket: accept() failed (%s); backing off", exc.strerror)
                    warn_after = time.monotonic() + ACCEPT_WARNING_S
                self._closing.wait(pause)
                pause = min(2 * pause, ACCEPT_BACKOFF_S[1])
                continue
            pause = ACCEPT_BACKOFF_S[0]
            self._admit(sock, Arrival(ARRIVAL_S))

    def _admit(self, sock: socket.socket, arrival: Arrival) -> None:
        """Serve the connection on a thread of its own, or refuse it with one line and close it."""
        refusal = self._refusal(sock)
        if refusal is None:
            try:
                threading.Thread(target=self._serve, args=(sock, arrival), name="control connection",
                                 daemon=True).start()
                return
            except RuntimeError:  # out of threads
                self._first_line_done()
                refusal = BUSY
        arrival.known()
        with sock, contextlib.suppress(OSError):
            send_message(sock, {"ok": False, "error": refusal}, timeout=0)

    def _refusal(self, sock: socket.socket) -> str | None:
        """Why the connection is refused, or None once it holds a waiting slot."""
        uid = peer_uid(sock)
        if uid not in (os.getuid(), 0):
            return f"permission denied: this server answers uid {os.getuid()} only"
        with self._lock:
            if self._waiting >= MAX_WAITING:
                return BUSY
            self._waiting += 1
        return None

    def _first_line_done(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _serve(self, sock: socket.socket, arrival: Arrival) -> None:
        """Answer request lines until the client closes, sends too much, is too slow, or cannot be written to."""
        reader = LineReader(sock)
        try:
            try:
                line = reader.readline(MAX_REQUEST_BYTES, REQUEST_TIMEOUT_S)
            finally:
                arrival.known()
                self._first_line_done()
            while line:
                self._answer(sock, line)
                line = reader.readline(MAX_REQUEST_BYTES, REQUEST_TIMEOUT_S)
        except LineTooLong:
            error = {"ok": False, "error": f"request too large (over {MAX_REQUEST_BYTES >> 20} MiB)"}
            with contextlib.suppress(OSError):
                send_message(sock, error, SEND_TIMEOUT_S)
        except (OSError, RuntimeError):  # too slow to send a request or to read an answer, gone; out of threads
            pass
        finally:
            sock.close()

    def _answer(self, sock: socket.socket, line: bytes) -> None:
        """Run the request on a thread of its own; send what it reports until its answer has gone. A request
        that only reads the host is answered at once, ahead of the guests' emulation (kvmdbgfs.sched)."""
        assert self._handlers is not None
        if is_read_request(line):
            with serving():
                send_message(sock, answer(self._handlers, line), SEND_TIMEOUT_S)
            return
        outbox = _Outbox()
        threading.Thread(
            target=_run_request, args=(self._handlers, line, outbox), name="control request", daemon=True
        ).start()
        try:
            final = False
            while not final:
                message, final = outbox.next_message(HEARTBEAT_S)
                send_message(sock, message, SEND_TIMEOUT_S)
        except OSError:
            outbox.abandoned = True
            raise
