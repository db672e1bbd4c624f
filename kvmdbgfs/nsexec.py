"""`kvmdbgfs exec`: run a command where unmodified tools find the tree, in a private mount namespace.

    kvmdbgfs exec [--mount MNT | --scenario S [--kernel K] [--clock C] [--no-qemu-processes]] -- CMD ARGS...

Inside the namespace (nothing of it is seen outside, and it ends with CMD):
- /sys/kernel/debug is a small tmpfs whose ``kvm`` directory is the tree: a bind of the running mount MNT, or
  a mount served by a server started there for the scenario S (with QEMU stand-in processes unless
  --no-qemu-processes); `kvmdbgfs -m /sys/kernel/debug/kvm` (or just `kvmdbgfs`: $KVMDBGFS_MOUNT is set)
  reaches that server.
- /proc/mounts names /sys/kernel/debug with the type ``debugfs``, before any other debugfs line: kvm_stat
  takes the first line whose third field is ``debugfs`` as the debugfs mountpoint. No filesystem but debugfs
  can show that type (a FUSE mount reads ``fuse.SUBTYPE``, and debugfs itself cannot be mounted in a user
  namespace), so /proc/mounts is a file written when CMD starts: the namespace's own mount table with that
  one line changed, moved over the /proc/mounts link itself (open_tree + move_mount, which do not follow it),
  so every process sees it. /proc/self/mounts and /proc/self/mountinfo stay the kernel's.
- /proc/cpuinfo's flags include ``vmx``, the emulated host being Intel (kvm_stat picks its exit reasons by
  it), as LXCFS does for its own /proc files: a bind-mounted edited copy.

As root it makes a mount namespace; as another user, a user namespace (mapped to root inside) with its mount
namespace, where the kernel allows one; otherwise it fails with one line saying what is missing.

This module imports nothing that starts a thread: a process that has more than one cannot enter a new user
namespace (unshare fails with EINVAL), so the `kvmdbgfs` command hands `exec` over to a fresh interpreter
running this module.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvmdbgfs.control.client import RequestError, request
from kvmdbgfs.control.paths import UnsafeRuntimeDir, find_socket, pointer_path, write_pointer
from kvmdbgfs.parent_death import die_with_parent

PROG = "kvmdbgfs exec"
DEBUGFS = "/sys/kernel/debug"
KVM_DIR = f"{DEBUGFS}/kvm"
EXIT_FAILED, EXIT_USAGE = 1, 2
EXIT_NOT_FOUND = 127  # the shell's status for a command it cannot find
SERVE_TIMEOUT_S = 120.0  # how long the scenario's server may take to boot its guests and serve
STATUS_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 20.0
HOST_CPU_FLAG = "vmx"  # the emulated host is Intel (VMX); an AMD model would show svm

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
AT_FDCWD = -100
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429  # the same numbers on every architecture (unified table)
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class ExecError(Exception):
    """What stops `exec`; the message is one line, ``status`` the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def _c_string(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2); OSError on failure."""
    result = _libc.mount(_c_string(source), _c_string(target), _c_string(fstype), flags, _c_string(data))
    _check(result, f"mount {target}")


def _move_file_over_link(source: str, link: str) -> None:
    """Mount the file ``source`` on the symbolic link ``link`` itself (mount(2) would follow the link)."""
    tree = _check(
        _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC), "open_tree"
    )
    try:
        _check(
            _libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(link), MOVE_MOUNT_F_EMPTY_PATH),
            f"move_mount onto {link}",
        )
    finally:
        os.close(tree)


def enter_private_namespace() -> None:
    """unshare(2) a mount namespace (and, for a user other than root, a user namespace mapping them to root
    in it); nothing mounted afterwards propagates back."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        if _libc.unshare(CLONE_NEWNS) != 0:
            raise ExecError(
                f"cannot make a mount namespace: {os.strerror(ctypes.get_errno())} (root needs CAP_SYS_ADMIN, "
                "which an unprivileged container does not give)"
            )
    else:
        if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
            raise ExecError(
                f"cannot make a user namespace as uid {uid} ({os.strerror(ctypes.get_errno())}): this kernel or its "
                "settings (user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor) allow none to "
                "this user; run as root"
            )
        try:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
        except OSError as exc:
            raise ExecError(f"cannot map uid {uid} to root in a user namespace: {exc.strerror}") from None
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        raise ExecError(f"cannot make the mounts private to the new namespace: {exc.strerror}") from None


