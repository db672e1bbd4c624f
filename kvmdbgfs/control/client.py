"""The client side of the control socket: one JSON request, progress lines, one JSON answer."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

ProgressCallback = Callable[[int, int], None]


class RequestError(Exception):
    """A request that cannot be carried out; its message goes back to the client."""


def request(path: Path, cmd: str, on_progress: ProgressCallback | None = None, **args: Any) -> Any:
    """Send one request; return its result or raise RequestError with the server's message.

    A long request may first send ``{"progress": [done, total]}`` lines; they go to ``on_progress``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        replies = sock.makefile("rb")
        while True:
            reply = json.loads(replies.readline() or b"null")
            if not (isinstance(reply, dict) and "progress" in reply):
                break
            if on_progress is not None:
                on_progress(*reply["progress"])
    if not isinstance(reply, dict):
        raise RequestError("no answer from the server")
    if not reply.get("ok"):
        raise RequestError(reply.get("error", "request failed"))
    return reply.get("result")
