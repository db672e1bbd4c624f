"""A kvmdbgfs tree for code that tests a tool: mounted with FUSE (``mounted``), or a snapshot directory kept up to
date in-process where FUSE is unavailable (``snapshot_tree``). Both are driven through the same control
commands (create and destroy VMs, run workloads, advance the manual clock), so a test reads the same.

    with kvmdbgfs.mounted("/tmp/kvm", scenario="default") as tree:
        name = tree.create_vm(memory="512M", vcpus=1)
        tree.run(name, "rmap_fork", children=50)
        tree.advance("1s")
        print((tree.path / name / "exits").read_text())
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvmdbgfs.control.client import request
from kvmdbgfs.control.paths import default_log_path, default_socket_path
from kvmdbgfs.control.server import ControlHandlers
from kvmdbgfs.daemon import (
    EXIT_NO_FUSE,
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ServerFailed,
    kill,
    start_server,
    unmount,
    wait_ready,
)
from kvmdbgfs.kvm.profiles import DEFAULT_PROFILE
from kvmdbgfs.mountpoint import MountpointError, detach, fuse_unavailable, mount_type
from kvmdbgfs.snapshot import replace_directory, scenario_host, take_snapshot

SERVER_PROG = "kvmdbgfs mount"  # how the server's lines begin (kvmdbgfs/cli.py)
CHANGING_COMMANDS = frozenset({"vm.create", "vm.destroy", "workload.run", "workload.cancel", "clock.advance"})


class FuseUnavailable(Exception):
    """FUSE cannot be mounted here; the message says why, in one line."""


class KvmDebugfs:
    """A tree at ``path`` and the control commands that drive its host. ``is_snapshot``: ``path`` holds plain
    files, rewritten after each command (no FUSE here)."""

    def __init__(self, path: Path, send: Callable[..., Any], is_snapshot: bool = False) -> None:
        self.path = path
        self.is_snapshot = is_snapshot
        self._send = send

    def request(self, cmd: str, **args: Any) -> Any:
        """One control request (see kvmdbgfs/control/server.py); RequestError when it is refused."""
        return self._send(cmd, **args)

    def create_vm(self, memory: str = "512M", vcpus: int = 1, mmu: str = "shadow", **config: Any) -> str:
        """A new VM (kernel, seed, rmap_design may be given too); its directory name."""
        return self.request("vm.create", memory=memory, vcpus=vcpus, mmu=mmu, **config)["name"]

    def destroy_vm(self, name: str) -> None:
        self.request("vm.destroy", name=name)

    def vms(self) -> list[dict[str, Any]]:
        return self.request("vm.list")

    def run(self, vm: str, workload: str, **settings: Any) -> dict[str, Any]:
        """Run a workload on a VM to its end; its summary."""
        return self.request("workload.run", vm=vm, workload=workload, settings=settings)

    def advance(self, duration: str) -> int:
        """Move the manual clock ('500ms', '2s') and wait until the guests got there; the new host time in ns."""
        return self.request("clock.advance", duration=duration)["host_time_ns"]

    def status(self) -> dict[str, Any]:
        return self.request("status")


@contextlib.contextmanager
def mounted(
    path: str | os.PathLike[str],
    scenario: str = "default",
    kernel: str = DEFAULT_PROFILE,
    clock: str = "manual",
    log: str | os.PathLike[str] | None = None,
    timeout: float = READY_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Iterator[KvmDebugfs]:
    """Mount a tree at ``path`` (an empty directory, made if missing) with a server of its own; yield once it
    serves and its guests have booted; unmount and stop the server when the block ends, however it ends.
    FuseUnavailable when FUSE cannot be used here; ServerFailed (one line) when the server fails otherwise.
    The server logs to ``log`` (default: in the runtime directory, as `kvmdbgfs mount --background`)."""
    reason = fuse_unavailable(need_helper=True)  # the helper unmounts, even where root mounts without it
    if reason:
        raise FuseUnavailable(reason)
    Path(path).mkdir(parents=True, exist_ok=True)
    mountpoint = Path(path).resolve()
    socket_path = default_socket_path(str(mountpoint))
    log_path = Path(log) if log is not None else default_log_path(str(mountpoint))
    args = [str(mountpoint), "--scenario", scenario, "--kernel", kernel, "--clock", clock, "--log", str(log_path)]
    process = start_server(args, log_path, env)
    try:
        try:
            wait_ready(process, socket_path, log_path, timeout=timeout)
        except ServerFailed as exc:
            if process.returncode == EXIT_NO_FUSE:
                raise FuseUnavailable(str(exc).removeprefix(f"{SERVER_PROG}: error: ")) from None
            raise
        yield KvmDebugfs(mountpoint, lambda cmd, **a: request(socket_path, cmd, **a))
    finally:
        _stop(process, mountpoint)


def _stop(process: Any, mountpoint: Path) -> None:
    """Unmount and wait for the server; a server that will not go is killed and its mount detached."""
    if process.poll() is None and mount_type(str(mountpoint)) is not None:
        with contextlib.suppress(ServerFailed):
            unmount(str(mountpoint), STOP_TIMEOUT_S)
    kill(process)
    if mount_type(str(mountpoint)) is not None:
        with contextlib.suppress(MountpointError):
            detach(str(mountpoint))


@contextlib.contextmanager
def snapshot_tree(
    directory: str | os.PathLike[str], scenario: str = "default", kernel: str = DEFAULT_PROFILE
) -> Iterator[KvmDebugfs]:
    """The fallback without FUSE: the scenario's host built in this process (manual clock), its tree written to
    ``directory`` as plain files (kvmdbgfs.snapshot) and written again after every command that changes it."""
    target = Path(directory)
    vmm = scenario_host(scenario, kernel)
    handlers = ControlHandlers(vmm, lambda: {"mountpoint": None, "served": False, "booted": True})

    def send(cmd: str, **args: Any) -> Any:
        result = handlers.dispatch({"cmd": cmd, "args": args})
        if cmd in CHANGING_COMMANDS:
            replace_directory(take_snapshot(vmm), target)
        return result

    try:
        replace_directory(take_snapshot(vmm), target)
        yield KvmDebugfs(target, send, is_snapshot=True)
    finally:
        vmm.shutdown()
