"""The control socket's wire: one JSON object per line each way, every line read within a size bound and a
deadline and written within a timeout; and who is at the other end (SO_PEERCRED)."""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

CHUNK_BYTES = 1 << 16
CONNECT_RETRY_S = (0.005, 0.1)  # the first and the longest pause while the listener's backlog is full
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class LineTooLong(Exception):
    """A line went past its bound before its newline came."""


def connect(sock: socket.socket, path: str, timeout: float) -> None:
    """Connect a Unix stream socket within ``timeout`` seconds (TimeoutError past it).

    A socket with a timeout is non-blocking underneath, and connect() on a Unix socket whose listener's backlog
    is full then fails with EAGAIN at once instead of waiting as a blocking connect() would; this waits, with a
    bounded backoff, for the listener to accept what is queued."""
    deadline = time.monotonic() + timeout
    pause = CONNECT_RETRY_S[0]
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.0))
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{path}: the server did not take the connection in time") from None
            time.sleep(min(pause, remaining))
            pause = min(2 * pause, CONNECT_RETRY_S[1])


def send_message(sock: socket.socket, message: Any, timeout: float) -> None:
    """Write ``message`` as one line; TimeoutError when it has not all gone within ``timeout`` seconds (0: only
    what goes at once)."""
    sock.settimeout(timeout)
    sock.sendall(json.dumps(message).encode() + b"\n")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket, as it was when it connected or
    listened."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]


class LineReader:
    """Reads lines from a socket; what came after a line waits in a buffer for the next one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def readline(self, limit: int, timeout: float) -> bytes:
        """The next line with its newline (what is left at the end of the stream, b"" when nothing is).
        LineTooLong past ``limit`` bytes (newline included), TimeoutError when it has not all come within
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        searched = 0
        while (end := self._buffer.find(b"\n", searched)) < 0:
            searched = len(self._buffer)
            if searched >= limit:
                raise LineTooLong
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the line did not come in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(CHUNK_BYTES)
            if not chunk:
                line, self._buffer = bytes(self._buffer), bytearray()
                return line
            self._buffer += chunk
        if end >= limit:
            raise LineTooLong
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line
