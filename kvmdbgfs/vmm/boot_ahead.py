"""Boots ahead: a scenario's later guests boot side by side in worker processes, into the boot cache.

Every guest of this process is emulated under one interpreter lock, so a scenario's guests boot one after
the other however many CPUs the host has. On a host with more, ``BootAhead`` lets the first guest of the
scenario boot here, live (its counters fill as it boots), and hands each later one whose boot the cache
does not hold yet to a worker process of its own (at most one fewer at a time than the CPUs this process
may run on): the worker creates the same VM (configuration, seed, kernel profile, host model), runs the same
boot and writes its snapshot to the same cache directory, exactly as a boot here would have. Meanwhile the
VM's thread waits outside the emulation CPU, its job showing the worker's progress, and then runs the boot,
which the cache now answers: a restore, byte-identical to the emulated boot (kvmdbgfs/vmm/bootcache.py).
Such a guest's counters stay where creation left them until the restore, as with any cached boot.

A worker costs only time when it fails: one that reports an error, exits, stays silent for STALL_S or
leaves no entry behind is a warning, and the guest boots here. A worker dies with this process
(PR_SET_PDEATHSIG) and is killed when its VM is destroyed or its boot cancelled while it runs.

The worker's side is ``python -m kvmdbgfs.vmm.boot_ahead``: one JSON request on stdin, JSON lines on stdout
(``{"progress": [done, total]}``, ``{"warning": "..."}`` for each warning it logs, then ``{"done": true}`` or
``{"error": "..."}``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmdbgfs.host_model import HostModel
from kvmdbgfs.kvm.vm import VmConfig
from kvmdbgfs.parent_death import die_with_parent

if TYPE_CHECKING:
    from kvmdbgfs.vmm.bootcache import BootCache
    from kvmdbgfs.vmm.qemu import QemuProcess, WorkloadJob

log = logging.getLogger(__name__)

STALL_S = 30.0  # a worker that reports nothing for this long is given up (it reports twice a second)
POLL_S = 0.1  # how often the waiting VM thread looks at its job's cancel flag
PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the directory kvmdbgfs is imported from


def spare_cpus() -> int:
    """CPUs this process may run on besides the one its own emulation takes."""
    return len(os.sched_getaffinity(0)) - 1


class BootAhead:
    """Hands the boots of a scenario's later guests to at most ``workers`` worker processes at a time."""

    def __init__(self, host_model: HostModel, host_seed: int, workers: int) -> None:
        self.host_model = host_model
        self.host_seed = host_seed
        self._slots = threading.BoundedSemaphore(workers)
        self.handed = 0  # boots a worker wrote to the cache

    def wait(self, vm: QemuProcess, job: WorkloadJob) -> None:
        """On ``vm``'s thread, before ``job`` (its boot) runs, outside the emulation CPU: if the VM is fresh, the
        cache lacks this boot and a worker slot is free, a worker boots it into the cache; returns when the
        entry is written, the worker has failed (a warning), or the job is cancelled."""
        cache = vm.boot_cache
        key = cache.key(vm, job.name, job.settings) if cache is not None else None
        if cache is None or key is None or cache.holds(key) or not self._slots.acquire(blocking=False):
            return
        try:
            worker = _start_worker(self._request(vm, job, cache))
        except OSError as exc:
            self._slots.release()
            log.warning("boot ahead of %s: no worker process (%s); it boots here", vm.name, exc)
            return
        try:
            outcome = _follow(worker, job, vm.name)
        except Exception:  # a bug here must not end the VM's thread: the guest boots here instead
            log.exception("boot ahead of %s: following the worker failed; it boots here", vm.name)
            return
        finally:
            _stop_worker(worker)
            self._slots.release()
        if outcome is None:
            return  # cancelled: the job stops at once
        if outcome == "done" and cache.holds(key):
            self.handed += 1
            return
        log.warning("boot ahead of %s: %s; it boots here", vm.name,
                    "the worker wrote no snapshot under this VM's key" if outcome == "done" else outcome)

    def _request(self, vm: QemuProcess, job: WorkloadJob, cache: BootCache) -> dict[str, Any]:
        return {
            "host_model": asdict(self.host_model),
            "host_seed": self.host_seed,
            "config": asdict(vm.kvm.config),
            "identity": [vm.pid, vm.fd],
            "workload": job.name,
            "settings": job.settings,
            "cache": str(cache.directory),
            "max_bytes": cache.max_bytes,
        }


