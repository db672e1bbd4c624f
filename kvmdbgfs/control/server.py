"""The control server: answers the CLI's requests on a Unix socket.

One JSON object per line each way. A request is ``{"cmd": ..., "args": {...}}``;
the answer is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``.
A bad request changes nothing and leaves the server running.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmdbgfs.control.client import RequestError
from kvmdbgfs.control.paths import pointer_path
from kvmdbgfs.kvm.host import require_type
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.vmm.clock import parse_duration
from kvmdbgfs.vmm.qemu import QemuProcess
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import WORKLOADS, describe_workload, start_workload, wait_workload
from kvmdbgfs.workloads.base import Progress, no_progress

MAX_REQUEST_BYTES = 1 << 20
log = logging.getLogger(__name__)


def describe_vm(kvm: Kvm, vm: QemuProcess | None) -> dict[str, Any]:
    """What `vm list` reports of a VM: the kernel's side, and QEMU's while its process runs."""
    config = kvm.config
    return {
        **(vm.describe() if vm is not None else {"workload": None, "queued": []}),
        "name": kvm.name,
        "memory": config.memory,
        "vcpus": config.vcpus,
        "mmu": config.mmu,
        "kernel": kvm.profile.name,
        "rmap_design": kvm.arch.rmaps.pte_list.name,
        "seed": config.seed,
        "users_count": kvm.users_count,
        "destroyed": kvm.creator_ref_dropped,
        "rmap_costs": kvm.arch.rmaps.pte_list.costs.as_dict(),
        "live_descs": kvm.arch.rmaps.pte_list.live_descs,
    }


class ControlHandlers:
    """The commands the socket accepts, each validated before it changes anything."""

    def __init__(self, vmm: Vmm, status: Callable[[], dict[str, Any]]) -> None:
        self.vmm = vmm
        self.host = vmm.host
        self.status_extra = status
        self.commands: dict[str, Callable[..., Any]] = {
            "vm.create": self.vm_create,
            "vm.destroy": self.vm_destroy,
            "vm.list": self.vm_list,
            "status": self.status,
            "workload.list": self.workload_list,
            "clock.advance": self.clock_advance,
        }
        # Commands that report progress while they run.
        self.long_commands: dict[str, Callable[..., Any]] = {"workload.run": self.workload_run}

    def dispatch(self, request: Any, progress: Progress = no_progress) -> Any:
        if not isinstance(request, dict) or not isinstance(request.get("args", {}), dict):
            raise RequestError("malformed request: expected {\"cmd\": ..., \"args\": {...}}")
        cmd = request.get("cmd")
        args = dict(request.get("args", {}))
        handler = self.commands.get(cmd) if isinstance(cmd, str) else None
        if isinstance(cmd, str) and cmd in self.long_commands:
            handler = self.long_commands[cmd]
            args["progress"] = progress
        if handler is None:
            raise RequestError(f"unknown command {request.get('cmd')!r}")
        try:
            return handler(**args)
        except TypeError as exc:
            raise RequestError(f"bad arguments for {request['cmd']}: {exc}") from None
        except (ValueError, LookupError) as exc:
            raise RequestError(exc.args[0] if exc.args else type(exc).__name__) from None

    def vm_create(
        self,
        memory: str = "6G",
        vcpus: int = 2,
        mmu: str = "shadow",
        kernel: str | None = None,
        seed: int | None = None,
        rmap_design: str | None = None,
    ) -> dict[str, Any]:
        config = self.host.make_config(memory, vcpus, mmu, kernel, seed, rmap_design)
        vm = self.vmm.create_vm(config)
        return describe_vm(vm.kvm, vm)

    def vm_destroy(self, name: str) -> dict[str, Any]:
        require_type("name", name, str)
        vm = self.vmm.destroy_vm(name)
        return describe_vm(vm.kvm, None)

    def vm_list(self) -> list[dict[str, Any]]:
        with self.host.kvm_lock:
            kvms = list(self.host.vm_list)
        return [describe_vm(kvm, self.vmm.vms.get(kvm.name)) for kvm in kvms]

    def clock_advance(self, duration: str) -> dict[str, Any]:
        require_type("duration", duration, str)
        ns = parse_duration(duration)
        try:
            now = self.vmm.advance_clock(ns)
        except TimeoutError as exc:
            raise RequestError(str(exc)) from None
        return {"host_time_ns": now}

    def workload_list(self) -> list[dict[str, Any]]:
        return [describe_workload(workload) for workload in WORKLOADS.values()]

    def workload_run(
        self, vm: str, workload: str, settings: dict[str, Any], progress: Progress, detach: bool = False
    ) -> dict[str, Any]:
        """Queue a workload; with ``detach`` answer at once, else when it ends (progress comes from this
        connection's thread, which watches the job: the VM's thread never writes to a socket)."""
        require_type("vm", vm, str)
        require_type("workload", workload, str)
        require_type("settings", settings, dict)
        if not isinstance(detach, bool):
            raise ValueError(f"detach has the wrong type: {detach!r}")
        job = start_workload(self.vmm.find_vm(vm), workload, settings)
        if detach:
            return {"vm": vm, "workload": workload, "detached": True}
        return wait_workload(job, progress)

    def status(self) -> dict[str, Any]:
        with self.host.kvm_lock:
            vms = len(self.host.vm_list)
        return {
            "kernel": self.host.profile.name,
            "seed": self.host.seed,
            "clock": self.vmm.clock.mode,
            "host_time_ns": self.vmm.clock.now_ns(),
            "vms": vms,
            **self.status_extra(),
        }


def answer(handlers: ControlHandlers, line: bytes, progress: Progress = no_progress) -> dict[str, Any]:
    """The reply to one request line: every line gets exactly one (after any progress lines)."""
    try:
        return {"ok": True, "result": handlers.dispatch(json.loads(line), progress)}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"ok": False, "error": "malformed request: not JSON"}
    except RequestError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug must not cost the client its answer or the server its thread
        log.exception("control request failed")
        return {"ok": False, "error": f"internal error: {type(exc).__name__}"}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        handlers: ControlHandlers = self.server.handlers  # type: ignore[attr-defined]
        for line in self.rfile:
            if len(line) > MAX_REQUEST_BYTES:
                reply: dict[str, Any] = {"ok": False, "error": "request too large"}
            else:
                reply = answer(handlers, line, self.send_progress)
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    def send_progress(self, done: int, total: int) -> None:
        self.wfile.write(json.dumps({"progress": [done, total]}).encode() + b"\n")
        self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def remove_stale_socket(path: Path) -> None:
    """Clear the way for a new socket: a dead one is removed; a live one or any other file is refused."""
    if not (path.exists() or path.is_symlink()):
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
            return
    raise OSError(errno.EADDRINUSE, "another server is listening on it")


class ControlServer:
    """Listens on a Unix socket (mode 0600) in a background thread. The socket is bound at construction, so a
    bad path is refused before the host is built; requests are served from ``start``."""

    def __init__(self, path: Path, mountpoint: str) -> None:
        self.path = path
        self.pointer = pointer_path(mountpoint)
        remove_stale_socket(path)
        old_umask = os.umask(0o177)
        try:
            self._server = _Server(str(path), _Handler)
        finally:
            os.umask(old_umask)
        self.pointer.write_text(str(path.resolve()) + "\n")
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)

    def start(self, handlers: ControlHandlers) -> None:
        self._server.handlers = handlers  # type: ignore[attr-defined]
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        for leftover in (self.path, self.pointer):
            leftover.unlink(missing_ok=True)
