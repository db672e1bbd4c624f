"""Mount an emulated KVM host's debugfs tree (/sys/kernel/debug/kvm) with FUSE.

    kvmdbgfs mount MOUNTPOINT [--scenario default|empty|FILE] [--kernel PROFILE|FILE]
                              [--clock realtime|manual] [--host KEY=VALUE] [--control SOCKET] [--allow-other]

(also `python -m kvmdbgfs mount` and the checkout's `mount.py`). Runs in the foreground; Ctrl-C (SIGINT) or
SIGTERM unmounts and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

from kvmdbgfs.control.listener import ControlServer
from kvmdbgfs.control.paths import UnsafeRuntimeDir, default_socket_path, pointer_path
from kvmdbgfs.control.server import ControlHandlers
from kvmdbgfs.fuse import DebugfsOperations, serve
from kvmdbgfs.host_model import host_model, parse_host_overrides
from kvmdbgfs.kvm.profiles import DEFAULT_PROFILE, get_profile
from kvmdbgfs.mountpoint import MountpointError, prepare_mountpoint
from kvmdbgfs.scenario import build_host, load_scenario
from kvmdbgfs.vmm.clock import CLOCK_MODES

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the shell reports it
GIL_SWITCH_INTERVAL_S = 0.001


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = _Parser(prog=prog, description=__doc__.splitlines()[0])
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
    parser.add_argument("--allow-other", action="store_true", help="let other users read the mount")
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None, prog: str = "mount.py") -> int:
    """Mount and serve until unmounted or signalled; the exit status."""
    args = parse_args(argv, prog)
    try:
        get_profile(args.kernel)
        scenario = load_scenario(args.scenario)
        host = host_model({**asdict(scenario.host), **parse_host_overrides(args.host)})
        note = prepare_mountpoint(args.mountpoint)
    except (ValueError, MountpointError) as exc:
        return fail(prog, str(exc))
    if note:
        say(prog, note)
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
        vmm = build_host(scenario, args.kernel, args.clock, host)
    except ValueError as exc:
        control.close()
        return fail(prog, str(exc))
    except KeyboardInterrupt:
        control.close()
        say(prog, "interrupted while the scenario's guests booted: nothing was mounted")
        return EXIT_INTERRUPTED
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
        }

    control.start(ControlHandlers(vmm, status))
    # The guests' emulation threads are CPU-bound: a short switch interval lets a FUSE request that waits for
    # the GIL in after about 1 ms instead of 5 (measured in `make bench`).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    vms = ", ".join(kvm.name for kvm in host.vm_list) or "no VMs"
    say(prog, f"serving {mountpoint} ({args.kernel}, {vmm.clock.mode} clock; {vms}); Ctrl-C to unmount")
    try:
        serve(operations, mountpoint, allow_other=args.allow_other)
    except RuntimeError as exc:
        return fail(prog, f"could not mount {mountpoint}: {exc}")
    finally:
        control.close()
        vmm.shutdown()
    return 0
