"""The client side of the control socket: one JSON request, progress lines, one JSON answer."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvmdbgfs.control.wire import LineReader, LineTooLong, connect, peer_uid, send_message

ProgressCallback = Callable[[int, int], None]
DEFAULT_TIMEOUT_S = 30.0  # the server sends a line at least every second while it works on a request
MAX_ANSWER_BYTES = 64 << 20
# Polling `status` for a boot: every request makes the guests' emulation step aside while it is read and
# answered (kvmdbgfs.sched), so a 50 ms poll slowed the default scenario's boot by a third (make bench).
POLL_FIRST_S, POLL_GROWTH, POLL_LONGEST_S = 0.05, 1.5, 0.5


class RequestError(Exception):
    """A request that cannot be carried out; its message goes back to the client."""


def poll_periods() -> Iterator[float]:
    """How long to sleep between polls of `status`: 50 ms first (a cached boot is done in about a second), then
    half as long again each time, up to 500 ms."""
    period = POLL_FIRST_S
    while True:
        yield period
        period = min(period * POLL_GROWTH, POLL_LONGEST_S)


def boot_wait(path: Path, seconds: float, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The server's `status` once its scenario's guests have booted, or after ``seconds`` (then "booted" is
    false): one `boot.wait` request, answered as the boot ends (heartbeats meanwhile)."""
    return request(path, "boot.wait", timeout=timeout, seconds=seconds)


def request(
    path: Path,
    cmd: str,
    on_progress: ProgressCallback | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    **args: Any,
) -> Any:
    """Send one request; return its result or raise RequestError with the server's message.

    The server must run as the same user (SO_PEERCRED), or nothing is sent. A long request may first send
    ``{"progress": [done, total]}`` lines, which go to ``on_progress``, and heartbeats. Connecting and each wait
    for a line are bounded by ``timeout`` seconds (TimeoutError).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        connect(sock, str(path), timeout)
        uid = peer_uid(sock)
        if uid != os.getuid():
            raise RequestError(f"the server at {path} runs as uid {uid}, not {os.getuid()}: not talking to it")
        send_message(sock, {"cmd": cmd, "args": args}, timeout)
        reader = LineReader(sock)
        while True:
            reply = _decode(reader, timeout)
            if "ok" in reply:
                break
            if "progress" in reply and on_progress is not None:
                on_progress(*reply["progress"])
    if not reply["ok"]:
        raise RequestError(reply.get("error", "request failed"))
    return reply.get("result")


def _decode(reader: LineReader, timeout: float) -> dict[str, Any]:
    """The server's next line as a JSON object; RequestError for anything else."""
    try:
        line = reader.readline(MAX_ANSWER_BYTES, timeout)
    except LineTooLong:
        raise RequestError("the server's answer is too large") from None
    if not line:
        raise RequestError("no answer from the server")
    try:
        reply = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        reply = None
    if not isinstance(reply, dict):
        raise RequestError("malformed answer from the server")
    return reply
