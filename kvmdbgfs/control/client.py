"""The client side of the control socket: one JSON request, one JSON answer."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class RequestError(Exception):
    """A request that cannot be carried out; its message goes back to the client."""


def request(path: Path, cmd: str, **args: Any) -> Any:
    """Send one request; return its result or raise RequestError with the server's message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline() or b"null")
    if not isinstance(reply, dict):
        raise RequestError("no answer from the server")
    if not reply.get("ok"):
        raise RequestError(reply.get("error", "request failed"))
    return reply.get("result")
