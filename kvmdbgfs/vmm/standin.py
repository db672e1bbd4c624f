"""A real process standing in for a VM's QEMU (`--qemu-processes`), so that tools which look a VM up by its
process find one: its pid names the VM's debugfs directory (``<pid>-<fd>``), its command line reads like
QEMU's (``qemu-system-x86_64 -name guest=NAME,debug-threads=on ...``: what kvm_stat -g parses from
/proc/<pid>/cmdline) and it has one thread per vCPU named as QEMU names them with debug-threads=on
(``CPU 0/KVM``), whose thread ids the vCPUs' ``pid`` files hold.

The process is a small Python program (standard library only, no site packages) started with argv[0] set to
``qemu-system-x86_64``; it reads its program from stdin, then rewrites its own argument area so that
/proc/<pid>/cmdline shows only the QEMU arguments (as setproctitle does). It ends when the server closes its
end of a pipe (the VM is destroyed, the host shuts down) and, since the kernel closes a dead process's pipes,
when the server is killed, even with SIGKILL. A parent-death signal would not do: it fires when the *thread*
that forked ends, and any control-socket thread may create a VM.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys

QEMU_ARGV0 = "qemu-system-x86_64"
START_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 5.0

# The stand-in's program; LIFELINE, VCPUS and ARGV0 are set by a first line prepended to it.
_PROGRAM = r"""
import ctypes, os, sys, threading

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15


def set_comm(name):
    libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def vcpu_thread(index, tids, started):
    set_comm(f"CPU {index}/KVM")
    tids[index] = threading.get_native_id()
    started.release()
    threading.Event().wait()


def show_qemu_arguments():
    # /proc/self/stat fields 48 and 49 (arg_start, arg_end), counted after the parenthesised comm.
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])
    args = b"\0".join(os.fsencode(arg) for arg in [ARGV0, *sys.argv[1:]]) + b"\0"
    if len(args) <= end - start:
        ctypes.memmove(start, args.ljust(end - start, b"\0"), end - start)


tids = [0] * VCPUS
started = threading.Semaphore(0)
for index in range(VCPUS):
    threading.Thread(target=vcpu_thread, args=(index, tids, started), daemon=True).start()
for _ in range(VCPUS):
    started.acquire()
show_qemu_arguments()
set_comm(ARGV0[:15])
os.write(1, (" ".join(map(str, tids)) + "\n").encode())
while os.read(LIFELINE, 1):
    pass
os._exit(0)
"""


def qemu_arguments(guest: str, vcpus: int, memory: int) -> list[str]:
    """The arguments a libvirt-started QEMU would have for such a VM (the ones tools parse)."""
    return [
        "-name",
        f"guest={guest.replace(',', ',,')},debug-threads=on",
        "-machine",
        "q35,accel=kvm",
        "-cpu",
        "host",
        "-m",
        f"{memory >> 20}M",
        "-smp",
        f"{vcpus},sockets=1,cores={vcpus},threads=1",
        "-nographic",
    ]


class StandinError(Exception):
    """The stand-in process could not be started; the message is one line."""


class StandinProcess:
    """A started stand-in: ``pid`` and ``vcpu_tids`` (one thread id per vCPU, in vCPU order)."""

    def __init__(self, guest: str, vcpus: int, memory: int) -> None:
        lifeline, self._lifeline = os.pipe()
        os.set_inheritable(self._lifeline, False)
        try:
            self._process = subprocess.Popen(
                [QEMU_ARGV0, "-S", "-", *qemu_arguments(guest, vcpus, memory)],
                executable=sys.executable,
                # Python finds its library from argv[0] or, failing that, from the working directory: with
                # argv[0] not its own, PYTHONHOME says where it is.
                env={"PYTHONHOME": f"{sys.base_prefix}:{sys.base_exec_prefix}"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(lifeline,),
                start_new_session=True,  # the terminal's Ctrl-C is for the server, not for its QEMUs
            )
        except OSError as exc:
            os.close(self._lifeline)
            raise StandinError(f"cannot start a QEMU stand-in process: {exc.strerror or exc}") from None
        finally:
            os.close(lifeline)
        self.pid = self._process.pid
        try:
            self.vcpu_tids = self._handshake(vcpus, lifeline)
        except BaseException:
            self.stop()
            raise

    def _handshake(self, vcpus: int, lifeline: int) -> list[int]:
        """Send the program (``lifeline``: its end of the pipe; pass_fds keeps the number), then read the vCPU
        threads' ids (waited for START_TIMEOUT_S at most)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        header = f"LIFELINE, VCPUS, ARGV0 = {lifeline}, {vcpus}, {QEMU_ARGV0!r}\n"
        try:
            self._process.stdin.write((header + _PROGRAM).encode())
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        with selectors.DefaultSelector() as selector:
            selector.register(self._process.stdout, selectors.EVENT_READ)
            ready = selector.select(START_TIMEOUT_S)
        line = self._process.stdout.readline() if ready else b""
        self._process.stdout.close()
        tids = [int(tid) for tid in line.split()]
        if len(tids) != vcpus:
            raise StandinError(f"the QEMU stand-in process (pid {self.pid}) did not start its vCPU threads")
        return tids

    def stop(self) -> None:
        """QEMU exits: the pipe closes, the process ends and is reaped (killed after EXIT_TIMEOUT_S)."""
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1
        try:
            self._process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(EXIT_TIMEOUT_S)
