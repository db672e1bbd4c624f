"""Mount an emulated KVM host's debugfs tree (/sys/kernel/debug/kvm) with FUSE.

    kvmdbgfs mount MOUNTPOINT [--scenario default|empty|FILE] [--kernel PROFILE|FILE]
                              [--clock realtime|manual] [--host KEY=VALUE] [--control SOCKET] [--allow-other]
                              [--log FILE] [--qemu-processes] [--no-cache] [--boot-workers N]
                              [--background [--wait-booted | --no-wait-booted] [--ready-timeout SECONDS]]

(also `python -m kvmdbgfs mount` and the checkout's `mount.py`). Runs in the foreground; Ctrl-C (SIGINT),
SIGTERM or `kvmdbgfs umount MOUNTPOINT` unmounts and exits 0. With --background the same server runs as a
process of its own, logging to --log (default: in the runtime directory), and the command returns once the
tree is served and its guests have booted, or fails with the server's one-line reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from kvmdbgfs.arg_types import processes, seconds
from kvmdbgfs.control.listener import ControlServer
from kvmdbgfs.control.paths import UnsafeRuntimeDir, default_log_path, default_socket_path, pointer_path
from kvmdbgfs.control.server import ControlHandlers
from kvmdbgfs.daemon import EXIT_NO_FUSE, READY_TIMEOUT_S, ServerFailed, kill, start_server, wait_ready
from kvmdbgfs.fuse import DebugfsOperations, serve
from kvmdbgfs.host_model import host_model, parse_host_overrides
from kvmdbgfs.kvm.profiles import DEFAULT_PROFILE, get_profile
from kvmdbgfs.mountpoint import MountpointError, fuse_unavailable, prepare_mountpoint
from kvmdbgfs.progress import progress_bar
from kvmdbgfs.scenario import ScenarioBoot, build_host, load_scenario
from kvmdbgfs.vmm.boot_ahead import spare_cpus
from kvmdbgfs.vmm.bootcache import BootCache, default_directory
from kvmdbgfs.vmm.clock import CLOCK_MODES
from kvmdbgfs.vmm.standin import StandinError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the shell reports it
GIL_SWITCH_INTERVAL_S = 0.001
BOOT_PROGRESS_S = 0.2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = _Parser(prog=prog, description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("mountpoint", help="an existing, empty directory")
    parser.add_argument("--scenario", default="default", help="default, empty, or a scenario TOML file")
    parser.add_argument("--kernel", default=DEFAULT_PROFILE, help=f"kernel profile (default {DEFAULT_PROFILE})")
    parser.add_argument(
        "--clock", choices=CLOCK_MODES, help="realtime (the default) or manual (moves with `kvmdbgfs clock advance`)"
    )
    parser.add_argument(
        "--host", action="append", default=[], metavar="KEY=VALUE", help="the host machine, over the scenario's [host]"
    )
    parser.add_argument("--control", type=Path, help="control socket path (default: in the runtime directory)")
    parser.add_argument(
        "--no-cache", action="store_true", help="boot every guest, neither using nor filling the boot cache"
    )
    parser.add_argument(
        "--boot-workers",
        type=processes,
        default=spare_cpus(),
        metavar="N",
        help="boot the scenario's later guests in up to N processes of their own, into the cache "
        "(default %(default)s: this machine's CPUs less one; 0: all in the server)",
    )
    parser.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    parser.add_argument("--log", type=Path, metavar="FILE", help="write the output to FILE (`status` names it)")
    parser.add_argument(
        "--background", action="store_true", help="serve from a process of its own; return once served and booted"
    )
    waiting = parser.add_mutually_exclusive_group()
    waiting.add_argument(
        "--wait-booted",
        action="store_true",
        help="with --background (its default): return once every guest has booted",
    )
    waiting.add_argument(
        "--no-wait-booted", action="store_true", help="with --background: return as soon as the tree is served"
    )
    parser.add_argument(
        "--ready-timeout",
        type=seconds,
        default=READY_TIMEOUT_S,
        metavar="SECONDS",
        help=f"with --background: give up (and stop the server) after this long (default {READY_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--qemu-processes",
        action="store_true",
        help="give each VM a real process that looks like QEMU (its pid names the VM directory)",
    )
    return parser.parse_args(argv)


BACKGROUND_FLAGS = {"--background", "--wait-booted", "--no-wait-booted"}


def server_args(argv: list[str]) -> list[str]:
    """The arguments of the foreground server a background mount starts: the same, less its own options."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ready-timeout":
            skip = True
        elif arg not in BACKGROUND_FLAGS and not arg.startswith("--ready-timeout="):
            kept.append(arg)
    return kept