def cpuinfo_with_flag(text: str, flag: str = HOST_CPU_FLAG) -> str:
    """/proc/cpuinfo with ``flag`` as the only virtualisation flag (vmx/svm) on every ``flags`` line."""
    lines = []
    for line in text.splitlines():
        if line.startswith("flags"):
            name, _, flags = line.partition(":")
            kept = [word for word in flags.split() if word not in ("vmx", "svm")]
            line = f"{name}: {' '.join([*kept, flag])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def mounts_with_debugfs(text: str) -> str:
    """The mount table ``text`` (/proc/self/mounts) with the /sys/kernel/debug line reading as debugfs, and
    placed before any other debugfs line (kvm_stat takes the first)."""
    lines = text.splitlines()
    ours = max(index for index, line in enumerate(lines) if line.split(" ")[1] == DEBUGFS)
    del lines[ours]
    first_debugfs = next((index for index, line in enumerate(lines) if line.split(" ")[2] == "debugfs"), ours)
    lines.insert(min(ours, first_debugfs), f"debugfs {DEBUGFS} debugfs rw,relatime 0 0")
    return "\n".join(lines) + "\n"


class Namespace:
    """The namespace's side of `exec`: its private files, the tree, its server (for a scenario)."""

    def __init__(self, private: Path) -> None:
        self.private = private
        self.server: subprocess.Popen | None = None
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(private), KVMDBGFS_MOUNT=KVM_DIR)

    def prepare(self) -> None:
        """A tmpfs for the private files (unseen outside), and one at /sys/kernel/debug with ``kvm`` in it."""
        if not os.path.isdir(DEBUGFS):
            raise ExecError(f"{DEBUGFS} does not exist: this kernel has no debugfs (CONFIG_DEBUG_FS)")
        try:
            _mount("kvmdbgfs-exec", str(self.private), "tmpfs", 0, "mode=0700")
            _mount("kvmdbgfs", DEBUGFS, "tmpfs", 0, "mode=0700")
            os.mkdir(KVM_DIR, 0o700)
        except OSError as exc:
            raise ExecError(f"cannot mount in the new namespace: {exc.strerror}") from None

    def bind(self, mountpoint: str, socket: Path) -> None:
        """The running mount at ``mountpoint`` as the tree; a pointer file naming its server's ``socket`` for
        KVM_DIR, in the namespace's runtime directory."""
        try:
            _mount(mountpoint, KVM_DIR, None, MS_BIND)
        except OSError as exc:
            raise ExecError(f"cannot bind {mountpoint}: {exc.strerror}") from None
        os.environ["XDG_RUNTIME_DIR"] = self.env["XDG_RUNTIME_DIR"]  # where pointer_path() looks, as CMD will
        write_pointer(pointer_path(KVM_DIR), socket)

    def serve(self, server_args: list[str]) -> None:
        """Start `kvmdbgfs mount KVM_DIR ...` here; wait (SERVE_TIMEOUT_S at most) until the tree is served and
        the scenario's guests have booted (they boot while it is served)."""
        log = self.private / "server.log"
        control = self.private / "server.sock"
        command = [sys.executable, "-m", "kvmdbgfs", "mount", KVM_DIR, "--control", str(control), *server_args]
        with log.open("wb") as handle:
            self.server = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
                preexec_fn=_end_with_parent,  # this process is single-threaded: safe, and exact
            )
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while not (control.exists() and _is_mountpoint(KVM_DIR) and os.path.exists(f"{KVM_DIR}/exits")):
            self._check_server(log, deadline, f"serve {KVM_DIR}")
        while not (status := _server_status(control))["booted"]:
            self._check_server(log, deadline, "boot the scenario's guests")
        if status["boot_error"]:
            raise ExecError(f"a guest did not boot: {status['boot_error']}")

    def _check_server(self, log: Path, deadline: float, what: str) -> None:
        """Wait a little; ExecError if the server has exited or ``deadline`` has passed."""
        assert self.server is not None
        if self.server.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines()
            raise ExecError(f"the server did not start: {lines[-1] if lines else self.server.returncode}")
        if time.monotonic() > deadline:
            raise ExecError(f"the server did not {what} within {SERVE_TIMEOUT_S:.0f} s")
        time.sleep(0.02)

    def show_as_kvm_host(self) -> None:
        """/proc/cpuinfo with vmx, and /proc/mounts with debugfs at /sys/kernel/debug."""
        cpuinfo, mounts = self.private / "cpuinfo", self.private / "mounts"
        cpuinfo.write_text(cpuinfo_with_flag(Path("/proc/cpuinfo").read_text()))
        try:
            _mount(str(cpuinfo), "/proc/cpuinfo", None, MS_BIND)
            mounts.write_text(mounts_with_debugfs(Path("/proc/self/mounts").read_text()))
            for path in (cpuinfo, mounts):
                path.chmod(0o444)
            _move_file_over_link(str(mounts), "/proc/mounts")
        except OSError as exc:
            raise ExecError(f"cannot replace a /proc file: {exc.strerror}") from None

    def run(self, command: list[str]) -> int:
        """CMD's exit status (128 + the signal that ended it); SIGTERM sent to `exec` goes to CMD."""
        try:
            child = subprocess.Popen(command, env=self.env)
        except OSError as exc:
            raise ExecError(f"{command[0]}: {exc.strerror}", EXIT_NOT_FOUND) from None
        signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C reaches CMD itself
        status = child.wait()
        return 128 - status if status < 0 else status

    def close(self) -> None:
        """Stop the server (its QEMU stand-ins end with it); drop the private files."""
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


