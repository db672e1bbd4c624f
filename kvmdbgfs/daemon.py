"""A mount server as a process of its own: start it, wait until it serves, stop it.

`kvmdbgfs mount --background`, `kvmdbgfs umount`, the pytest plugin and ``kvmdbgfs.mounted`` all go through
here. Readiness is what the server says on its control socket (``status``: ``served`` once FUSE has
mounted the tree, ``booted`` once the scenario's guests have booted), so it holds however the server
orders its start; stopping is ``fusermount -u``, after which the server's loop ends and it exits.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvmdbgfs.control.client import RequestError, boot_wait, poll_periods, request
from kvmdbgfs.control.paths import UnsafeRuntimeDir, find_socket
from kvmdbgfs.mountpoint import MountpointError, detach, fusermount_command, mount_type

READY_TIMEOUT_S = 300.0  # a scenario of big guests boots for minutes on a busy machine
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05
STATUS_TIMEOUT_S = 1.0  # the socket exists before the server answers (it builds the host first)
FUSE_TYPE = "fuse.kvmdbgfs"
EXIT_NO_FUSE = 3  # a server's exit status when FUSE is not available (no device, no helper, mounting refused)


class ServerFailed(Exception):
    """The server exited, did not come up in time, or did not stop; the message is one line."""


def server_command(mount_args: list[str]) -> list[str]:
    """The command line of a foreground `kvmdbgfs mount` with these arguments, in this interpreter."""
    return [sys.executable, "-m", "kvmdbgfs", "mount", *mount_args]


def start_server(mount_args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server in a session of its own (a Ctrl-C meant for the caller does not reach it), its output in
    ``log`` (truncated first)."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            server_command(mount_args),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            env=env,
        )


def last_line(log: Path) -> str:
    """The server's last line of output (its one-line error when it failed)."""
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
        return next((line for line in reversed(lines) if line), "no output")
    return f"{log}: cannot be read"


def wait_ready(
    process: subprocess.Popen, socket_path: Path, log: Path, wait_booted: bool = True, timeout: float = READY_TIMEOUT_S
) -> dict[str, Any]:
    """The server's status once it serves (and, with ``wait_booted``, once its guests have booted: one
    `boot.wait` request, answered as the boot ends). ServerFailed with the server's own last line when it exits
    first, or when ``timeout`` seconds pass (it is then stopped)."""
    deadline = time.monotonic() + timeout
    periods = poll_periods()
    while True:
        if process.poll() is not None:
            raise ServerFailed(last_line(log))
        try:
            status = request(socket_path, "status", timeout=STATUS_TIMEOUT_S)
            if wait_booted and status.get("server_pid") == process.pid and status.get("served") and not status["booted"]:
                status = boot_wait(socket_path, max(0.0, deadline - time.monotonic()))
        except (OSError, RequestError):  # not listening yet, or still building the host
            status = {}
        if status.get("server_pid") == process.pid and status.get("served") and (status["booted"] or not wait_booted):
            if wait_booted and status.get("boot_error"):
                kill(process)
                raise ServerFailed(f"the scenario's guests did not boot: {status['boot_error']} (its log: {log})")
            return status
        if time.monotonic() > deadline:
            kill(process)
            what = "serve its tree" if not status.get("served") else "boot its guests"
            raise ServerFailed(f"the server did not {what} within {timeout:g} s (its log: {log})")
        time.sleep(next(periods))


def kill(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (the server unmounts and exits), then SIGKILL when it has not exited within ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def server_pid(mountpoint: str) -> int | None:
    """The pid of the server of the mount at ``mountpoint``, None when none answers on its control socket."""
    try:
        return int(request(find_socket(mountpoint), "status", timeout=5.0)["server_pid"])
    except (OSError, RequestError, UnsafeRuntimeDir, KeyError, TypeError, ValueError):
        return None


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def unmount(mountpoint: str, timeout: float = STOP_TIMEOUT_S) -> str:
    """`kvmdbgfs umount`: unmount the tree and wait (``timeout`` s) until its server has exited. Returns what was
    done, in one line; ServerFailed when nothing of ours is mounted there, the mount is busy or the server
    does not exit."""
    real = os.path.realpath(mountpoint)
    kind = mount_type(real)
    if kind is None:
        raise ServerFailed(f"{mountpoint}: nothing is mounted there")
    if kind != FUSE_TYPE:
        raise ServerFailed(f"{mountpoint}: not a kvmdbgfs mount ({kind})")
    pid = server_pid(real)
    if pid is None:
        try:
            detach(real)
        except MountpointError as exc:
            raise ServerFailed(str(exc)) from None
        return f"{mountpoint}: detached a mount whose server is gone"
    helper = fusermount_command()
    if helper is None:
        raise ServerFailed(f"{mountpoint}: no fusermount3 (or fusermount) to unmount it with")
    try:
        result = subprocess.run([helper, "-u", real], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ServerFailed(f"{mountpoint}: {helper} -u did not return within {timeout:g} s") from None
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1:] or ["failed"]
        raise ServerFailed(f"{mountpoint}: {reason[0]}")
    deadline = time.monotonic() + timeout
    while _running(pid):
        if time.monotonic() > deadline:
            raise ServerFailed(f"{mountpoint}: unmounted, but its server (pid {pid}) did not exit within {timeout:g} s")
        time.sleep(POLL_S)
    return f"{mountpoint}: unmounted; server {pid} has exited"