def _start_worker(request: dict[str, Any]) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), env.get("PYTHONPATH")]))
    worker = subprocess.Popen(
        [sys.executable, "-m", "kvmdbgfs.vmm.boot_ahead", str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True,
    )
    assert worker.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        worker.stdin.write(json.dumps(request).encode())
        worker.stdin.close()
    return worker


def _follow(worker: subprocess.Popen[bytes], job: WorkloadJob, vm_name: str) -> str | None:
    """The worker's reports passed on (progress to ``job.progress``, warnings to the log) until its end: "done",
    a reason it failed, or None when the job was cancelled meanwhile."""
    assert worker.stdout is not None
    fd = worker.stdout.fileno()
    pending = b""
    last_heard = time.monotonic()
    while job.cancel is None:
        readable, _, _ = select.select([fd], [], [], POLL_S)
        now = time.monotonic()
        if not readable:
            if now - last_heard > STALL_S:
                return f"the worker reported nothing for {STALL_S:.0f} s"
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return f"the worker exited (status {worker.wait()})"
        last_heard = now
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            try:
                report = json.loads(line)
            except ValueError:
                return f"the worker wrote {line[:80]!r}"
            if report.get("done"):
                return "done"
            if "error" in report:
                return f"the worker failed: {report['error']}"
            if "warning" in report:
                log.warning("boot ahead of %s: the worker: %s", vm_name, report["warning"])
                continue
            done, total = report["progress"]
            job.set_progress(int(done), int(total))
    return None


def _stop_worker(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.kill()
    worker.wait()
    if worker.stdout is not None:
        worker.stdout.close()


# -- the worker's side --------------------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """PR_SET_PDEATHSIG: SIGKILL when the process that started this one exits (and it may have already)."""
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _report(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class _ReportWarnings(logging.Handler):
    """The worker's warnings, each a report line (its stderr goes nowhere)."""

    def emit(self, record: logging.LogRecord) -> None:
        _report({"warning": record.getMessage()})


def boot_into_cache(request: dict[str, Any]) -> None:
    """Create the request's VM on a host of its own, run its boot (the cache saves it) and wait for the write;
    RuntimeError if no entry was written."""
    from kvmdbgfs.vmm.bootcache import BootCache
    from kvmdbgfs.vmm.vmm import Vmm
    from kvmdbgfs.workloads import make_job, wait_workload

    cache = BootCache(Path(request["cache"]), int(request["max_bytes"]))
    vmm = Vmm(profile=request["config"]["kernel"], seed=int(request["host_seed"]), clock="manual",
              host=HostModel(**request["host_model"]), boot_cache=cache)
    try:
        job = make_job(request["workload"], request["settings"])
        pid, fd = (int(number) for number in request["identity"])
        vm = vmm.create_vm(VmConfig(**request["config"]), identity=(pid, fd))
        key = cache.key(vm, job.name, job.settings)  # fresh: the manual clock stays at 0, nothing has run
        wait_workload(vm.submit(job), lambda done, total: _report({"progress": [done, total]}), timeout=None)
    finally:
        vmm.shutdown()
    if key is None or not cache.holds(key):
        raise RuntimeError("it wrote no boot snapshot")


def main() -> int:
    _die_with(int(sys.argv[1]))
    logging.getLogger().addHandler(_ReportWarnings(logging.WARNING))
    try:
        boot_into_cache(json.loads(sys.stdin.buffer.read()))
    except Exception as exc:  # reported to the VM that waits: it boots the guest itself
        _report({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    _report({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