def run_background(args: argparse.Namespace, argv: list[str], prog: str) -> int:
    """Start the server as a process of its own and wait until it serves (and its guests have booted)."""
    mountpoint = os.path.realpath(args.mountpoint)
    try:
        socket_path, _ = control_paths(args.control, mountpoint, prog)
        log = args.log or default_log_path(mountpoint)
    except UnsafeRuntimeDir as exc:
        return fail(prog, str(exc))
    child_args = server_args(argv) + ([] if args.log else ["--log", str(log)])
    try:
        process = start_server(child_args, log)
    except OSError as exc:
        return fail(prog, f"log {log}: {exc.strerror or exc}")
    try:
        status = wait_ready(process, socket_path, log, not args.no_wait_booted, args.ready_timeout)
    except KeyboardInterrupt:
        kill(process)
        say(prog, f"interrupted: the server (pid {process.pid}) was stopped before it served")
        return EXIT_INTERRUPTED
    except ServerFailed as exc:
        line = str(exc)  # the server's own error line names the command already
        print(line if line.startswith(prog) else f"{prog}: error: {line}", file=sys.stderr, flush=True)
        return process.returncode if process.returncode and process.returncode > 0 else 1
    booted = "guests booted" if status["booted"] else "guests booting"
    say(prog, f"serving {mountpoint} in the background (pid {process.pid}, {booted}; log {log})")
    return 0


def log_to(path: Path) -> None:
    """Send this process's output (stdout, stderr, tracebacks, progress) to ``path``, appended."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def say(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def fail(prog: str, message: str) -> int:
    say(prog, f"error: {message}")
    return EXIT_USAGE


def control_paths(control: Path | None, mountpoint: str, prog: str) -> tuple[Path, Path | None]:
    """The socket to listen on and the pointer file that lets `kvmdbgfs -m` find it. UnsafeRuntimeDir when the
    runtime directory cannot be used; with --control that costs only the pointer (a line says so)."""
    try:
        return control or default_socket_path(mountpoint), pointer_path(mountpoint)
    except UnsafeRuntimeDir as exc:
        if control is None:
            raise
        say(prog, f"no pointer file for `kvmdbgfs -m`: {exc}")
        return control, None


def show_boot(boot: ScenarioBoot, prog: str) -> None:
    """A progress bar on the terminal while the scenario's guests boot, then a line saying how it went."""
    if boot.jobs:
        with progress_bar("booting the scenario's guests") as progress:
            while not boot.wait(BOOT_PROGRESS_S):
                progress(*boot.progress())
        cache = boot.vmm.boot_cache
        restored = f"{cache.restored} of {len(boot.jobs)} restored from the boot cache" if cache else "no boot cache"
        if boot.ahead is not None and boot.ahead.handed:
            restored += f", {boot.ahead.handed} of them booted by worker processes"
        say(prog, f"guests booted ({restored}){'' if boot.error is None else f'; but {boot.error}'}")


def main(argv: list[str] | None = None, prog: str = "mount.py") -> int:
    """Mount and serve until unmounted or signalled; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv, prog)
    if args.background:
        return run_background(args, argv, prog)
    if args.log:
        try:
            log_to(args.log)
        except OSError as exc:
            return fail(prog, f"log {args.log}: {exc.strerror or exc}")
    try:
        get_profile(args.kernel)
        scenario = load_scenario(args.scenario)
        machine = host_model({**asdict(scenario.host), **parse_host_overrides(args.host)})
        note = prepare_mountpoint(args.mountpoint)
    except (ValueError, MountpointError) as exc:
        return fail(prog, str(exc))
    if note:
        say(prog, note)
    unavailable = fuse_unavailable(need_helper=os.getuid() != 0)
    if unavailable:
        say(prog, f"error: cannot mount {args.mountpoint}: {unavailable}")
        return EXIT_NO_FUSE
    mountpoint = os.path.realpath(args.mountpoint)
    try:
        socket_path, pointer = control_paths(args.control, mountpoint, prog)
    except UnsafeRuntimeDir as exc:
        return fail(prog, str(exc))
    try:
        control = ControlServer(socket_path, pointer)
    except OSError as exc:
        return fail(prog, f"control socket {socket_path}: {exc.strerror or exc}")
    try:
        cache = None if args.no_cache else BootCache(default_directory())
        vmm, boot = build_host(scenario, args.kernel, args.clock, machine, cache, args.qemu_processes, args.boot_workers)
    except (ValueError, StandinError) as exc:
        control.close()
        return fail(prog, str(exc))
    except BaseException:
        control.close()
        raise
    host = vmm.host
    operations = DebugfsOperations(host.debugfs_dir)

    def status() -> dict[str, object]:
        return {
            "mountpoint": mountpoint,
            "server_pid": os.getpid(),
            "open_files": operations.open_file_count(),
            "control": str(socket_path),
            "log": str(args.log.resolve()) if args.log else None,
            "served": operations.mounted,
            **boot.describe(),
        }

    control.start(ControlHandlers(vmm, status))
    # The guests' emulation threads are CPU-bound: a short switch interval lets a FUSE request that waits for
    # the GIL in after about 1 ms instead of 5 (measured in `make bench`).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    vms = ", ".join(kvm.name for kvm in host.vm_list) or "no VMs"
    say(prog, f"serving {mountpoint} ({args.kernel}, {vmm.clock.mode} clock; {vms}); Ctrl-C to unmount")
    threading.Thread(target=show_boot, args=(boot, prog), name="boot progress", daemon=True).start()
    try:
        serve(operations, mountpoint, allow_other=args.allow_other)
    except RuntimeError:  # libfuse has written why on stderr just before
        say(prog, f"error: could not mount {mountpoint} (FUSE refused it: mounting not permitted here?)")
        return EXIT_NO_FUSE
    finally:
        control.close()
        vmm.shutdown()
    return 0