def _server_status(control: Path) -> dict[str, Any]:
    """`kvmdbgfs status` of the namespace's server; ExecError if it does not answer."""
    try:
        return request(control, "status", timeout=STATUS_TIMEOUT_S)
    except (RequestError, OSError) as exc:
        raise ExecError(f"the server does not answer: {exc}") from None


def _end_with_parent() -> None:
    """In the server's child: SIGTERM when `exec` dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    die_with_parent(signal.SIGTERM)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _is_mountpoint(path: str) -> bool:
    try:
        return os.stat(path).st_dev != os.stat(os.path.dirname(path)).st_dev
    except OSError:
        return False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mount", metavar="MNT", help="the tree of this running mount")
    source.add_argument("--scenario", help="serve this scenario in the namespace (default: default)")
    parser.add_argument("--kernel", help="kernel profile (with --scenario)")
    parser.add_argument("--clock", choices=("realtime", "manual"), help="host clock (with --scenario)")
    parser.add_argument(
        "--no-qemu-processes",
        dest="qemu_processes",
        action="store_false",
        help="no QEMU stand-in processes (with --scenario; pids are then emulated)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("no command given (kvmdbgfs exec [options] -- CMD ARGS...)")
    if args.mount is not None and (args.kernel or args.clock or not args.qemu_processes):
        parser.error("--kernel, --clock and --no-qemu-processes go with --scenario, not --mount")
    return args


def server_arguments(args: argparse.Namespace) -> list[str]:
    """`kvmdbgfs mount` options for the namespace's server."""
    options = ["--scenario", args.scenario or "default"]
    options += ["--kernel", args.kernel] if args.kernel else []
    options += ["--clock", args.clock] if args.clock else []
    return options + (["--qemu-processes"] if args.qemu_processes else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    mountpoint = os.path.realpath(args.mount) if args.mount else None
    if mountpoint is not None and not os.path.exists(os.path.join(mountpoint, "exits")):
        return _fail(f"{args.mount}: not a served kvmdbgfs tree (no exits file)", EXIT_USAGE)
    if mountpoint is None and not os.path.exists("/dev/fuse"):
        return _fail("/dev/fuse is missing: load the fuse module (modprobe fuse) or pass --mount MNT")
    try:
        socket = find_socket(mountpoint) if mountpoint is not None else None
    except (OSError, UnsafeRuntimeDir) as exc:
        return _fail(f"{args.mount}: its control socket cannot be found ({exc})")
    signal.signal(signal.SIGTERM, _terminated)  # the server is stopped on the way out
    private = Path(tempfile.mkdtemp(prefix="kvmdbgfs-exec-"))
    namespace = Namespace(private)
    try:
        enter_private_namespace()
        namespace.prepare()
        if mountpoint is not None and socket is not None:
            namespace.bind(mountpoint, socket)
        else:
            namespace.serve(server_arguments(args))
        namespace.show_as_kvm_host()
        return namespace.run(args.command)
    except ExecError as exc:
        return _fail(str(exc), exc.status)
    finally:
        namespace.close()
        with contextlib.suppress(OSError):
            _libc.umount2(os.fsencode(private), MNT_DETACH)
            os.rmdir(private)


def _fail(message: str, status: int = EXIT_FAILED) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return status


def exec_fresh(argv: list[str]) -> int:
    """`kvmdbgfs exec ARGS`: this module in a fresh interpreter (the `kvmdbgfs` command has threads), which
    imports this very package (and so does the server it starts)."""
    sys.stdout.flush()
    sys.stderr.flush()
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    try:
        os.execve(
            sys.executable,
            [sys.executable, "-m", "kvmdbgfs.nsexec", *argv],
            dict(os.environ, PYTHONPATH=pythonpath),
        )
    except OSError as exc:
        return _fail(f"cannot run {sys.executable}: {exc.strerror}")


if __name__ == "__main__":
    sys.exit(main())
