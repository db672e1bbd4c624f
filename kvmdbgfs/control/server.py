"""The control server's commands: what each request does, and the one answer every request line gets.

One JSON object per line each way. A request is ``{"cmd": ..., "args": {...}}``; the answer is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``, after any number of
``{"progress": [done, total]}`` and ``{"heartbeat": true}`` lines (control/listener.py sends one at least
every second while a request runs). A bad request changes nothing and leaves the server running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from kvmdbgfs.control.client import RequestError
from kvmdbgfs.kvm.host import require_type
from kvmdbgfs.kvm.vm import Kvm
from kvmdbgfs.sched import serving
from kvmdbgfs.snapshot import HOLD_TIMEOUT_S, take_snapshot
from kvmdbgfs.vmm.clock import parse_duration
from kvmdbgfs.vmm.qemu import QemuProcess
from kvmdbgfs.vmm.standin import StandinError
from kvmdbgfs.vmm.vmm import Vmm
from kvmdbgfs.workloads import WORKLOADS, describe_workload, start_workload, wait_workload
from kvmdbgfs.workloads.base import Progress, no_progress

if TYPE_CHECKING:
    from kvmdbgfs.arch.x86.kvm_arch import KvmArch

# Requests that only read the host: served ahead of the guests' emulation (kvmdbgfs.sched). The others
# wait for the VMs' threads, which must not be held back meanwhile.
READ_COMMANDS = frozenset({"vm.list", "status", "workload.list"})

GATE_TIMEOUT_S = 60.0  # how long a request that changes the tree waits for a snapshot (and the other way round)
BOOT_WAIT_LONGEST_S = 3600.0  # the longest a `boot.wait` may be asked to wait

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """Raised by a progress callback whose client has gone: the request stops waiting, no answer is due."""


def describe_vm(kvm: Kvm, vm: QemuProcess | None) -> dict[str, Any]:
    """What `vm list` reports of a VM: the kernel's side, and QEMU's while its process runs."""
    config = kvm.config
    pte_list = cast("KvmArch", kvm.arch).rmaps.pte_list  # an x86 VM's struct kvm_arch
    return {
        **(vm.describe() if vm is not None else {"workload": None, "queued": []}),
        "name": kvm.name,
        "memory": config.memory,
        "vcpus": config.vcpus,
        "mmu": config.mmu,
        "kernel": kvm.profile.name,
        "rmap_buckets": kvm.profile.rmap_bucket,  # how mmu_rmaps_stat buckets its counts: ffs or fls
        "rmap_design": pte_list.name,
        "seed": config.seed,
        "users_count": kvm.users_count,
        "destroyed": kvm.creator_ref_dropped,
        "rmap_costs": pte_list.costs.as_dict(),
        "live_descs": pte_list.live_descs,
    }


class ControlHandlers:
    """The commands the socket accepts, each validated before it changes anything."""

    def __init__(self, vmm: Vmm, status: Callable[[], dict[str, Any]]) -> None:
        self.vmm = vmm
        self.host = vmm.host
        self.status_extra = status
        # Held by the requests that add or remove VMs, and by a snapshot: one is never taken in the middle of the
        # other. (A snapshot holds the guests' emulation too, so no counter moves while it reads.)
        self._tree_changes = threading.Lock()
        self.commands: dict[str, Callable[..., Any]] = {
            "vm.create": self.vm_create,
            "vm.destroy": self.vm_destroy,
            "vm.list": self.vm_list,
            "status": self.status,
            "boot.wait": self.boot_wait,
            "workload.list": self.workload_list,
            "clock.advance": self.clock_advance,
            "workload.cancel": self.workload_cancel,
            "snapshot": self.snapshot,
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
            with serving() if cmd in READ_COMMANDS else contextlib.nullcontext():
                return handler(**args)
        except TypeError as exc:
            raise RequestError(f"bad arguments for {request['cmd']}: {exc}") from None
        except (ValueError, LookupError, TimeoutError, StandinError) as exc:
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
        with self._changing_tree():
            vm = self.vmm.create_vm(config)
        return describe_vm(vm.kvm, vm)

    def vm_destroy(self, name: str) -> dict[str, Any]:
        require_type("name", name, str)
        # QEMU's threads stop first, outside the gate: a boot or a workload may take seconds to reach its next
        # safe point, and neither a snapshot nor a vm.create should wait for that. Then the VM goes (its stop
        # is then immediate) under the gate.
        self.vmm.find_vm(name).stop()
        with self._changing_tree():
            vm = self.vmm.destroy_vm(name)
        return describe_vm(vm.kvm, None)

    def vm_list(self) -> list[dict[str, Any]]:
        with self.host.kvm_lock:
            kvms = list(self.host.vm_list)
        return [describe_vm(kvm, self.vmm.vms.get(kvm.name)) for kvm in kvms]

    def clock_advance(self, duration: str) -> dict[str, Any]:
        require_type("duration", duration, str)
        return {"host_time_ns": self.vmm.advance_clock(parse_duration(duration))}

    def snapshot(self) -> dict[str, Any]:
        """The whole tree at one instant of host time (kvmdbgfs.snapshot), with no VM created or destroyed
        meanwhile."""
        with self._changing_tree():
            return take_snapshot(self.vmm, HOLD_TIMEOUT_S).to_wire()

    @contextlib.contextmanager
    def _changing_tree(self) -> Iterator[None]:
        if not self._tree_changes.acquire(timeout=GATE_TIMEOUT_S):
            raise TimeoutError(f"busy: another request held the tree for {GATE_TIMEOUT_S:g} s (a snapshot?)")
        try:
            yield
        finally:
            self._tree_changes.release()

    def workload_list(self) -> list[dict[str, Any]]:
        return [describe_workload(workload) for workload in WORKLOADS.values()]

    def workload_run(
        self, vm: str, workload: str, settings: dict[str, Any], progress: Progress, detach: bool = False
    ) -> dict[str, Any]:
        """Queue a workload; with ``detach`` answer at once, else when it ends. This request's thread watches the
        job and hands its progress on (the VM's thread never waits for it); when the client goes, the waiting
        stops (ClientGone from ``progress``) and the workload runs on."""
        require_type("vm", vm, str)
        require_type("workload", workload, str)
        require_type("settings", settings, dict)
        if not isinstance(detach, bool):
            raise ValueError(f"detach has the wrong type: {detach!r}")
        job = start_workload(self.vmm.find_vm(vm), workload, settings)
        if detach:
            return {"vm": vm, "workload": workload, "detached": True}
        return wait_workload(job, progress)

    def workload_cancel(self, vm: str) -> dict[str, Any]:
        """Stop the workload running on ``vm`` at its next safe point (what it started is torn down)."""
        require_type("vm", vm, str)
        return {"vm": vm, "workload": self.vmm.find_vm(vm).cancel_workload()}

    def boot_wait(self, seconds: float) -> dict[str, Any]:
        """`status` once the scenario's guests have booted (or failed to), or after ``seconds`` with "booted"
        false. The request's thread waits on the boot's end without polling: a `status` poll makes the
        guests' emulation step aside each time, and sees the end only at the next poll."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= BOOT_WAIT_LONGEST_S:
            raise ValueError(f"seconds must be a number from 0 to {BOOT_WAIT_LONGEST_S:g}")
        self.vmm.started.wait(seconds)
        return self.status()

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


def is_read_request(line: bytes) -> bool:
    """Whether a request line asks for one of READ_COMMANDS (a malformed line is not)."""
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(request, dict) and isinstance(request.get("cmd"), str) and request["cmd"] in READ_COMMANDS


def answer(handlers: ControlHandlers, line: bytes, progress: Progress = no_progress) -> dict[str, Any]:
    """The reply to one request line: every line gets exactly one (after any progress lines), unless its
    client has gone (ClientGone)."""
    try:
        return {"ok": True, "result": handlers.dispatch(json.loads(line), progress)}
    except ClientGone:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"ok": False, "error": "malformed request: not JSON"}
    except RequestError as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug must not cost the client its answer or the server its thread
        log.exception("control request failed")
        return {"ok": False, "error": f"internal error: {type(exc).__name__}"}
